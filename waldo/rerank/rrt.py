"""Reranking Transformer (RRT, "MatchERT"): scores a (query, candidate) pair from local descriptors.

Faithful to the reference SOP reranker: a post-norm transformer encoder (6 layers, 4 heads,
d_model 128, feed-forward 1024, dropout 0, ReLU, Xavier-uniform init) over the sequence

    [CLS] + query locals (L) + [SEP] + candidate locals (L)          (100 tokens for L = 49)

with a 4-row segment embedding (CLS = 0, SEP = 1, query = 2, candidate = 3) and a DETR-style 2-D
sine position embedding shared by query and candidate. The CLS output goes through
Linear(d_model, 1) to one logit per pair (train it with BCE-with-logits).

Option (off by default, the reference SOP model does not use it): ``use_global_tokens`` inserts
each image's global descriptor as one extra token right after CLS (query) and right after SEP
(candidate), with two extra segment rows (query global = 4, candidate global = 5) and no position:

    [CLS, query global, query locals, SEP, candidate global, candidate locals]   (2L + 4 tokens)

Option ``global_skip`` (needs ``use_global_tokens``; Waldo's, not the reference's): a residual
path from the global similarity straight to the logit,

    logit = classifier(CLS output) + global_skip_scale * (query_global . candidate_global)

with the classifier's weight zero at init, so an untrained model ranks exactly as global search
does and training learns only what the local descriptors add. ``global_skip_from`` says which
global similarity the residual reads: ``"token"`` (the default; older files) the global tokens
themselves, ``"descriptor"`` the model's own global descriptor (``query_skip`` / ``cand_skip``),
which may be wider than the tokens (e.g. a trained 512-d learned whitening, whose tokens are the
locals' 128-d mean): then an untrained RRT ranks exactly as the *serving* global search does,
not as the weaker token similarity. Without it the transformer must
rediscover the global similarity from scratch; trained on few identities it does not (the seed's
RRT alone dropped grocery-open-cross R@1 0.85 -> 0.51), and it has no way to stay at the global
ranking where its local evidence is weak.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

SEGMENT_CLS = 0
SEGMENT_SEP = 1
SEGMENT_QUERY = 2
SEGMENT_CANDIDATE = 3
SEGMENT_QUERY_GLOBAL = 4  # only with use_global_tokens
SEGMENT_CANDIDATE_GLOBAL = 5  # only with use_global_tokens


class RRTConfig(BaseModel):
    """Hyper-parameters of the reranker; the defaults are the reference SOP model (~1.98M params).
    Saved in ``rrt.json`` (see waldo.rerank.rrt_checkpoint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d_model: int = 128  # must equal the local (and global) descriptor dim: there is no input projection
    n_layers: int = Field(6, ge=1)
    n_heads: int = 4
    ff_dim: int = Field(1024, ge=1)
    dropout: float = 0.0
    activation: Literal["relu", "gelu"] = "relu"
    norm_first: bool = False  # post-norm, as the reference (DETR) encoder
    use_global_tokens: bool = False
    global_skip: bool = False  # residual global-similarity path to the logit (see module doc)
    global_skip_init: float = 10.0  # its initial scale (a logit range of ~10 across cosines 0..1)
    global_skip_from: Literal["token", "descriptor"] = "token"  # which similarity the residual reads (module doc)
    match_skip: bool = False  # residual from the share of mutually matched cells (module doc)
    match_skip_threshold: float = Field(0.7, ge=-1.0, lt=1.0)  # the cosine a mutual pair of cells must exceed
    match_skip_init: float = 5.0  # its initial scale; / global_skip_init = the rule's weight on the share
    pos_scale: float = 2.0  # normalised coordinates in (0, pos_scale]; the reference uses 2, not 2*pi
    pos_temperature: float = 10000.0

    @model_validator(mode="after")
    def _heads_and_sine_pairs_fit(self) -> RRTConfig:
        if self.d_model % 4 != 0:
            raise ValueError(f"d_model must be a multiple of 4 (sin/cos pairs per axis), got {self.d_model}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.global_skip and not self.use_global_tokens:
            raise ValueError("global_skip needs use_global_tokens (the model reads the global descriptors)")
        if self.global_skip_from != "token" and not self.global_skip:
            raise ValueError("global_skip_from needs global_skip")
        return self


def sine_position_embedding(
    grid: tuple[int, int], dim: int, *, scale: float = 2.0, temperature: float = 10000.0
) -> torch.Tensor:
    """DETR's 2-D sine position embedding of every cell of an (h, w) grid, in row-major order.

    Returns (h*w, dim) float32. Channels [0, dim/2) encode the row and [dim/2, dim) the column
    (DETR's ``cat(pos_y, pos_x)``); within each half, channel pairs (2j, 2j+1) are
    (sin, cos)(coord / temperature**(2j / (dim/2))), so there are dim/4 frequencies per axis.
    Coordinates are normalised as DETR does with ``normalize=True``: (index + 1) / size * scale
    (DETR's 1e-6 in the denominator is left out; it changes nothing measurable).
    """
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    half = dim // 2
    rows = (torch.arange(h, dtype=torch.float32) + 1) / h * scale
    cols = (torch.arange(w, dtype=torch.float32) + 1) / w * scale
    dim_t = temperature ** (2 * torch.div(torch.arange(half), 2, rounding_mode="floor") / half)

    def encode(coord: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, half)
        angles = coord[:, None] / dim_t
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(rows)[:, None, :].expand(h, w, half)
    pos_x = encode(cols)[None, :, :].expand(h, w, half)
    return torch.cat((pos_y, pos_x), dim=2).reshape(h * w, dim)


class RerankingTransformer(nn.Module):
    """Pairwise reranker over local descriptors. See the module docstring for the token layout."""

    def __init__(self, config: RRTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or RRTConfig()
        n_segments = 6 if config.use_global_tokens else 4
        self.segment_embedding = nn.Embedding(n_segments, config.d_model)
        # Independent layers (not nn.TransformerEncoder) so no nested-tensor conversion happens:
        # every token keeps its output, and eval on CPU still uses PyTorch's fused fast path.
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                config.d_model, config.n_heads, dim_feedforward=config.ff_dim, dropout=config.dropout,
                activation=config.activation, batch_first=True, norm_first=config.norm_first,
            )
            for _ in range(config.n_layers)
        )
        # Pre-norm leaves the residual stream unnormalised, so it needs a final norm; post-norm
        # (the reference) already ends every layer with one.
        self.final_norm = nn.LayerNorm(config.d_model) if config.norm_first else nn.Identity()
        self.classifier = nn.Linear(config.d_model, 1)
        for parameter in self.parameters():
            if parameter.dim() > 1:  # every weight matrix, embeddings included (DETR/RRT init)
                nn.init.xavier_uniform_(parameter)
        if config.global_skip:
            # A parameter only when enabled: the reference's state dict keeps exactly its keys.
            self.global_skip_scale = nn.Parameter(torch.tensor(float(config.global_skip_init)))
            nn.init.zeros_(self.classifier.weight)  # start as global search (see module doc)
        if config.match_skip:
            self.match_skip_scale = nn.Parameter(torch.tensor(float(config.match_skip_init)))
            nn.init.zeros_(self.classifier.weight)  # start as the training-free rule (see module doc)

    def match_logit(self, query_local: torch.Tensor, cand_local: torch.Tensor,
                    query_mask: torch.Tensor | None = None, cand_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """The residual ``match_skip_scale * mutual_match_share`` per pair (query (B, L, D) or (L, D)
        against (B, M, D)); None when the model has no match skip."""
        if not self.config.match_skip:
            return None
        if query_local.ndim == 2:
            query_local = query_local[None].expand(cand_local.shape[0], -1, -1)
            query_mask = None if query_mask is None else query_mask[None].expand(cand_local.shape[0], -1)
        share = mutual_match_share(query_local, cand_local, self.config.match_skip_threshold,
                                   query_mask=query_mask, cand_mask=cand_mask)
        return self.match_skip_scale.to(share.dtype) * share

    def skip_logit(self, query_global: torch.Tensor | None, cand_global: torch.Tensor | None) -> torch.Tensor | None:
        """The residual ``global_skip_scale * (query_global . cand_global)`` per pair (both (B, D)
        or query (D,) against (B, D)); None when the model has no global skip."""
        if not self.config.global_skip:
            return None
        if query_global is None or cand_global is None:
            raise ValueError("global_skip is set: query_global and cand_global are required")
        return self.global_skip_scale.to(cand_global.dtype) * (cand_global * query_global).sum(-1)

    @property
    def skips_on_descriptor(self) -> bool:
        """True when the residual reads the model's global descriptor (``query_skip`` /
        ``cand_skip``), not the global tokens."""
        return self.config.global_skip and self.config.global_skip_from == "descriptor"

    def skip_inputs(self, query_global: torch.Tensor | None, cand_global: torch.Tensor | None,
                    query_skip: torch.Tensor | None, cand_skip: torch.Tensor | None
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The pair of global descriptors the residual reads: the tokens, or with
        ``global_skip_from="descriptor"`` the model's descriptors (required then)."""
        if not self.skips_on_descriptor:
            return query_global, cand_global
        if query_skip is None or cand_skip is None:
            raise ValueError('global_skip_from="descriptor": query_skip and cand_skip (the model\'s global '
                             'descriptors) are required')
        return query_skip, cand_skip

    def _local_tokens(self, local: torch.Tensor, mask: torch.Tensor | None, segment: int,
                      position: torch.Tensor, name: str) -> torch.Tensor:
        """(B, L, D) locals -> (B, L, D) tokens = locals + segment row + position of the cell.

        Tokens past the grid's h*w cells get no position; they must be padding (checked).
        """
        if local.ndim != 3 or local.shape[2] != self.config.d_model:
            raise ValueError(f"{name}_local must be (B, L, {self.config.d_model}), got {tuple(local.shape)}")
        n_tokens, n_cells = local.shape[1], position.shape[0]
        if n_tokens < n_cells:
            raise ValueError(f"{name}_local has {n_tokens} tokens but the grid has {n_cells} cells")
        if mask is not None and mask.shape != local.shape[:2]:
            raise ValueError(f"{name}_mask must be {tuple(local.shape[:2])}, got {tuple(mask.shape)}")
        if n_tokens > n_cells:
            if mask is None or not bool(mask[:, n_cells:].all()):
                raise ValueError(f"{name}_local tokens past the grid's {n_cells} cells must be "
                                 f"marked as padding in {name}_mask")
            position = nn.functional.pad(position, (0, 0, 0, n_tokens - n_cells))
        bias = self.segment_embedding.weight[segment] + position  # (L, D)
        return local + bias.to(local.dtype)

    def _global_token(self, global_desc: torch.Tensor | None, batch: int, segment: int,
                      name: str) -> torch.Tensor:
        """(B, D) global descriptor -> (B, 1, D) token = descriptor + its segment row."""
        if global_desc is None:
            raise ValueError(f"use_global_tokens is set: {name}_global is required")
        if global_desc.shape != (batch, self.config.d_model):
            raise ValueError(f"{name}_global must be ({batch}, {self.config.d_model}), "
                             f"got {tuple(global_desc.shape)}")
        return (global_desc + self.segment_embedding.weight[segment].to(global_desc.dtype))[:, None]

    def embed(
        self,
        query_local: torch.Tensor,
        cand_local: torch.Tensor,
        *,
        query_mask: torch.Tensor | None = None,
        cand_mask: torch.Tensor | None = None,
        query_global: torch.Tensor | None = None,
        cand_global: torch.Tensor | None = None,
        grid: tuple[int, int] = (7, 7),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Build the input sequence of :meth:`forward`.

        query_local (B, Lq, D), cand_local (B, Lc, D): float locals (D = d_model), not normalised.
        Token i < h*w sits at grid cell (i // w, i % w) of ``grid`` (the same grid for the whole
        batch); tokens past h*w must be padding.
        query_mask (B, Lq), cand_mask (B, Lc): bool, True = padding (ignored by attention, so it
        does not change the logit). query_global, cand_global (B, D): only with use_global_tokens.

        Returns tokens (B, T, d_model) in the locals' dtype, T = Lq + Lc + 2 (+2 with global
        tokens), and the key padding mask (B, T) bool (True = padding), or None when no mask is
        given. CLS is token 0.
        """
        batch = query_local.shape[0]
        if cand_local.shape[0] != batch:
            raise ValueError(f"query and candidate batch sizes differ: {batch} vs {cand_local.shape[0]}")
        position = sine_position_embedding(
            grid, self.config.d_model, scale=self.config.pos_scale, temperature=self.config.pos_temperature
        ).to(query_local.device)
        weight = self.segment_embedding.weight.to(query_local.dtype)
        query_tokens = self._local_tokens(query_local, query_mask, SEGMENT_QUERY, position, "query")
        cand_tokens = self._local_tokens(cand_local, cand_mask, SEGMENT_CANDIDATE, position, "cand")
        cls = weight[SEGMENT_CLS].expand(batch, 1, -1)
        sep = weight[SEGMENT_SEP].expand(batch, 1, -1)
        if self.config.use_global_tokens:
            query_part = [self._global_token(query_global, batch, SEGMENT_QUERY_GLOBAL, "query"), query_tokens]
            cand_part = [self._global_token(cand_global, batch, SEGMENT_CANDIDATE_GLOBAL, "cand"), cand_tokens]
        else:
            if query_global is not None or cand_global is not None:
                raise ValueError("global descriptors were given but use_global_tokens is off")
            query_part, cand_part = [query_tokens], [cand_tokens]
        tokens = torch.cat([cls, *query_part, sep, *cand_part], dim=1)
        if query_mask is None and cand_mask is None:
            return tokens, None
        n_special = 2 if self.config.use_global_tokens else 1  # CLS/SEP (+ global) are never padding
        keep = torch.zeros(batch, n_special, dtype=torch.bool, device=tokens.device)

        def as_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
            return torch.zeros(like.shape[:2], dtype=torch.bool, device=like.device) if mask is None else mask.bool()

        padding = torch.cat([keep, as_mask(query_mask, query_local), keep, as_mask(cand_mask, cand_local)], 1)
        return tokens, padding

    def forward(self, query_local: torch.Tensor, cand_local: torch.Tensor, *, query_skip: torch.Tensor | None = None,
                cand_skip: torch.Tensor | None = None, **inputs: Any) -> torch.Tensor:
        """Score pairs: one logit per (query_local[b], cand_local[b]); higher = more likely a match.
        ``inputs``: the masks, global descriptors and grid, as :meth:`embed` takes them;
        ``query_skip`` / ``cand_skip`` (B, G): the model's global descriptors, read by the residual
        only with ``global_skip_from="descriptor"``. Returns logits (B,) in the locals' dtype."""
        tokens, padding = self.embed(query_local, cand_local, **inputs)
        for layer in self.layers:
            tokens = layer(tokens, src_key_padding_mask=padding)
        logits = self.classifier(self.final_norm(tokens[:, 0])).squeeze(-1)
        skip = self.skip_logit(*self.skip_inputs(inputs.get("query_global"), inputs.get("cand_global"),
                                                 query_skip, cand_skip))
        if skip is not None:
            logits = logits + skip.to(logits.dtype)
        match = self.match_logit(query_local, cand_local, inputs.get("query_mask"), inputs.get("cand_mask"))
        return logits if match is None else logits + match.to(logits.dtype)

    def score_candidates(self, query_local: torch.Tensor, cand_locals: torch.Tensor, *,
                         query_mask: torch.Tensor | None = None, cand_masks: torch.Tensor | None = None,
                         query_global: torch.Tensor | None = None, cand_globals: torch.Tensor | None = None,
                         query_skip: torch.Tensor | None = None, cand_skips: torch.Tensor | None = None,
                         grid: tuple[int, int] = (7, 7), batch_size: int = 100) -> torch.Tensor:
        """Score one query against N candidates (e.g. its global top-100), ``batch_size`` per pass.

        query_local (L, D), query_mask (L,), query_global (D,); cand_locals (N, L', D),
        cand_masks (N, L'), cand_globals (N, D); query_skip (G,), cand_skips (N, G) with
        ``global_skip_from="descriptor"``. Returns logits (N,) float32 on the inputs' device.
        Runs in eval mode under inference_mode (restoring the previous mode), so it is
        deterministic and uses PyTorch's fused CPU encoder path.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n_cands = cand_locals.shape[0]
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                scores = []
                for start in range(0, n_cands, batch_size):
                    stop = min(start + batch_size, n_cands)
                    n = stop - start
                    # expand: the query is a stride-0 view per batch, not n copies.
                    scores.append(self(
                        query_local[None].expand(n, -1, -1), cand_locals[start:stop],
                        query_mask=None if query_mask is None else query_mask[None].expand(n, -1),
                        cand_mask=None if cand_masks is None else cand_masks[start:stop],
                        query_global=None if query_global is None else query_global[None].expand(n, -1),
                        cand_global=None if cand_globals is None else cand_globals[start:stop],
                        query_skip=None if query_skip is None else query_skip[None].expand(n, -1),
                        cand_skip=None if cand_skips is None else cand_skips[start:stop],
                        grid=grid,
                    ).float())
        finally:
            self.train(was_training)
        if not scores:
            return torch.zeros(0, dtype=torch.float32, device=cand_locals.device)
        return torch.cat(scores)


@torch.no_grad()
def mutual_match_share(query_local: torch.Tensor, cand_local: torch.Tensor, threshold: float, *,
                       query_mask: torch.Tensor | None = None, cand_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float32: per pair, the share of the query's (unpadded) cells whose nearest candidate
    cell (cosine) has that query cell as its own nearest, with a cosine above ``threshold``.
    query_local (B, L, D), cand_local (B, M, D); masks (B, L) / (B, M) bool, True = padding.
    The same count as waldo.rerank.local_match.mutual_match_share (numpy), batched over pairs."""
    if query_local.ndim != 3 or cand_local.ndim != 3 or query_local.shape[0] != cand_local.shape[0] \
            or query_local.shape[2] != cand_local.shape[2]:
        raise ValueError(f"mutual_match_share needs (B, L, D) and (B, M, D) locals, got "
                         f"{tuple(query_local.shape)} and {tuple(cand_local.shape)}")
    batch, n_query = query_local.shape[:2]
    if batch == 0 or n_query == 0 or cand_local.shape[1] == 0:
        return torch.zeros(batch, dtype=torch.float32, device=query_local.device)
    query = nn.functional.normalize(query_local.float(), dim=-1, eps=1e-6)
    cand = nn.functional.normalize(cand_local.float(), dim=-1, eps=1e-6)
    sims = torch.bmm(cand, query.transpose(1, 2))  # (B, M, L): candidate cell x query cell
    if cand_mask is not None:
        sims = sims.masked_fill(cand_mask.bool()[:, :, None], float("-inf"))
    if query_mask is not None:
        sims = sims.masked_fill(query_mask.bool()[:, None, :], float("-inf"))
    cosine, best_cand = sims.max(1)  # (B, L): each query cell's nearest candidate cell
    best_query = sims.argmax(2)  # (B, M): each candidate cell's nearest query cell
    mutual = best_query.gather(1, best_cand) == torch.arange(n_query, device=sims.device)[None]
    matched = mutual & (cosine > threshold)
    if query_mask is None:
        return matched.float().mean(1)
    keep = ~query_mask.bool()
    return (matched & keep).sum(1).float() / keep.sum(1).clamp(min=1).float()


def flops_per_pair(config: RRTConfig, n_locals: int = 49) -> float:
    """Analytic matmul FLOPs (2 x multiply-adds) to score one pair with ``n_locals`` per image.

    Per layer, with T tokens: Q/K/V projections 3*T*d^2, scores T^2*d, weighted values T^2*d,
    output projection T*d^2, feed-forward 2*T*d*ff; plus d for the classifier. Softmax,
    LayerNorm, residual adds and activations are O(T*d) elementwise work and are left out (well
    under 1%). Defaults (T = 100): 423,936,256 FLOPs = 0.424 GFLOP, matching the reference's
    "about 0.42 GFLOP", about 93% of it in the feed-forward and projections. Only the CLS output
    is read, so the last layer could skip all non-CLS queries and feed-forwards (~15% fewer);
    this implementation does not.
    """
    n_tokens = 2 * n_locals + (4 if config.use_global_tokens else 2)
    d, ff = config.d_model, config.ff_dim
    macs_per_layer = 4 * n_tokens * d * d + 2 * n_tokens * n_tokens * d + 2 * n_tokens * d * ff
    return float(2 * (config.n_layers * macs_per_layer + d))
