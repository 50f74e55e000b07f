"""The descriptor model: backbone feature map -> 49 local descriptors and one global descriptor.

Faithful to the reference: locals are a 1x1 convolution of the last feature map (not
normalised); the global descriptor is the pooled map (``pooling``: the reference's spatial
average by default, waldo.models.pooling) through a linear layer, then L2-normalised. Before any
training the projections are initialised without labels, either by PCA fitted on training images
(``fit_pca``, ``fit_global_whitening``) or by a seeded random orthogonal matrix, so that an
untrained model already retrieves well.

The locals may come from an earlier, finer stage of the backbone than the global descriptor
(``local_stage``; e.g. EfficientNet-Lite0's stage 4, 112 channels at stride 16: an 18x18 grid at
288 px instead of 9x9) in the same forward pass: finer cells match parts of an object the last map
blurs together (docs/results.md, "Do the RRT's locals add anything to the global ranking?").

The global descriptor may be wider than the locals (``global_dim``): the RRT's tokens stay
``dim`` (128) wide, while global search gains from keeping more of the backbone's channels
(docs/results.md, "Global descriptors"). A reranker that wants a ``dim``-wide global token
takes the normalised mean of the locals (:func:`token_global`), which is exactly the global
descriptor of a model whose two projections are shared (every model before ``global_dim``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from waldo.models.backbones import Backbone
from waldo.models.colour import SIGNATURE_DIM, append_colour, colour_signatures
from waldo.models.pooling import make_pooling


@dataclass
class Descriptors:
    """One batch of descriptors.

    global_desc: (B, G) float32, L2-normalised (G = the model's descriptor_width: its global_dim,
                 D unless wider, plus the colour signature's width for a model with colour_weight).
    local_desc:  (B, L, D) float32, L = h*w cells of the feature map in row-major order (49 at
                 224 px), not normalised.
    grid: (h, w) of the feature map, so a cell's position is (index // w, index % w).
    """

    global_desc: torch.Tensor
    local_desc: torch.Tensor
    grid: tuple[int, int]


@dataclass(frozen=True)
class MatchCellsLayout:
    """Where a model's match cells sit in its stored local rows (DescriptorModel ``match_stage``):
    after the ``tokens`` locals the RRT reads, ``cells`` cells of ``cell_dim`` values each, packed
    ``width // cell_dim`` to a row of the locals' ``width`` (a zero cell pads an odd count), so an
    index stores them as more rows of its one local array. ``grid``: the cells' (h, w)."""

    tokens: int
    cells: int
    cell_dim: int
    width: int
    grid: tuple[int, int]

    @property
    def rows(self) -> int:
        """Local rows per image: the tokens, then the packed cells."""
        per_row = self.width // self.cell_dim
        return self.tokens + -(-self.cells // per_row)

    def split(self, local_desc):  # noqa: ANN001, ANN201 - numpy or torch, (..., rows, width)
        """(tokens (..., tokens, width), cells (..., cells, cell_dim)) of stored local rows."""
        if local_desc.shape[-2] != self.rows or local_desc.shape[-1] != self.width:
            raise ValueError(f"locals with match cells are ({self.rows}, {self.width}) per image, got "
                             f"{tuple(local_desc.shape[-2:])}")
        packed = local_desc[..., self.tokens:, :]
        cells = packed.reshape(*packed.shape[:-2], -1, self.cell_dim)
        return local_desc[..., : self.tokens, :], cells[..., : self.cells, :]

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "cells": self.cells, "cell_dim": self.cell_dim, "width": self.width,
                "grid": list(self.grid)}

    @classmethod
    def from_json(cls, data: dict) -> MatchCellsLayout:
        return cls(int(data["tokens"]), int(data["cells"]), int(data["cell_dim"]), int(data["width"]),
                   tuple(int(v) for v in data["grid"]))


def pack_cells(cells: torch.Tensor, width: int) -> torch.Tensor:
    """(B, L, c) cells -> (B, ceil(L * c / width), width) rows (:class:`MatchCellsLayout`)."""
    b, count, dim = cells.shape
    per_row = width // dim
    pad = -count % per_row
    if pad:
        cells = torch.cat([cells, cells.new_zeros(b, pad, dim)], 1)
    return cells.reshape(b, (count + pad) // per_row, width)


def _cells(image_size: int, stride: int) -> int:
    """Cells along a side of a stride-``stride`` map of an ``image_size`` input ("same" padding: ceil)."""
    return -(-image_size // stride)


def token_global(local_desc: torch.Tensor) -> torch.Tensor:
    """(B, L, D) locals -> (B, D) L2-normalised mean: the ``dim``-wide global token of a model
    whose global descriptor is wider (module doc)."""
    return F.normalize(local_desc.float().mean(dim=1), dim=-1)


def global_tokens(global_desc: torch.Tensor, local_desc: torch.Tensor, width: int) -> torch.Tensor:
    """The global token an RRT of ``width`` reads for (..., G) ``global_desc`` and its (..., L, D)
    ``local_desc``: the global descriptor itself when it is ``width`` wide, else the locals'
    :func:`token_global` (training, validation and serving all decide it here)."""
    if global_desc.shape[-1] == width:
        return global_desc
    return token_global(local_desc)


def rrt_global_inputs(rrt, global_desc: torch.Tensor, local_desc: torch.Tensor
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(global token, residual input) that ``rrt`` (a waldo.rerank.rrt.RerankingTransformer) reads
    for one side of its pairs: the :func:`global_tokens` token when the RRT uses global tokens, and
    the model's own ``global_desc`` when its residual reads the descriptor
    (``global_skip_from="descriptor"``); None where the RRT reads neither. Training, validation
    and serving all build the RRT's global inputs here, so they cannot drift apart."""
    if not rrt.config.use_global_tokens:
        return None, None
    token = global_tokens(global_desc, local_desc, rrt.config.d_model)
    return token, (global_desc if rrt.skips_on_descriptor else None)


class DescriptorModel(nn.Module):
    """Backbone + local 1x1 projection (to ``dim``, of the last map or of stage ``local_stage``'s
    output) + pooling + global linear projection (to ``global_dim``, default ``dim``)."""

    def __init__(self, backbone: Backbone, dim: int = 128, seed: int = 0, *, pooling: str = "avg",
                 global_dim: int | None = None, global_scales: tuple[float, ...] = (),
                 local_stage: int | None = None, match_stage: int | None = None, match_dim: int = 64,
                 colour_weight: float = 0.0) -> None:
        super().__init__()
        global_dim = dim if global_dim is None else global_dim
        if local_stage is None:
            local_channels, self.local_stride = backbone.out_channels, backbone.stride
        else:
            local_channels, self.local_stride = backbone.stage_shape(local_stage)
        for name, value, channels in (("descriptor dim", dim, local_channels),
                                      ("global descriptor dim", global_dim, backbone.out_channels)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
            if value > channels:
                where = "the backbone's" if channels == backbone.out_channels else f"stage {local_stage}'s"
                raise ValueError(f"{name} {value} exceeds {where} {channels} channels")
        self.backbone = backbone
        self.dim = dim
        self.global_dim = global_dim
        #: the backbone stage whose output the locals project (None: the last map, as the reference)
        self.local_stage = local_stage
        self.local_channels = local_channels
        #: a stage whose cells are projected to ``match_dim`` and stored after the locals
        #: (:class:`MatchCellsLayout`): finer cells for local matching beside the RRT's tokens
        self.match_stage = match_stage
        self.match_dim = match_dim
        if match_stage is not None:
            if local_stage is not None:
                raise ValueError("locals from a finer stage already are match cells: give local_stage or "
                                 "match_stage, not both")
            match_channels, self.match_stride = backbone.stage_shape(match_stage)
            if not 1 <= match_dim <= match_channels or dim % match_dim:
                raise ValueError(f"match cells are 1 to {match_channels} values wide (stage {match_stage}'s "
                                 f"channels) and divide the locals' {dim}, got {match_dim}")
            self.match_proj = nn.Conv2d(match_channels, match_dim, kernel_size=1)
        self.pool = make_pooling(pooling)
        #: extra image scales (factors of the input size) whose global descriptors are averaged
        #: with the input's own (multi-scale global descriptor); () = single scale
        self.global_scales = tuple(float(f) for f in global_scales)
        if not colour_weight >= 0:
            raise ValueError(f"colour_weight must be >= 0, got {colour_weight}")
        #: > 0: the global descriptor carries the input's colour signature (:meth:`with_colour`)
        self.colour_weight = float(colour_weight)
        self.local_proj = nn.Conv2d(local_channels, dim, kernel_size=1)
        self.global_proj = nn.Linear(backbone.out_channels, global_dim)
        self.init_random_orthogonal(seed)

    def local_grid(self, image_size: int) -> tuple[int, int]:
        """(h, w) of the locals' cells for a square ``image_size`` input."""
        side = _cells(image_size, self.local_stride)
        return side, side

    def local_rows(self, image_size: int) -> int:
        """Stored local rows per image at ``image_size``: the locals, then any packed match cells."""
        layout = self.match_layout(image_size)
        h, w = self.local_grid(image_size)
        return layout.rows if layout is not None else h * w

    def match_layout(self, image_size: int) -> MatchCellsLayout | None:
        """Where the match cells sit in the local rows at ``image_size``; None without them."""
        if self.match_stage is None:
            return None
        side = _cells(image_size, self.match_stride)
        h, w = self.local_grid(image_size)
        return MatchCellsLayout(h * w, side * side, self.match_dim, self.dim,
                                (side, side))

    @torch.no_grad()
    def fit_match_pca(self, cells: np.ndarray | torch.Tensor) -> None:
        """Fit the match cells' projection by a plain PCA of (M, C) cells of stage ``match_stage``."""
        if self.match_stage is None:
            raise ValueError("this model has no match cells (match_stage)")
        dim, self.dim = self.dim, self.match_dim  # _pca projects to self.dim
        try:
            weight, mean = self._pca(cells, self.match_proj.in_channels, False)
        finally:
            self.dim = dim
        self.match_proj.weight.copy_(weight[:, :, None, None])
        self.match_proj.bias.copy_(-(weight @ mean))

    @property
    def pooling(self) -> str:
        return self.pool.spec

    @property
    def shared_projection(self) -> bool:
        """True when locals and the global descriptor share one projection (same width, average
        pooling): the global descriptor is then the normalised mean of the locals."""
        return (self.global_dim == self.dim and self.pooling == "avg" and not self.global_scales
                and self.local_stage is None)

    @property
    def _one_projection(self) -> bool:
        """True when one (dim, C) matrix projects both the locals and the global descriptor."""
        return self.global_dim == self.dim and self.local_stage is None

    @torch.no_grad()
    def init_random_orthogonal(self, seed: int = 0) -> None:
        """A seeded random orthogonal projection: preserves inner products approximately
        (Johnson-Lindenstrauss), a label-free start when there are no images to fit PCA on."""
        generator = torch.Generator().manual_seed(seed)
        gaussian = torch.randn(self.local_channels, self.dim, generator=generator)
        basis, _ = torch.linalg.qr(gaussian)  # (C, D), orthonormal columns
        self._set_projection(basis.T.contiguous(), torch.zeros(self.local_channels))
        if not self._one_projection:
            gaussian = torch.randn(self.backbone.out_channels, self.global_dim, generator=generator)
            basis, _ = torch.linalg.qr(gaussian)
            self._set_global_projection(basis.T.contiguous(), torch.zeros(self.backbone.out_channels))

    @torch.no_grad()
    def fit_pca(self, features: np.ndarray | torch.Tensor, whiten: bool = False) -> None:
        """Fit the projections of the last feature map to ``dim`` by PCA on backbone features.

        features: (M, C) vectors of the last map from training images only (pooled maps or local
        cells); never the evaluation images. When the model's global descriptor is as wide as its
        locals, the same centred projection serves both, so the global descriptor stays the
        (normalised) average of the locals; a wider global descriptor is left to
        :meth:`fit_global_whitening`, locals of an earlier stage to :meth:`fit_local_pca`.
        ``whiten`` divides each component by its standard deviation.
        """
        weight, mean = self._pca(features, self.backbone.out_channels, whiten)
        if self.local_stage is None:
            self._set_projection(weight, mean)
        elif self.global_dim == self.dim:
            self._set_global_projection(weight, mean)

    @torch.no_grad()
    def fit_local_pca(self, cells: np.ndarray | torch.Tensor, whiten: bool = False) -> None:
        """Fit the local projection alone by PCA on (M, C) cells of the map the locals read (stage
        ``local_stage``'s output, or the last map), from the caller's fit images, without labels."""
        weight, mean = self._pca(cells, self.local_channels, whiten)
        self.local_proj.weight.copy_(weight[:, :, None, None])
        self.local_proj.bias.copy_(-(weight @ mean))

    def _pca(self, features: np.ndarray | torch.Tensor, channels: int, whiten: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """((dim, channels) principal components, (channels,) mean) of ``features``, float32."""
        x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != channels:
            raise ValueError(f"PCA features must be (M, {channels}), got {tuple(x.shape)}")
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
        return components.float(), mean.float()

    @torch.no_grad()
    def fit_global_whitening(self, pooled: np.ndarray | torch.Tensor, power: float = 0.25,
                             shrink: float = 0.1) -> None:
        """Fit the global projection alone, without labels, on pooled training vectors (M, C).

        PCA to ``global_dim`` with each component scaled by (eigenvalue + shrink * mean
        eigenvalue) ** -power: power 0 is plain PCA, 0.5 full whitening. Full whitening of the
        weakest components amplifies noise (and divides by ~0 when M < global_dim); shrinkage and
        a partial power keep what whitening is good for, evening out the dominant "bursty"
        directions. Chosen on validation identities (docs/results.md, "Global descriptors").
        """
        from waldo.models.whitening import untrained_metric_projection

        x = np.asarray(pooled, np.float64)
        if x.ndim != 2 or x.shape[1] != self.backbone.out_channels:
            raise ValueError(f"whitening features must be (M, {self.backbone.out_channels}), got {tuple(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError(f"whitening needs at least 2 vectors, got {x.shape[0]}")
        if not (0 <= power <= 0.5 and shrink >= 0):
            raise ValueError(f"whitening power must be in [0, 0.5] and shrink >= 0, got {power}, {shrink}")
        projection = untrained_metric_projection(x, self.global_dim, power=power, shrink=shrink)  # (C, G)
        self._set_global_projection(torch.as_tensor(projection.T, dtype=torch.float32),
                                    torch.as_tensor(x.mean(0), dtype=torch.float32))

    def _set_projection(self, weight: torch.Tensor, mean: torch.Tensor) -> None:
        bias = -(weight @ mean)
        self.local_proj.weight.copy_(weight[:, :, None, None])
        self.local_proj.bias.copy_(bias)
        if self._one_projection:
            self.global_proj.weight.copy_(weight)
            self.global_proj.bias.copy_(bias)

    def _set_global_projection(self, weight: torch.Tensor, mean: torch.Tensor) -> None:
        self.global_proj.weight.copy_(weight)
        self.global_proj.bias.copy_(-(weight @ mean))

    def project(self, feature_map: torch.Tensor, local_map: torch.Tensor | None = None) -> Descriptors:
        """(B, C, h, w) last backbone map (and, for a model with ``local_stage``, that stage's
        map, which the locals read) -> Descriptors."""
        if self.local_stage is not None and local_map is None:
            raise ValueError(f"this model's locals read backbone stage {self.local_stage}: pass its map too")
        local = self.local_proj(feature_map if self.local_stage is None else local_map)  # (B, D, h, w)
        pooled = self.pool(feature_map)
        global_desc = F.normalize(self.global_proj(pooled), dim=-1)
        b, d, h, w = local.shape
        return Descriptors(global_desc, local.flatten(2).transpose(1, 2), (h, w))

    def multiscale_global(self, images: torch.Tensor, global_desc: torch.Tensor) -> torch.Tensor:
        """``global_desc`` (of ``images`` at their own size) averaged with the global descriptors
        of ``images`` resized by each of :attr:`global_scales`, then renormalised: the
        multi-scale global descriptor (the locals stay the input size's). Unchanged without scales."""
        if not self.global_scales:
            return global_desc
        total = global_desc
        height, width = images.shape[-2:]
        for factor in self.global_scales:
            size = (max(32, round(height * factor)), max(32, round(width * factor)))
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
            total = total + F.normalize(self.global_proj(self.pool(self.backbone.forward_features(scaled))), dim=-1)
        return F.normalize(total, dim=-1)

    @property
    def descriptor_width(self) -> int:
        """The stored global descriptor's width: ``global_dim``, plus the colour signature's for
        a model with ``colour_weight``."""
        return self.global_dim + (SIGNATURE_DIM if self.colour_weight else 0)

    def with_colour(self, images: torch.Tensor, global_desc: torch.Tensor) -> torch.Tensor:
        """``global_desc`` with the colour signature of ``images`` (the model's input) appended,
        as square roots scaled by sqrt(``colour_weight``), the whole renormalised: inner products
        of two such descriptors are (global similarity + w x Bhattacharyya coefficient of the
        colours) / (1 + w), so search, the RRT's global residual and neighbourhood consensus all
        read colour (docs/results.md "Would the photos' colours help?"). Unchanged when the
        weight is 0."""
        if not self.colour_weight:
            return global_desc
        return append_colour(global_desc, colour_signatures(images), self.colour_weight)

    def forward(self, images: torch.Tensor) -> Descriptors:
        """(B, 3, H, W) images in [0, 1] -> Descriptors."""
        if self.match_stage is not None:
            last, tapped = self.backbone.forward_tapped(images, self.match_stage)
            out = self.project(last)
            cells = self.match_proj(tapped).flatten(2).transpose(1, 2)
            out.local_desc = torch.cat([out.local_desc, pack_cells(cells, self.dim)], 1)
        elif self.local_stage is None:
            out = self.project(self.backbone.forward_features(images))
        else:
            out = self.project(*self.backbone.forward_tapped(images, self.local_stage))
        out.global_desc = self.with_colour(images, self.multiscale_global(images, out.global_desc))
        return out
