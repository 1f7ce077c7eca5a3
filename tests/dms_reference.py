"""An independent, masking-based DMS reference for the tests (the way kvpress does it, written from its semantics).

A stock `DynamicCache` keeps every entry; a score buffer per layer holds the undecided tokens; tokens leaving the
window are decided with `score < threshold`, and the decided (batch, kv_head, position) triples are masked out
of every later forward by a registered attention function. Nothing here shares code with `kvzap_eval`'s cache,
attention or policy modules, so agreement between the two is evidence, not tautology.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

REF_NAME = "kvzap_reference"


class MaskingDMS:
    def __init__(self, scorer, threshold: float, window: int, decoding: bool = True):
        self.scorer = scorer  # (layer_idx, hidden_states) -> (B, H, q)
        self.threshold = threshold
        self.window = window
        self.decoding = decoding
        self.buffers: dict[int, torch.Tensor] = {}
        self.evicted: dict[int, torch.Tensor] = {}  # layer -> (B, H, L) bool, grows with the cache
        self.kernel = "sdpa"

    def hook(self, module, args, kwargs, output):
        layer_idx = module.layer_idx
        hidden_states = kwargs["hidden_states"]
        cache = kwargs.get("cache")
        if cache is None:  # transformers < 5.19 passes it as `past_key_values`
            cache = kwargs.get("past_key_values")
        q = hidden_states.shape[1]
        cache_len = cache.layers[layer_idx].keys.shape[-2]
        prefilling = cache_len == q
        if not prefilling and q == 1 and not self.decoding:
            return output
        scores = self.scorer(layer_idx, hidden_states).float()
        b, h, _ = scores.shape
        evicted = self.evicted.get(layer_idx)
        if evicted is None or prefilling:
            evicted = torch.zeros(b, h, 0, dtype=torch.bool)
            self.buffers[layer_idx] = scores
        else:
            self.buffers[layer_idx] = torch.cat([self.buffers[layer_idx], scores], dim=-1)
        evicted = torch.cat([evicted, torch.zeros(b, h, cache_len - evicted.shape[-1], dtype=torch.bool)], dim=-1)
        buffer = self.buffers[layer_idx]
        if buffer.shape[-1] > self.window:
            n = buffer.shape[-1] - self.window
            leaving, self.buffers[layer_idx] = buffer[..., :n], buffer[..., n:]
            bi, hi, ti = torch.where(leaving < self.threshold)
            evicted[bi, hi, ti + cache_len - n - self.window] = True
        self.evicted[layer_idx] = evicted
        return output

    def attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        b, h_q, q, d = query.shape
        n_kv, length = key.shape[1], key.shape[2]
        n_rep = h_q // n_kv
        if attention_mask is None:
            attention_mask = torch.ones(q, length, dtype=torch.bool).tril_(length - q)[None, None]
        allowed = attention_mask.bool().expand(b, 1, q, length)
        evicted = self.evicted.get(module.layer_idx)
        if evicted is not None:
            past = torch.zeros(b, n_kv, length, dtype=torch.bool)
            past[..., : evicted.shape[-1]] = evicted[..., :length]
            allowed = allowed & ~past.repeat_interleave(n_rep, dim=1)[:, :, None, :]
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
        if self.kernel == "sdpa":
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
        else:
            logits = (query @ key.transpose(-1, -2)) * scaling
            logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
            out = torch.softmax(logits, -1, dtype=torch.float32).to(query.dtype) @ value
        return out.transpose(1, 2).contiguous(), None

    def evicted_triples(self, layer_idx: int, real: torch.Tensor | None = None) -> set[tuple[int, int, int]]:
        """(batch, head, position) triples evicted so far; padding positions excluded when `real` (B, L) given."""
        evicted = self.evicted[layer_idx]
        if real is not None:
            evicted = evicted & real[:, None, : evicted.shape[-1]]
        return {tuple(t) for t in torch.nonzero(evicted).tolist()}


@contextmanager
def masking_dms(model, reference: MaskingDMS, kernel: str = "sdpa"):
    """Run `model` with the masking reference (stock DynamicCache, evicted entries masked in later forwards)."""
    reference.kernel = kernel
    AttentionInterface.register(REF_NAME, reference.attention)
    AttentionMaskInterface.register(REF_NAME, lambda *a, **k: sdpa_mask(*a, **{**k, "allow_is_causal_skip": False}))
    previous = model.config._attn_implementation
    model.set_attn_implementation(REF_NAME)
    handles = [
        m.register_forward_hook(reference.hook, with_kwargs=True)
        for name, m in model.named_modules()
        if name.endswith("self_attn")
    ]
    try:
        yield reference
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
