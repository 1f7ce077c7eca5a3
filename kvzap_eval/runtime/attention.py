"""Attention over a `CompactLayer`'s ragged storage, registered with transformers' `AttentionInterface` as "kvzap"
(SDPA kernels) and "kvzap_eager" (explicit softmax, returns probabilities for the dense prefill).

- The first forward of a cache (the prefill) is dense: every head sees the same tokens, so one fused causal SDPA
  call (GQA inside the kernel) runs on the model's own tensors, with a (B, 1, q, q) mask only when there is padding.
- Later forwards (decode steps, prefill chunks, a question after a context) attend per (batch, KV head) row: the
  row's entries are one contiguous slice of the layer's arena, and the G query heads of its GQA group (x the q new
  tokens) are the queries of one SDPA call over it, so keys and values are never repeated, gathered or padded. A
  decode step needs no mask; a multi-token forward masks causally among its new tokens (they sit, in order, at the
  end of each row) and hides their padding.
- On CUDA in fp16/bf16, a later forward without padding is one `torch.nn.attention.varlen.varlen_attn` call per
  layer (flash varlen): each row is a key sequence (offsets = the region starts, `seqused_k` = its used slots) and
  its G query heads are the heads of its q queries; several new tokens attend causally (bottom-right aligned). The
  call needs `varlen_attn`'s `window_size` and `seqused_k` keywords; a torch whose `varlen_attn` has no `enable_gqa`
  (2.11) still serves decode steps, with the G query heads as G queries of a one-head sequence. A torch without
  what a forward needs takes the per-row path; a kernel that refuses falls back to it (remembered per device, with
  a warning).

Transformers builds no mask for these names (they are not in `AttentionMaskInterface`); the masks come from the
cache layer. Without a compact cache (a forward with use_cache=False) attention is plainly causal.
"""

from __future__ import annotations

import inspect
import warnings
from functools import cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .cache import CompactCache, CompactLayer

SDPA_NAME = "kvzap"
EAGER_NAME = "kvzap_eager"
CACHE_KWARG = "kvzap_cache"

#: device -> False once `varlen_attn` failed there (then the per-row path serves that device).
_VARLEN_FAILED: dict[torch.device, bool] = {}


def _layer_of(module: torch.nn.Module, kwargs: dict) -> CompactLayer | None:
    cache = kwargs.get(CACHE_KWARG)
    return cache.layers[module.layer_idx] if isinstance(cache, CompactCache) else None


# --- the dense first forward ---------------------------------------------------------------------------------------
def _dense_mask(layer: CompactLayer | None, q: int, kv_len: int, device) -> torch.Tensor | None:
    """(B, 1, q, kv) bool for the first forward: causal, padding hidden (a padding query sees itself); None when
    plainly causal over q == kv tokens (the fused kernels' `is_causal`)."""
    valid = layer.new_valid if layer is not None else None
    if valid is None:
        if q == kv_len:
            return None
        return torch.ones(q, kv_len, dtype=torch.bool, device=device).tril_(kv_len - q)[None, None]
    causal = torch.ones(q, q, dtype=torch.bool, device=device).tril_()
    diagonal = torch.eye(q, dtype=torch.bool, device=device)
    return ((causal & valid[:, None, :]) | diagonal)[:, None]


def _fold_heads(query: torch.Tensor, n_kv: int) -> torch.Tensor:
    b, h_q, q, d = query.shape
    return query.reshape(b, n_kv, (h_q // n_kv) * q, d)


def _dense_eager(query, key, value, mask, scaling, dropout, training):
    b, h_q, q, d = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    if mask is None:
        mask = torch.ones(q, kv_len, dtype=torch.bool, device=query.device).tril_()[None, None]
    mask = mask.repeat(1, 1, h_q // n_kv, 1)  # rows ordered (g, i), matching the folded query
    logits = torch.matmul(_fold_heads(query, n_kv), key.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    out = torch.matmul(probs, value).reshape(b, h_q, q, d)
    return out.transpose(1, 2).contiguous(), probs.reshape(b, h_q, q, kv_len)


# --- later forwards: per (batch, KV head) row ----------------------------------------------------------------------
def _new_token_mask(layer: CompactLayer, batch_row: int, q: int) -> torch.Tensor:
    """(q, q) bool among the new tokens of one batch row: causal, padding hidden, a padding query sees itself."""
    causal = torch.ones(q, q, dtype=torch.bool, device=layer.device).tril_()
    if layer.new_valid is None:
        return causal
    diagonal = torch.eye(q, dtype=torch.bool, device=layer.device)
    return (causal & layer.new_valid[batch_row][None, :]) | diagonal


def row_attention(
    layer: CompactLayer, query: torch.Tensor, scale: float, dropout_p: float = 0.0, eager: bool = False
) -> torch.Tensor:
    """(B, H_q, q, d) queries over each row's entries -> (B, q, H_q, d): one attention call per (batch, KV head)."""
    b, h_q, q, d = query.shape
    heads, rows = layer.heads, layer.rows
    group = h_q // heads
    queries = query.reshape(rows, 1, 1, group * q, d).unbind(0)  # row r = b * H + h; queries ordered (g, i)
    keys, values = layer.keys[None, None], layer.values[None, None]
    starts, counts = torch.stack((layer.start, layer.count)).tolist()
    new_masks: dict[int, torch.Tensor] = {}
    outs = []
    for r in range(rows):
        s, c = starts[r], counts[r]
        mask = None
        if q > 1:
            batch_row = r // heads
            if batch_row not in new_masks:
                new_masks[batch_row] = _new_token_mask(layer, batch_row, q)
            past = torch.ones(q, c - q, dtype=torch.bool, device=query.device)
            mask = torch.cat((past, new_masks[batch_row]), dim=1).repeat(group, 1)
        k, v = keys[:, :, s : s + c], values[:, :, s : s + c]
        if eager:
            outs.append(_eager_row(queries[r], k, v, mask, scale, dropout_p))
        else:
            outs.append(F.scaled_dot_product_attention(queries[r], k, v, mask, dropout_p, scale=scale))
    out = torch.cat(outs, dim=0)  # (R, 1, G * q, d)
    return out.view(b, h_q, q, d).transpose(1, 2)


def _gathered_mask(layer: CompactLayer, q: int, slots: torch.Tensor) -> torch.Tensor:
    """(R, q, W) bool over each row's `slots` (0..W-1) gathered into the rectangle of width W = the longest region:
    the row's entries, and among its last q (the new tokens) causal with padding hidden, a padding query seeing
    itself (what `row_attention` masks row by row)."""
    counts = layer.count[:, None]  # (R, 1)
    if q == 1:
        return (slots[None, :] < counts)[:, None, :]
    new = (slots[None, :] - (counts - q))[:, None, :]  # (R, 1, W): index among the new tokens (< 0: older)
    query_index = torch.arange(q, device=layer.device)[None, :, None]  # (1, q, 1)
    seen = (new >= 0) & (new <= query_index)
    if layer.new_valid is not None:
        batch_row = torch.arange(layer.rows, device=layer.device) // layer.heads
        valid = layer.new_valid[batch_row].gather(1, new[:, 0].clamp(0, q - 1))[:, None, :]  # (R, 1, W)
        seen = seen & valid
    return (new < 0) | seen | (new == query_index)


def gathered_attention(layer: CompactLayer, query: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """(B, H_q, q, d) queries over each row's entries -> (B, q, H_q, d) in one SDPA call: the rows gathered into a
    (rows, longest region) rectangle with a mask. A fixed number of kernels whatever the batch, where
    `row_attention` launches a few per (batch, KV head) row: the path for CUDA where flash varlen does not serve
    (fp32, padding); on CPU the per-row calls are cheaper than the gather (README, "Ragged KV storage")."""
    b, h_q, q, d = query.shape
    rows, width = layer.rows, layer.longest_region
    group = h_q // layer.heads
    slots = torch.arange(width, device=layer.device)
    index = (layer.start[:, None] + slots[None, :]).clamp_(max=layer.keys.shape[0] - 1)  # (R, W)
    keys, values = layer.keys[index][:, None], layer.values[index][:, None]  # (R, 1, W, d)
    mask = _gathered_mask(layer, q, slots).repeat(1, group, 1)[:, None]  # (R, 1, G * q, W), queries ordered (g, i)
    queries = query.reshape(rows, 1, group * q, d)
    out = F.scaled_dot_product_attention(queries, keys, values, mask, dropout_p, scale=scale)
    return out.view(b, h_q, q, d).transpose(1, 2)


def _eager_row(query, key, value, mask, scale, dropout_p):
    logits = torch.matmul(query, key.transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(F.dropout(probs, p=dropout_p, training=dropout_p > 0), value)


@cache
def varlen_keywords() -> frozenset[str]:
    """The keyword arguments of this torch's `varlen_attn` (empty without one)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_serves(q: int) -> bool:
    """Whether this torch's `varlen_attn` can take a forward of q new tokens per row: it must skip each region's
    unused slots (`seqused_k`) and mask causally (`window_size`); without `enable_gqa` only a decode step (q == 1)
    can fold its G query heads into one head."""
    keywords = varlen_keywords()
    return {"seqused_k", "window_size"} <= keywords and ("enable_gqa" in keywords or q == 1)


def varlen_attention(layer: CompactLayer, query: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H_q, q, d) queries over each row's entries -> (B, q, H_q, d) in one flash varlen call (CUDA only)."""
    from torch.nn.attention.varlen import varlen_attn

    b, h_q, q, d = query.shape
    heads, rows = layer.heads, layer.rows
    group = h_q // heads
    queries = query.reshape(b, heads, group, q, d).permute(0, 1, 3, 2, 4).reshape(rows * q, group, d)
    gqa = {"enable_gqa": True} if "enable_gqa" in varlen_keywords() else {}
    per_row = q
    if not gqa:  # a decode step: the row's G query heads are G queries of one head, none masked
        queries, per_row = queries.reshape(rows * group, 1, d), group
    cu_q = torch.arange(0, (rows + 1) * per_row, per_row, dtype=torch.int32, device=query.device)
    ends = layer.start.new_full((1,), layer.keys.shape[0])
    cu_k = torch.cat((layer.start, ends)).to(torch.int32)
    out = varlen_attn(
        queries,
        layer.keys[:, None],
        layer.values[:, None],
        cu_q,
        cu_k,
        per_row,
        layer.longest_region,
        scale=scale,
        window_size=(-1, 0) if q > 1 else (-1, -1),
        seqused_k=layer.count.to(torch.int32),
        **gqa,
    )
    return out.view(b, heads, q, group, d).permute(0, 2, 1, 3, 4).reshape(b, q, h_q, d)


def _varlen_fits(layer: CompactLayer, query: torch.Tensor) -> bool:
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and layer.new_valid is None
        and not _VARLEN_FAILED.get(query.device, False)
        and varlen_serves(query.shape[2])
    )


def ragged_attention(layer: CompactLayer, query: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """The SDPA path of a later forward: flash varlen where it fits, else on CUDA one SDPA over the gathered rows,
    on CPU one SDPA call per row."""
    if _varlen_fits(layer, query):
        try:
            return varlen_attention(layer, query, scale)
        except (ImportError, NotImplementedError, RuntimeError, TypeError) as exc:
            _VARLEN_FAILED[query.device] = True
            warnings.warn(
                f"varlen_attn unavailable on {query.device} ({exc}); attending per (batch, KV head) row", stacklevel=2
            )
    if query.is_cuda:
        return gathered_attention(layer, query, scale, dropout_p)
    return row_attention(layer, query, scale, dropout_p)


# --- the registered functions --------------------------------------------------------------------------------------
def kvzap_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA over the kept entries of the layer's compact cache."""
    layer = _layer_of(module, kwargs)
    dropout_p = dropout if module.training else 0.0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer is not None and not layer.dense_forward:
        return ragged_attention(layer, query, scale, dropout_p), None
    h_q, q, n_kv = query.shape[1], query.shape[2], key.shape[1]
    mask = _dense_mask(layer, q, key.shape[2], query.device)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        is_causal=mask is None and q > 1,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=h_q != n_kv,
    )
    return out.transpose(1, 2).contiguous(), None


def kvzap_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager (explicit softmax) attention over the compact cache; the dense prefill also returns its probabilities
    (B, H_q, q, q). Later forwards return none: rows hold different entries, in storage order."""
    layer = _layer_of(module, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if layer is not None and not layer.dense_forward:
        return row_attention(layer, query, scale, dropout if module.training else 0.0, eager=True), None
    mask = _dense_mask(layer, query.shape[2], key.shape[2], query.device)
    return _dense_eager(query, key, value, mask, scale, dropout, module.training)


def register() -> None:
    """Register both functions with transformers (idempotent)."""
    AttentionInterface.register(SDPA_NAME, kvzap_sdpa_attention)
    AttentionInterface.register(EAGER_NAME, kvzap_eager_attention)


def name_for(base_implementation: str | None) -> str:
    """The registered name that wraps a model's current attention implementation."""
    return EAGER_NAME if base_implementation == "eager" else SDPA_NAME
