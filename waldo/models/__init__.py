"""Models: backbones (registry), the descriptor model, checkpoints, batched extraction."""

from waldo.models.backbones import BACKBONES, Backbone, backbone_names, create_backbone
from waldo.models.checkpoint import ModelConfig, build_model, load_model, model_hash, save_model
from waldo.models.descriptor import DescriptorModel, Descriptors
from waldo.models.extract import Extracted, extract_descriptors
from waldo.models.untrained import untrained_model

__all__ = ["BACKBONES", "Backbone", "DescriptorModel", "Descriptors", "Extracted", "ModelConfig",
           "backbone_names", "build_model", "create_backbone", "extract_descriptors", "load_model",
           "model_hash", "save_model", "untrained_model"]
