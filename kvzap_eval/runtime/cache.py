"""A transformers KV cache that stores only the entries a policy keeps, so the bytes held follow the kept count.

Each layer holds rectangular tensors (B, H_kv, L, d) whose L "slots" are shared by all (batch, head) rows. A slot
is either occupied by one cached token or free. `positions[b, h, s]` is the logical position (the token's index in
the padded input sequence) of the entry in slot s, or -1 when the slot is free. Evicting an entry frees its slot:

- after a forward of several tokens (prefill, a chunk, a question) the layer is compacted: kept entries are
  gathered to the front of each row and L shrinks to the longest row, so memory is really released;
- after a decode step the freed slot is simply reused by the next token of that row, so decoding never copies
  the cache (a stock `DynamicCache` concatenates, i.e. copies, every step).

RoPE is applied before caching, so entries never need their positions again for attention; the positions serve
the causal mask, the policies (window, sinks) and the statistics. `get_seq_length()` returns the logical count of
tokens seen (what `generate` and position ids need) and `get_mask_sizes()` the physical length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .stats import CompressionStats, LayerStats

#: Columns added at once when a decode step finds a row with no free slot (amortises reallocation).
DECODE_GROWTH = 8


class CompactLayer(DynamicLayer):
    """One decoder layer's cache: keys/values plus per-slot logical positions and pending policy scores."""

    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.positions: torch.Tensor | None = None  # (B, H, L) int64, -1 = free slot
        self.pending: torch.Tensor | None = None  # (B, H, L) float32 scores awaiting a decision, +inf = none
        self.new_slots: torch.Tensor | None = None  # slots written by the last update: (B, H, q) int64
        self.new_token_index: torch.Tensor | None = None  # last update's tokens: index among real tokens, -1 = pad
        self.cumulative_length = 0  # logical tokens seen, padding included
        self.real_tokens: torch.Tensor | None = None  # (B,) non-padding tokens seen (kept + evicted, per head)
        self.decided_upto = 0  # every token at a logical position below this has been decided by the policy

    # --- transformers cache-layer contract -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_zeros(b, h, 0, d)
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.positions = torch.empty(b, h, 0, dtype=torch.long, device=self.device)
        self.real_tokens = torch.zeros(b, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args,
        valid_new: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store q new tokens; `valid_new` (B, q) is False for padding, which is never kept."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        if q == 1 and valid_new is None and self.keys.shape[-2] > 0:
            self._decode_step(key_states, value_states)
            return self.keys, self.values
        positions = self.cumulative_length + torch.arange(q, device=self.device).expand(b, q)
        if valid_new is None:
            self.new_token_index = self.real_tokens[:, None] + torch.arange(q, device=self.device)
            self.real_tokens += q
        else:
            valid_new = valid_new.to(self.device, torch.bool)
            positions = positions.masked_fill(~valid_new, -1)
            index = self.real_tokens[:, None] + valid_new.cumsum(-1) - 1
            self.new_token_index = index.masked_fill(~valid_new, -1)
            self.real_tokens += valid_new.sum(-1)
        self._append(key_states, value_states, positions[:, None, :].expand(b, h, q))
        self.cumulative_length += q
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Physical: the tensors `update` returns already include the new tokens.
        stored = 0 if self.keys is None else self.keys.shape[-2]
        return stored + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("a compacted KV cache cannot be cropped (assisted decoding is not supported)")

    def reset(self) -> None:
        self.__init__()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx.to(self.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            index = torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats)
            self._select_batch(index)

    def offload(self) -> None:
        super().offload()
        if self.is_initialized:
            self._map_slot_tensors(lambda t: t.to("cpu", non_blocking=True), keys_values=False)

    def prefetch(self) -> None:
        super().prefetch()
        if self.is_initialized and self.positions.device != self.device:
            self._map_slot_tensors(lambda t: t.to(self.device, non_blocking=True), keys_values=False)

    # --- slot management ---------------------------------------------------------------------------------------
    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor) -> None:
        start = self.keys.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, positions], dim=-1)
        if self.pending is not None:
            self.pending = torch.cat([self.pending, self.pending.new_full(positions.shape, float("inf"))], dim=-1)
        q = positions.shape[-1]
        self.new_slots = torch.arange(start, start + q, device=self.device).expand_as(positions)

    def _decode_step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """One real token per row, written into the row's first free slot (the cache grows only when a row is full).

        The hot path of decoding: a handful of small ops and no copy of the cache.
        """
        lowest, slots = self.positions.min(dim=-1, keepdim=True)  # a free slot holds -1, the smallest position
        if int(lowest.max()) >= 0:
            self._grow(DECODE_GROWTH)
            lowest, slots = self.positions.min(dim=-1, keepdim=True)
        self.keys.scatter_(2, slots[..., None].expand_as(key_states), key_states)
        self.values.scatter_(2, slots[..., None].expand_as(value_states), value_states)
        self.positions.scatter_(2, slots, self.cumulative_length)
        if self.pending is not None:
            self.pending.scatter_(2, slots, float("inf"))
        self.new_slots = slots
        self.new_token_index = self.real_tokens[:, None].clone()
        self.real_tokens += 1
        self.cumulative_length += 1

    def _grow(self, columns: int) -> None:
        b, h, _, d = self.keys.shape
        self.keys = torch.cat([self.keys, self.keys.new_zeros(b, h, columns, d)], dim=-2)
        self.values = torch.cat([self.values, self.values.new_zeros(b, h, columns, self.values.shape[-1])], dim=-2)
        self.positions = torch.cat([self.positions, self.positions.new_full((b, h, columns), -1)], dim=-1)
        if self.pending is not None:
            self.pending = torch.cat([self.pending, self.pending.new_full((b, h, columns), float("inf"))], dim=-1)

    def _map_slot_tensors(self, fn, keys_values: bool = True) -> None:
        if keys_values:
            self.keys, self.values = fn(self.keys), fn(self.values)
        self.positions = fn(self.positions)
        if self.pending is not None:
            self.pending = fn(self.pending)

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self._map_slot_tensors(lambda t: t.index_select(0, index))
        self.real_tokens = self.real_tokens.index_select(0, index)
        if self.new_token_index is not None:
            self.new_token_index = self.new_token_index.index_select(0, index)

    # --- what policies call ------------------------------------------------------------------------------------
    def set_pending_scores(self, scores: torch.Tensor) -> None:
        """Attach scores (B, H, q) to the tokens of the last update; they wait until a policy decides them."""
        if self.pending is None:
            self.pending = torch.full(self.positions.shape, float("inf"), device=self.device)
        self.pending.scatter_(2, self.new_slots, scores.to(torch.float32))

    def evict(self, drop: torch.Tensor, compact: bool) -> None:
        """Evict the occupied entries where `drop` (B, H, L) is True; compact to free memory, or leave free slots.

        `drop` must only mark occupied slots (policies select among stored entries).
        """
        self.positions.masked_fill_(drop, -1)
        if compact:
            self.compact()

    def compact(self) -> None:
        """Gather each row's occupied slots to the front and shrink L to the longest row (releases memory)."""
        occupied = self.positions >= 0
        length = int(occupied.sum(-1).max()) if occupied.numel() else 0
        if length == self.keys.shape[-2]:
            return
        order = torch.argsort((~occupied).to(torch.uint8), dim=-1, stable=True)[..., :length]
        d_k, d_v = self.keys.shape[-1], self.values.shape[-1]
        self.keys = self.keys.gather(2, order[..., None].expand(*order.shape, d_k))
        self.values = self.values.gather(2, order[..., None].expand(*order.shape, d_v))
        self.positions = self.positions.gather(2, order)
        if self.pending is not None:
            self.pending = self.pending.gather(2, order)

    # --- measurements --------------------------------------------------------------------------------------------
    def kept(self) -> torch.Tensor:
        """(B, H) number of real entries held."""
        return (self.positions >= 0).sum(-1)

    def evicted(self) -> torch.Tensor:
        """(B, H) number of real entries evicted so far (padding never counts)."""
        return self.real_tokens[:, None] - self.kept()

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (keys, values and slot bookkeeping)."""
        if not self.is_initialized:
            return 0
        tensors = [self.keys, self.values, self.positions] + ([self.pending] if self.pending is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def kv_nbytes(self) -> int:
        """Bytes of the key and value tensors only."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


class CompactCache(Cache):
    """A `Cache` of `CompactLayer`s; `begin_forward` tells it which new tokens are padding."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[CompactLayer() for _ in range(num_layers)])
        self._valid_new: torch.Tensor | None = None

    def begin_forward(self, valid_new: torch.Tensor | None) -> None:
        """Record the padding of the next forward's tokens, (B, q) bool or None when all are real."""
        self._valid_new = None if valid_new is None or bool(valid_new.all()) else valid_new.bool()

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states, valid_new=self._valid_new)

    def stats(self) -> CompressionStats:
        """Kept/evicted entries per (layer, batch, head), lengths and bytes."""
        stats = []
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            b, h, _, d_k = layer.keys.shape
            full = b * h * layer.cumulative_length * (d_k + layer.values.shape[-1]) * layer.keys.element_size()
            stats.append(
                LayerStats(
                    kept=layer.kept().cpu(),
                    evicted=layer.evicted().cpu(),
                    logical_length=layer.cumulative_length,
                    physical_length=layer.keys.shape[-2],
                    nbytes=layer.nbytes(),
                    full_kv_nbytes=full,
                )
            )
        return CompressionStats(stats)
