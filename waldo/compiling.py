"""What the torch.compile fast paths share (extraction: waldo.models.compiled; RRT scoring:
waldo.rerank.rrt_fast): fixed shapes by padding, and Inductor's freezing around each call."""

from __future__ import annotations

import torch

__all__ = ["pad_rows", "run_frozen"]


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with copies of its last row appended up to ``rows`` rows: every call then has
    the shape that was compiled, so a short last batch does not trigger a second compilation."""
    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])


def run_frozen(compiled, *args):
    """Call a ``torch.compile``'d callable with Inductor's freezing on for this call only.

    Freezing treats the weights as constants (BatchNorm folding, weight prepacking for oneDNN):
    safe for inference, where they never change; patched around the call, not globally, so
    training code in the same process is unaffected."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        return compiled(*args)
