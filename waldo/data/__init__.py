"""Data: safe image loading, datasets, named evaluation protocols, transform presets."""

from waldo.data.datasets import (
    ImageRecord,
    ImageSet,
    identity_vocabulary,
    load_dataset,
    read_image_folder,
    read_labels_csv,
    read_products10k,
    read_sop,
)
from waldo.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageLoadError, list_images, load_image
from waldo.data.protocols import PROTOCOLS, Protocol, get_protocol, protocol_names
from waldo.data.transforms import TRANSFORMS, TestTransform, get_transform, train_transform, transform_names

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "PROTOCOLS",
    "TRANSFORMS",
    "ImageLoadError",
    "ImageRecord",
    "ImageSet",
    "Protocol",
    "TestTransform",
    "get_protocol",
    "get_transform",
    "identity_vocabulary",
    "list_images",
    "load_dataset",
    "load_image",
    "protocol_names",
    "read_image_folder",
    "read_labels_csv",
    "read_products10k",
    "read_sop",
    "train_transform",
    "transform_names",
]
