"""Global pooling: how a (B, C, h, w) feature map becomes one (B, C) vector.

A swappable, registered part (like backbones and losses). A model's pooling is written into its
``config.json`` as a spec string and rebuilt from it, so an index searches with the pooling it
was built with; configs without the key mean ``avg`` (every model before pooling was a choice).

Specs::

    avg          spatial mean (the reference system's pooling)
    max          spatial max (MAC)
    gem          generalised mean with a *learnable* exponent p, initialised at 3 (Radenovic et al.)
    gem:3        generalised mean with a fixed p (for untrained models; p=1 is avg, p->inf is max)

Which one suits a collection is measured, not assumed: on cluttered shelves the peaks max and
high-p GeM pick are often background, on turntable objects they are the object
(docs/results.md, "Global descriptors").
"""

from __future__ import annotations

import torch
from torch import nn

from waldo.registry import Registry

__all__ = ["POOLINGS", "AvgPool", "GeMPool", "MaxPool", "make_pooling", "pooling_names", "validate_pooling"]

POOLINGS: Registry[nn.Module] = Registry("pooling")


class AvgPool(nn.Module):
    spec = "avg"

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return feature_map.mean(dim=(2, 3))


class MaxPool(nn.Module):
    spec = "max"

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return feature_map.amax(dim=(2, 3))


class GeMPool(nn.Module):
    """(mean over cells of clamp(x, eps)^p)^(1/p). ``learnable``: p is a parameter (saved in the
    model's weights as ``pool.p``); otherwise a constant of the config."""

    def __init__(self, p: float = 3.0, learnable: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        if not p > 0:
            raise ValueError(f"GeM needs p > 0, got {p}")
        self.eps = eps
        self.learnable = learnable
        if learnable:
            self.p = nn.Parameter(torch.tensor(float(p)))
        else:
            # Persistent, so the weights hash (which names the model an index was built with)
            # tells gem:3 from gem:4.
            self.register_buffer("p", torch.tensor(float(p)))

    @property
    def spec(self) -> str:
        return "gem" if self.learnable else f"gem:{float(self.p):g}"

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        p = self.p.to(feature_map.dtype)
        # Features are >= 0 after the backbone's final activation; the clamp keeps pow() finite.
        # Dividing by each channel's max first keeps x^p in [0, 1]: 6^100 overflows float32.
        x = feature_map.clamp_min(self.eps)
        peak = x.amax(dim=(2, 3), keepdim=True)
        return (x / peak).pow(p).mean(dim=(2, 3)).pow(1.0 / p) * peak[:, :, 0, 0]


@POOLINGS.register("avg")
def _avg(argument: str | None) -> nn.Module:
    _no_argument("avg", argument)
    return AvgPool()


@POOLINGS.register("max")
def _max(argument: str | None) -> nn.Module:
    _no_argument("max", argument)
    return MaxPool()


@POOLINGS.register("gem")
def _gem(argument: str | None) -> nn.Module:
    if argument is None:
        return GeMPool(3.0, learnable=True)
    try:
        p = float(argument)
    except ValueError:
        raise ValueError(f"pooling 'gem:{argument}': p must be a number, e.g. gem:3") from None
    if not 0 < p <= 100:
        raise ValueError(f"pooling 'gem:{argument}': p must be in (0, 100]")
    return GeMPool(p, learnable=False)


def _no_argument(name: str, argument: str | None) -> None:
    if argument is not None:
        raise ValueError(f"pooling {name!r} takes no argument (got '{name}:{argument}')")


def make_pooling(spec: str = "avg") -> nn.Module:
    """The pooling module for a spec (module doc); a bad spec is a ValueError listing the known ones."""
    name, sep, argument = str(spec).strip().partition(":")
    return POOLINGS.create(name, argument if sep else None)


def validate_pooling(spec: str) -> str:
    """``spec`` normalised (e.g. ``gem:3.0`` -> ``gem:3``), or ValueError."""
    module = make_pooling(spec)
    return module.spec


def pooling_names() -> list[str]:
    return POOLINGS.names()
