"""The descriptor model: backbone feature map -> 49 local descriptors and one global descriptor.

Faithful to the reference: locals are a 1x1 convolution of the last feature map (not
normalised); the global descriptor is the spatial average of the map through a linear layer, then
L2-normalised. Before any training the two projections are initialised without labels, either by
PCA fitted on training images (``fit_pca``) or by a seeded random orthogonal matrix, so that an
untrained model already retrieves well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from waldo.models.backbones import Backbone


@dataclass
class Descriptors:
    """One batch of descriptors.

    global_desc: (B, D) float32, L2-normalised.
    local_desc:  (B, L, D) float32, L = h*w cells of the feature map in row-major order (49 at
                 224 px), not normalised.
    grid: (h, w) of the feature map, so a cell's position is (index // w, index % w).
    """

    global_desc: torch.Tensor
    local_desc: torch.Tensor
    grid: tuple[int, int]


class DescriptorModel(nn.Module):
    """Backbone + local 1x1 projection + global linear projection (both to ``dim``)."""

    def __init__(self, backbone: Backbone, dim: int = 128, seed: int = 0) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"descriptor dim must be positive, got {dim}")
        if dim > backbone.out_channels:
            raise ValueError(f"descriptor dim {dim} exceeds the backbone's {backbone.out_channels} channels")
        self.backbone = backbone
        self.dim = dim
        self.local_proj = nn.Conv2d(backbone.out_channels, dim, kernel_size=1)
        self.global_proj = nn.Linear(backbone.out_channels, dim)
        self.init_random_orthogonal(seed)

    @torch.no_grad()
    def init_random_orthogonal(self, seed: int = 0) -> None:
        """A seeded random orthogonal projection: preserves inner products approximately
        (Johnson-Lindenstrauss), a label-free start when there are no images to fit PCA on."""
        generator = torch.Generator().manual_seed(seed)
        gaussian = torch.randn(self.backbone.out_channels, self.dim, generator=generator)
        basis, _ = torch.linalg.qr(gaussian)  # (C, D), orthonormal columns
        self._set_projection(basis.T.contiguous(), torch.zeros(self.backbone.out_channels))

    @torch.no_grad()
    def fit_pca(self, features: np.ndarray | torch.Tensor, whiten: bool = False) -> None:
        """Fit both projections by PCA on backbone features.

        features: (M, C) vectors from training images only (pooled maps or local cells); never
        the evaluation images. The same centred projection serves locals and the global
        descriptor, so the global descriptor stays the (normalised) average of the locals.
        ``whiten`` divides each component by its standard deviation.
        """
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != self.backbone.out_channels:
            raise ValueError(f"PCA features must be (M, {self.backbone.out_channels}), got {tuple(x.shape)}")
        if x.shape[0] < self.dim:
            raise ValueError(f"PCA to {self.dim} dims needs at least {self.dim} vectors, got {x.shape[0]}")
        mean = x.mean(0)
        covariance = (x - mean).T @ (x - mean) / max(1, x.shape[0] - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        order = torch.argsort(eigenvalues, descending=True)[: self.dim]
        components = eigenvectors[:, order].T  # (D, C)
        # Fix each component's sign so the fit is deterministic across LAPACK builds.
        signs = torch.sign(components[torch.arange(self.dim), components.abs().argmax(1)])
        components = components * signs[:, None]
        if whiten:
            components = components / eigenvalues[order].clamp_min(1e-12).sqrt()[:, None]
        self._set_projection(components.float(), mean.float())

    def _set_projection(self, weight: torch.Tensor, mean: torch.Tensor) -> None:
        bias = -(weight @ mean)
        self.local_proj.weight.copy_(weight[:, :, None, None])
        self.local_proj.bias.copy_(bias)
        self.global_proj.weight.copy_(weight)
        self.global_proj.bias.copy_(bias)

    def project(self, feature_map: torch.Tensor) -> Descriptors:
        """(B, C, h, w) backbone map -> Descriptors."""
        local = self.local_proj(feature_map)  # (B, D, h, w)
        pooled = feature_map.mean(dim=(2, 3))
        global_desc = F.normalize(self.global_proj(pooled), dim=-1)
        b, d, h, w = local.shape
        return Descriptors(global_desc, local.flatten(2).transpose(1, 2), (h, w))

    def forward(self, images: torch.Tensor) -> Descriptors:
        """(B, 3, H, W) images in [0, 1] -> Descriptors."""
        return self.project(self.backbone.forward_features(images))
