"""Attention over a `CompactLayer`, registered with transformers' `AttentionInterface` as "kvzap" and "kvzap_eager".

Rows of a compacted layer hold different entries, so the mask is per (batch, KV head) and is built here from the
layer's slot positions; transformers builds no mask for these names (they are not in `AttentionMaskInterface`).
Grouped-query attention runs on the KV heads directly: the query heads of a group are folded into the query
length, (B, H_q, q, d) -> (B, H_kv, n_rep * q, d), so keys and values are never repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .cache import CompactCache, CompactLayer

SDPA_NAME = "kvzap"
EAGER_NAME = "kvzap_eager"
CACHE_KWARG = "kvzap_cache"


def compact_mask(layer: CompactLayer, q: int) -> torch.Tensor:
    """(B, H_kv, q, L) bool: which slots each new query may attend to (causal, kept entries only)."""
    occupied = layer.positions >= 0
    if q == 1:
        return occupied[:, :, None, :]
    past = occupied[..., :-q]
    new = occupied[..., -q:]  # the q new tokens were appended in order; False where they are padding
    causal = torch.ones(q, q, dtype=torch.bool, device=occupied.device).tril_()
    diagonal = torch.eye(q, dtype=torch.bool, device=occupied.device)  # a padding query sees itself: no empty row
    new_block = (causal & new[:, :, None, :]) | diagonal
    b, h, _ = occupied.shape
    return torch.cat([past[:, :, None, :].expand(b, h, q, past.shape[-1]), new_block], dim=-1)


def _fold_heads(query: torch.Tensor, n_kv: int) -> torch.Tensor:
    b, h_q, q, d = query.shape
    return query.reshape(b, n_kv, (h_q // n_kv) * q, d)


def _unfold_heads(out: torch.Tensor, h_q: int, q: int) -> torch.Tensor:
    b, n_kv, _, d = out.shape
    return out.reshape(b, h_q, q, d).transpose(1, 2).contiguous()  # transformers expects (B, q, H_q, d)


def _tile_mask(mask: torch.Tensor, n_rep: int) -> torch.Tensor:
    if mask.shape[2] == 1 or n_rep == 1:
        return mask
    return mask.repeat(1, 1, n_rep, 1)  # rows ordered (r, i), matching the folded query


def _mask(module: torch.nn.Module, q: int, kv_len: int, device, kwargs: dict) -> torch.Tensor:
    """The layer's compact-cache mask, or a plain causal mask when the model runs without a compact cache."""
    cache = kwargs.get(CACHE_KWARG)
    if isinstance(cache, CompactCache):
        return compact_mask(cache.layers[module.layer_idx], q)
    return torch.ones(q, kv_len, dtype=torch.bool, device=device).tril_(kv_len - q)[None, None]


def _first_forward_mask(module: torch.nn.Module, q: int, kwargs: dict) -> torch.Tensor | None | bool:
    """For a forward with no past entries, every head sees the same keys: a (B, 1, q, q) mask, None (causal and
    no padding) or False when the layer holds a past (the per-head mask is needed)."""
    cache = kwargs.get(CACHE_KWARG)
    if not isinstance(cache, CompactCache):
        return None
    positions = cache.layers[module.layer_idx].positions
    if positions.shape[-1] != q:
        return False
    real = positions[:, 0, :] >= 0  # (B, q), the same for every head before any eviction
    if bool(real.all()):
        return None
    causal = torch.ones(q, q, dtype=torch.bool, device=real.device).tril_()
    diagonal = torch.eye(q, dtype=torch.bool, device=real.device)
    return ((causal & real[:, None, :]) | diagonal)[:, None]


def kvzap_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA over the kept entries of the layer's compact cache."""
    h_q, q, n_kv = query.shape[1], query.shape[2], key.shape[1]
    dropout_p = dropout if module.training else 0.0
    if q > 1:
        shared = _first_forward_mask(module, q, kwargs)
        if shared is not False:  # prefill: one mask for all heads, so the fused (causal) kernels apply
            out = F.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask=shared,
                is_causal=shared is None,
                dropout_p=dropout_p,
                scale=scaling,
                enable_gqa=h_q != n_kv,
            )
            return out.transpose(1, 2).contiguous(), None
    mask = _tile_mask(_mask(module, q, key.shape[-2], query.device, kwargs), h_q // n_kv)
    out = F.scaled_dot_product_attention(
        _fold_heads(query, n_kv), key, value, attn_mask=mask, dropout_p=dropout_p, scale=scaling
    )
    return _unfold_heads(out, h_q, q), None


def kvzap_eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager (explicit softmax) attention over the compact cache; also returns the probabilities (B, H_q, q, L)."""
    h_q, q, n_kv = query.shape[1], query.shape[2], key.shape[1]
    mask = _tile_mask(_mask(module, q, key.shape[-2], query.device, kwargs), h_q // n_kv)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(_fold_heads(query, n_kv), key.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value)
    b, _, _, length = probs.shape
    return _unfold_heads(out, h_q, q), probs.reshape(b, h_q, q, length)


def register() -> None:
    """Register both functions with transformers (idempotent)."""
    AttentionInterface.register(SDPA_NAME, kvzap_sdpa_attention)
    AttentionInterface.register(EAGER_NAME, kvzap_eager_attention)


def name_for(base_implementation: str | None) -> str:
    """The registered name that wraps a model's current attention implementation."""
    return EAGER_NAME if base_implementation == "eager" else SDPA_NAME
