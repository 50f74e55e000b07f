"""Inference-only scoring of a trained :class:`RerankingTransformer`, built for latency.

The training module (``rrt.py``) runs ``nn.TransformerEncoderLayer``; at query time three things
it does are wasted on CPU:

* **Every token of the last layer.** Only the CLS output is read, so the last layer needs keys
  and values for all tokens but a query, attention row, output projection and feed-forward for
  the CLS token alone: about 15% of the FLOPs of a 6-layer model, exactly the same result.
* **fp32 matmuls.** On CPUs with AVX-512 BF16 (or AMX) a bf16 GEMM runs about twice as fast.
  :class:`FastRRTScorer` with ``dtype=torch.bfloat16`` runs the projections, attention
  (``scaled_dot_product_attention``) and feed-forward in bf16 while the residual stream, the
  LayerNorms and the classifier stay fp32, so rounding does not accumulate across layers.
  Whether the ranking survives is measured, not assumed (``benchmarks/rerank_speed.py``:
  Recall@1 on grocery-open-cross against fp32 scoring).
* **Per-query work on the candidate side.** A candidate's embedded tokens (locals + segment row
  + position) depend only on the candidate, so :meth:`FastRRTScorer.embed_candidates` computes
  them once (in the scoring dtype) and a cache keyed by image id can reuse them across queries.

* **Eager dispatch.** With ``compile=True`` the encoder runs through ``torch.compile`` with
  Inductor's *freezing*: the weights become constants, prepacked once for oneDNN's bf16 GEMMs,
  with the bias, ReLU and residual adds fused into them; the LayerNorms and softmax become fused
  loops. On 2 cores this took the reference-sized RRT from about 140 ms to about 60 ms per
  top-100 in bf16 (``benchmarks/rerank_speed.py``). Compiling costs about 10-20 s at the first
  call (a service does it in its warm-up query), shapes are fixed by padding every batch to
  ``batch_size`` rows, and a failed compilation falls back to eager with a warning.

The module is exact in fp32 (``dtype=torch.float32``: same logits as ``RerankingTransformer``
up to float rounding order), and reads its weights from a trained model, so nothing new is
trained or stored.

Not done, on purpose: caching candidates' embedded tokens in the index. Embedding 100 candidates
(an add of segment and position rows) measured 0.5 ms per query against 60+ ms of encoder, and
storing the tokens would add 99 x 128 values per image; ``embed_candidates`` stays separate so
that a cache could be added if that ratio ever changes.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from waldo.compiling import pad_rows, run_frozen
from waldo.rerank.rrt import (
    SEGMENT_CANDIDATE,
    SEGMENT_CANDIDATE_GLOBAL,
    SEGMENT_CLS,
    SEGMENT_QUERY,
    SEGMENT_QUERY_GLOBAL,
    SEGMENT_SEP,
    RerankingTransformer,
    sine_position_embedding,
)

__all__ = ["CandidateTokens", "FastRRTScorer", "supports_fast_bf16"]


def supports_fast_bf16() -> bool:
    """Whether this CPU has native bf16 dot products (AVX-512 BF16 or AMX); without them a bf16
    GEMM is emulated and slower than fp32, so callers should keep fp32."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover - old torch
        return False
    if "AVX512" not in capability.upper():
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as info:
            flags = info.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class _Layer:
    """One encoder layer's weights in the scoring dtype (norms and biases of norms in fp32)."""

    qkv_weight: torch.Tensor  # (3d, d)
    qkv_bias: torch.Tensor
    out_weight: torch.Tensor  # (d, d)
    out_bias: torch.Tensor
    ff1_weight: torch.Tensor  # (ff, d)
    ff1_bias: torch.Tensor
    ff2_weight: torch.Tensor  # (d, ff)
    ff2_bias: torch.Tensor
    norm1: tuple[torch.Tensor, torch.Tensor, float]
    norm2: tuple[torch.Tensor, torch.Tensor, float]


@dataclass(frozen=True)
class CandidateTokens:
    """Embedded candidate side of the sequence: ``tokens`` (N, Lc', d) = [SEP, (global,) locals]
    in the scoring dtype's residual form (fp32), and ``padding`` (N, Lc') bool or None."""

    tokens: torch.Tensor
    padding: torch.Tensor | None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows: torch.Tensor | slice) -> "CandidateTokens":
        return CandidateTokens(self.tokens[rows], None if self.padding is None else self.padding[rows])


class FastRRTScorer:
    """Scores one query against many candidates with a trained RRT's weights (eval only).

    Usage::

        scorer = FastRRTScorer(model, dtype=torch.bfloat16)
        candidates = scorer.embed_candidates(cand_locals)            # cacheable per image
        logits = scorer.score(query_local, candidates)               # (N,) float32
    """

    def __init__(self, model: RerankingTransformer, *, dtype: torch.dtype = torch.float32,
                 grid: tuple[int, int] = (7, 7), compile: bool = False) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        config = model.config
        self.config = config
        self.dtype = dtype
        self.grid = grid
        self.n_heads = config.n_heads
        self.norm_first = config.norm_first
        self.activation = F.relu if config.activation == "relu" else F.gelu
        with torch.no_grad():
            self.position = sine_position_embedding(grid, config.d_model, scale=config.pos_scale,
                                                    temperature=config.pos_temperature)
            self.segments = model.segment_embedding.weight.detach().float().clone()
            self.layers = [self._layer(layer) for layer in model.layers]
            if isinstance(model.final_norm, nn.LayerNorm):
                final = model.final_norm
                self.final_norm = (final.weight.detach().float().clone(), final.bias.detach().float().clone(), final.eps)
            else:
                self.final_norm = None
            self.classifier_weight = model.classifier.weight.detach().float().clone()
            self.classifier_bias = model.classifier.bias.detach().float().clone()
        self._compiled = torch.compile(_EncoderForward(self), dynamic=False) if compile else None
        self._compile_lock = threading.Lock()  # one caller compiles; compiled code is then shared

    @property
    def compiled(self) -> bool:
        """Whether scoring runs compiled code (False after a failed compilation fell back)."""
        return self._compiled is not None

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(self.dtype).contiguous().clone()

    def _layer(self, layer: nn.TransformerEncoderLayer) -> _Layer:
        attention = layer.self_attn

        def norm(module: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
            return module.weight.detach().float().clone(), module.bias.detach().float().clone(), module.eps

        return _Layer(
            qkv_weight=self._cast(attention.in_proj_weight), qkv_bias=self._cast(attention.in_proj_bias),
            out_weight=self._cast(attention.out_proj.weight), out_bias=self._cast(attention.out_proj.bias),
            ff1_weight=self._cast(layer.linear1.weight), ff1_bias=self._cast(layer.linear1.bias),
            ff2_weight=self._cast(layer.linear2.weight), ff2_bias=self._cast(layer.linear2.bias),
            norm1=norm(layer.norm1), norm2=norm(layer.norm2),
        )

    # ------------------------------------------------------------------ embedding
    def _locals(self, local: torch.Tensor, segment: int) -> torch.Tensor:
        n_cells = self.position.shape[0]
        if local.shape[-2] != n_cells or local.shape[-1] != self.config.d_model:
            raise ValueError(f"locals must be (..., {n_cells}, {self.config.d_model}) for grid {self.grid}, "
                             f"got {tuple(local.shape)}")
        return local.float() + self.segments[segment] + self.position

    def embed_candidates(self, cand_locals: torch.Tensor, cand_globals: torch.Tensor | None = None,
                         cand_masks: torch.Tensor | None = None) -> CandidateTokens:
        """(N, L, d) candidate locals (any float dtype) -> their part of the sequence, once."""
        n = cand_locals.shape[0]
        parts = [self.segments[SEGMENT_SEP].expand(n, 1, -1)]
        if self.config.use_global_tokens:
            if cand_globals is None:
                raise ValueError("use_global_tokens is set: cand_globals is required")
            parts.append((cand_globals.float() + self.segments[SEGMENT_CANDIDATE_GLOBAL])[:, None])
        parts.append(self._locals(cand_locals, SEGMENT_CANDIDATE))
        tokens = torch.cat(parts, dim=1)
        padding = None
        if cand_masks is not None:
            keep = torch.zeros(n, len(parts) - 1, dtype=torch.bool)
            padding = torch.cat([keep, cand_masks.bool()], dim=1)
        return CandidateTokens(tokens.contiguous(), padding)

    def _query_part(self, query_local: torch.Tensor, query_global: torch.Tensor | None) -> torch.Tensor:
        parts = [self.segments[SEGMENT_CLS][None]]
        if self.config.use_global_tokens:
            if query_global is None:
                raise ValueError("use_global_tokens is set: query_global is required")
            parts.append((query_global.float() + self.segments[SEGMENT_QUERY_GLOBAL])[None])
        parts.append(self._locals(query_local, SEGMENT_QUERY))
        return torch.cat(parts, dim=0)  # (Lq', d)

    # ------------------------------------------------------------------ the encoder
    def _attention(self, x: torch.Tensor, layer: _Layer, mask: torch.Tensor | None, cls_only: bool) -> torch.Tensor:
        b, t, d = x.shape
        heads, head_dim = self.n_heads, d // self.n_heads
        h = x.to(self.dtype)
        if cls_only:  # keys and values for every token, the query for CLS alone
            kv = F.linear(h, layer.qkv_weight[d:], layer.qkv_bias[d:])
            q = F.linear(h[:, :1], layer.qkv_weight[:d], layer.qkv_bias[:d])
            k, v = kv.split(d, dim=-1)
        else:
            q, k, v = F.linear(h, layer.qkv_weight, layer.qkv_bias).split(d, dim=-1)
        q = q.view(b, -1, heads, head_dim).transpose(1, 2)
        k = k.view(b, t, heads, head_dim).transpose(1, 2)
        v = v.view(b, t, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, -1, d)
        return F.linear(out, layer.out_weight, layer.out_bias).float()

    def _feed_forward(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        h = self.activation(F.linear(x.to(self.dtype), layer.ff1_weight, layer.ff1_bias))
        return F.linear(h, layer.ff2_weight, layer.ff2_bias).float()

    @staticmethod
    def _norm(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
        weight, bias, eps = norm
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def _encode(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, d) fp32 tokens -> (B, d) CLS output."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            cls_only = i == last
            if self.norm_first:
                residual = x[:, :1] if cls_only else x
                x = residual + self._attention(self._norm(x, layer.norm1), layer, mask, cls_only)
                x = x + self._feed_forward(self._norm(x, layer.norm2), layer)
            else:
                residual = x[:, :1] if cls_only else x
                x = self._norm(residual + self._attention(x, layer, mask, cls_only), layer.norm1)
                x = self._norm(x + self._feed_forward(x, layer), layer.norm2)
        cls = x[:, 0]
        if self.final_norm is not None:
            cls = self._norm(cls, self.final_norm)
        return cls

    def _logits(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, T, d) fp32 tokens -> (B,) logits."""
        cls = self._encode(tokens, mask)
        return F.linear(cls, self.classifier_weight, self.classifier_bias).squeeze(-1)

    def _run(self, tokens: torch.Tensor, mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if self._compiled is None:
            return self._logits(tokens, mask)
        b = tokens.shape[0]
        tokens = pad_rows(tokens, batch_size)  # one shape, one compilation
        mask = None if mask is None else pad_rows(mask, batch_size)
        try:
            with self._compile_lock:
                return run_frozen(self._compiled, tokens.contiguous(), mask)[:b]
        except Exception as error:  # noqa: BLE001 - an optimisation must never fail a query
            warnings.warn(f"torch.compile of the RRT scorer failed ({type(error).__name__}: {error}); "
                          f"scoring in eager mode", RuntimeWarning, stacklevel=3)
            self._compiled = None
            return self._logits(tokens[:b], None if mask is None else mask[:b])

    @torch.inference_mode()
    def score(self, query_local: torch.Tensor, candidates: CandidateTokens, *,
              query_global: torch.Tensor | None = None, query_mask: torch.Tensor | None = None,
              batch_size: int = 100) -> torch.Tensor:
        """Logits (N,) float32 of one query (L, d) against embedded candidates."""
        query = self._query_part(query_local, query_global)
        n = len(candidates)
        scores = []
        for start in range(0, n, batch_size):
            part = candidates.select(slice(start, min(start + batch_size, n)))
            b = len(part)
            tokens = torch.cat([query[None].expand(b, -1, -1), part.tokens], dim=1)
            mask = self._attention_mask(b, query.shape[0], part.tokens.shape[1], query_mask, part.padding)
            scores.append(self._run(tokens, mask, batch_size))
        return torch.cat(scores) if scores else torch.zeros(0)

    def _attention_mask(self, b: int, n_query: int, n_cand: int, query_mask: torch.Tensor | None,
                        cand_padding: torch.Tensor | None) -> torch.Tensor | None:
        """(B, 1, 1, T) bool for SDPA (True = may attend) from the padding masks (True = padding)."""
        if query_mask is None and cand_padding is None:
            return None
        n_special = n_query - self.position.shape[0]
        q_pad = torch.zeros(b, n_query, dtype=torch.bool)
        if query_mask is not None:
            q_pad[:, n_special:] = query_mask.bool()[None]
        c_pad = cand_padding if cand_padding is not None else torch.zeros(b, n_cand, dtype=torch.bool)
        return (~torch.cat([q_pad, c_pad], dim=1))[:, None, None, :]


class _EncoderForward(nn.Module):
    """What ``torch.compile`` traces: tokens (and mask) -> logits with the scorer's weights,
    which dynamo sees as constants of the graph (so freezing can fold and prepack them)."""

    def __init__(self, scorer: FastRRTScorer) -> None:
        super().__init__()
        self.scorer = scorer  # a plain attribute: the scorer is not a Module

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.scorer._logits(tokens, mask)
