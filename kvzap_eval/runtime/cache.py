"""A transformers KV cache that holds only the entries a policy keeps, per (batch row, KV head): ragged storage.

Layout. Each layer holds one key tensor and one value tensor of shape (N, d), the *arena*. Row r = b * H_kv + h
(batch row b, KV head h) owns the contiguous region [start[r], start[r] + capacity[r]) of the arena; its first
`count[r]` slots hold its entries and the rest are free (slack). Per slot the layer keeps the logical position of
its token (`slot_positions`, -1 = free or padding) and, once a policy attaches them, the token's undecided score
(`slot_scores`). So a head that keeps little holds little: the bytes held are the kept entries plus SLACK free slots
per row plus this bookkeeping, all counted by `nbytes()`.

Phases of a layer:

- the first forward (the prefill) stores its q tokens as they come, each row's region holding all of them (padding
  marked -1); attention runs dense on the model's own tensors, as without compression;
- after any forward of several tokens (the prefill, a prefill chunk, a question after a context) the policy's
  evictions are applied by a *repack*: a new arena sized to each row's kept count + SLACK, the old one freed. A
  forward that evicted nothing and left no padding keeps its arena (no copy);
- a decode step writes each row's new token into the slot that row's last eviction freed (a *hole*), else into its
  next free slot. Decoding evicts at most the one token that leaves the window per row and step, so each step's
  hole is filled by the next step's token: slots are reused, nothing moves, and the arena grows only when a row's
  region is full (then the layer is repacked with SLACK free slots per row again). Anything else that leaves free
  slots among a row's entries (several evictions in one row, padding kept because no policy ran) marks the layer
  for a repack before its next update, so at attention time every row's first `count` slots are real entries.

Why this layout (measured on this project's CPU, 1 thread, SmolLM2 shapes; the table is in the README, "Ragged KV
storage"): per (batch, KV head) row, attention is one SDPA call over a contiguous slice of the arena with the row's
G query heads as its queries, which reads only the kept bytes and never repeats keys. For one layer's decode step
at 4k tokens with 0.22 kept that took 72 us (batch 1) and 1.24 ms (batch 8), against 378 us / 5.6 ms for the full
cache, 191 us / 1.5 ms for one masked call over a rectangle padded to the layer's longest head (the previous
layout, which also held those padded bytes), and 1.8 / 6.2 ms for gathering the ragged rows into such a
rectangle. Fixed-size blocks with a block table (PagedAttention) would free memory in blocks too, but no CPU kernel
here reads a block table (FlexAttention needs a compile per shape), and SDPA over a row needs contiguous keys; one
tensor per head pads every batch row to the longest. On CUDA the same arena is one `varlen_attn` call per layer:
the region starts are the key sequence offsets and `count` the used length of each (`seqused_k`).

RoPE is applied before caching, so entries never need their positions again for attention; positions serve the
causal mask, the policies (window, sinks) and the statistics. `get_seq_length()` returns the logical count of
tokens seen (what `generate` and position ids need) and `get_mask_sizes()` the longest region (transformers builds
no mask for our attention names, see `attention.py`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import CacheMismatchError
from .stats import CompressionStats, LayerStats

#: Free slots each row gets at every repack: a row decodes this many tokens without any eviction before the layer
#: grows (is repacked) again.
SLACK = 16


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    return counts.cumsum(0) - counts


class CompactLayer(DynamicLayer):
    """One decoder layer's cache: the arena of kept entries, their positions and pending scores, and the regions."""

    is_croppable = False
    supports_early_init = False  # an early init uses the model's dtype, not this layer's (model parallel)

    def __init__(self) -> None:
        super().__init__()
        self.slot_positions: torch.Tensor | None = None  # (N,) int32 logical position per slot, -1 = free
        self.slot_scores: torch.Tensor | None = None  # (N,) float32 scores awaiting a decision, +inf = none
        self.start: torch.Tensor | None = None  # (R,) int64 first slot of each row's region
        self.capacity: torch.Tensor | None = None  # (R,) int64 slots of each row's region
        self.count: torch.Tensor | None = None  # (R,) int64 used slots at the front of each region
        self.heads = 0  # KV heads: rows = batch * heads
        self.new_slots: torch.Tensor | None = None  # slots written by the last update: (B, H, q) int64
        self.new_valid: torch.Tensor | None = None  # (B, q) False where the last update's tokens are padding
        self.new_token_index: torch.Tensor | None = None  # last update's tokens: index among real tokens, -1 = pad
        self.dense_forward = False  # the last update was the first forward: attention runs on the model's tensors
        self.cumulative_length = 0  # logical tokens seen, padding included
        self.real_tokens: torch.Tensor | None = None  # (B,) non-padding tokens seen (kept + evicted, per head)
        self.decided_upto = 0  # every token at a logical position below this has been decided by the policy
        self._holes: torch.Tensor | None = None  # (R,) slot freed by the last decode eviction, -1 = none
        self._dirty = False  # free slots lie among some row's entries: repack before the next update
        self._room = 0  # a lower bound of min(capacity - count): free slots every row still has
        self.longest_region = 0  # max(capacity): slots of the longest region

    # --- transformers cache-layer contract -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.heads = h
        self.keys = key_states.new_zeros(0, d)
        self.values = value_states.new_zeros(0, value_states.shape[-1])
        self.slot_positions = torch.empty(0, dtype=torch.int32, device=self.device)
        rows = torch.zeros(b * h, dtype=torch.long, device=self.device)
        self.start, self.capacity, self.count = rows, rows.clone(), rows.clone()
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
        """Store q new tokens; `valid_new` (B, q) is False for padding, which is never kept.

        Returns the model's own tensors for the first forward (dense attention), else the arena.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        if valid_new is not None:
            valid_new = valid_new.to(self.device, torch.bool)
        self.new_valid = valid_new
        if self.cumulative_length == 0:
            self._first_forward(key_states, value_states)
            self._count_new_tokens(q, valid_new)
            return key_states, value_states
        self.dense_forward = False
        if q == 1 and valid_new is None:
            self._decode_step(key_states, value_states)
        else:
            self._append(key_states, value_states)
        self._count_new_tokens(q, valid_new)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.longest_region + query_length, 0

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
            index = torch.arange(self.real_tokens.shape[0], device=self.device).repeat_interleave(repeats)
            self._select_batch(index)

    def offload(self) -> None:
        super().offload()
        if self.is_initialized:
            self._map_bookkeeping(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        super().prefetch()
        if self.is_initialized and self.slot_positions.device != self.device:
            self._map_bookkeeping(lambda t: t.to(self.device, non_blocking=True))

    def check_matches(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
        """Refuse new keys/values of another dtype or device than the entries this layer already holds."""
        if self.cumulative_length == 0:
            return
        for name, held, new in (("keys", self.keys, key_states), ("values", self.values, value_states)):
            if held.dtype != new.dtype or held.device != new.device:
                raise CacheMismatchError(
                    f"KV cache layer {layer_idx} holds {name} as {held.dtype} on {held.device} but the model now "
                    f"gives {new.dtype} on {new.device}: start a new cache (session.new_cache()) after moving or "
                    "casting the model"
                )

    # --- storing new tokens ------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.start.shape[0]

    def _first_forward(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Every row's region holds all q tokens (padding included, marked -1): the dense prefill, stored ragged."""
        b, h, q, d = key_states.shape
        self.heads = h
        self.keys = key_states.reshape(b * h * q, d)
        self.values = value_states.reshape(b * h * q, value_states.shape[-1])
        rows = b * h
        self.start = torch.arange(rows, device=self.device) * q
        self.capacity = torch.full((rows,), q, dtype=torch.long, device=self.device)
        self.count = self.capacity.clone()
        positions = self._new_positions(b, q, self.new_valid)
        self.slot_positions = positions[:, None, :].expand(b, h, q).reshape(-1)
        self.slot_scores = None
        self.new_slots = torch.arange(rows * q, device=self.device).view(b, h, q)
        self._holes, self._dirty, self._room, self.longest_region = None, self.new_valid is not None, 0, q
        self.dense_forward = True

    def _new_positions(self, b: int, q: int, valid_new: torch.Tensor | None) -> torch.Tensor:
        positions = self.cumulative_length + torch.arange(q, device=self.device, dtype=torch.int32).expand(b, q)
        return positions if valid_new is None else positions.masked_fill(~valid_new, -1)

    def _count_new_tokens(self, q: int, valid_new: torch.Tensor | None) -> None:
        if valid_new is None:
            self.new_token_index = self.real_tokens[:, None] + torch.arange(q, device=self.device)
            self.real_tokens += q
        else:
            index = self.real_tokens[:, None] + valid_new.cumsum(-1) - 1
            self.new_token_index = index.masked_fill(~valid_new, -1)
            self.real_tokens += valid_new.sum(-1)
        self.cumulative_length += q

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """q tokens after each row's entries (a chunk, a question, a padded step); repacks first if rows lack room."""
        b, h, q, d = key_states.shape
        if self._dirty or self._holes is not None or int((self.capacity - self.count).min()) < q:
            self._repack(extra=q)
        slots = (self.start + self.count)[:, None] + torch.arange(q, device=self.device)  # (R, q)
        flat = slots.reshape(-1)
        self.keys.index_copy_(0, flat, key_states.reshape(-1, d))
        self.values.index_copy_(0, flat, value_states.reshape(-1, value_states.shape[-1]))
        positions = self._new_positions(b, q, self.new_valid)
        self.slot_positions.index_copy_(0, flat, positions[:, None, :].expand(b, h, q).reshape(-1))
        if self.slot_scores is not None:
            self.slot_scores.index_fill_(0, flat, float("inf"))
        self.count += q
        self._room -= q
        self._dirty = self.new_valid is not None  # padding among the new entries: never kept
        self.new_slots = slots.view(b, h, q)

    def _decode_step(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """One real token per row, into the row's hole (the slot its last eviction freed) or its next free slot.

        The hot path of decoding: a handful of small ops and no copy of the cache.
        """
        if self._dirty:
            self._repack()
        if self._room <= 0:  # some row may be full: look (a row with a hole uses no free slot this step)
            free = self.capacity - self.count
            if self._holes is not None:
                free = free + (self._holes >= 0)
            self._room = int(free.min())
            if self._room <= 0:
                self._repack()
        slots = self.start + self.count
        if self._holes is None:
            self.count += 1
        else:
            appended = self._holes < 0
            slots = torch.where(appended, slots, self._holes)
            self.count += appended
            self._holes = None
        self._room -= 1
        self.keys.index_copy_(0, slots, key_states.reshape(-1, key_states.shape[-1]))
        self.values.index_copy_(0, slots, value_states.reshape(-1, value_states.shape[-1]))
        self.slot_positions.index_fill_(0, slots, self.cumulative_length)
        if self.slot_scores is not None:
            self.slot_scores.index_fill_(0, slots, float("inf"))
        self.new_slots = slots.view(-1, self.heads, 1)

    # --- repacking -----------------------------------------------------------------------------------------------
    def _repack(self, drop: torch.Tensor | None = None, rows: torch.Tensor | None = None, extra: int = 0) -> None:
        """A new arena holding, for each row of `rows` (source rows, default all), its entries except `drop`, with
        `extra` + SLACK free slots; the old arena is released."""
        occupied = self.slot_positions >= 0
        if drop is not None:
            occupied &= ~drop
        n_slots = self.slot_positions.shape[0]
        source_rows = torch.arange(self.rows, device=self.device)
        row_of_slot = torch.repeat_interleave(source_rows, self.capacity, output_size=n_slots)
        counts = torch.bincount(row_of_slot[occupied], minlength=self.rows)
        kept_slots = occupied.nonzero().flatten()  # grouped by row, in row order
        first = _exclusive_cumsum(counts)
        if rows is not None:
            counts, first = counts[rows], first[rows]
        total = int(counts.sum())
        capacity = counts + (extra + SLACK)
        start = _exclusive_cumsum(capacity)
        new_row = torch.repeat_interleave(torch.arange(counts.shape[0], device=self.device), counts, output_size=total)
        rank = torch.arange(total, device=self.device) - _exclusive_cumsum(counts)[new_row]
        source = kept_slots[first[new_row] + rank]
        dest = start[new_row] + rank
        size = int(capacity.sum())
        self.keys = self._moved(self.keys, source, dest, size, 0)
        self.values = self._moved(self.values, source, dest, size, 0)
        self.slot_positions = self._moved(self.slot_positions, source, dest, size, -1)
        if self.slot_scores is not None:
            self.slot_scores = self._moved(self.slot_scores, source, dest, size, float("inf"))
        self.new_slots = None  # the last update's slots are gone
        self.start, self.capacity, self.count = start, capacity, counts
        self._holes, self._dirty, self._room = None, False, extra + SLACK
        self.longest_region = int(capacity.max()) if capacity.numel() else 0

    @staticmethod
    def _moved(tensor: torch.Tensor, source: torch.Tensor, dest: torch.Tensor, size: int, fill) -> torch.Tensor:
        out = tensor.new_full((size, *tensor.shape[1:]), fill)
        return out.index_copy_(0, dest, tensor.index_select(0, source))

    def _map_bookkeeping(self, fn) -> None:
        self.slot_positions = fn(self.slot_positions)
        if self.slot_scores is not None:
            self.slot_scores = fn(self.slot_scores)

    def _select_batch(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam reorder, batch selection, repeats): a repack of their regions."""
        if not self.is_initialized:
            return
        rows = (index[:, None] * self.heads + torch.arange(self.heads, device=self.device)).reshape(-1)
        self._repack(rows=rows)
        self.real_tokens = self.real_tokens.index_select(0, index)
        if self.new_token_index is not None:
            self.new_token_index = self.new_token_index.index_select(0, index)
        if self.new_valid is not None:
            self.new_valid = self.new_valid.index_select(0, index)

    # --- what policies call ------------------------------------------------------------------------------------
    def set_pending_scores(self, scores: torch.Tensor) -> None:
        """Attach scores (B, H, q) to the tokens of the last update; they wait until a policy decides them."""
        if self.slot_scores is None:
            self.slot_scores = torch.full(self.slot_positions.shape, float("inf"), device=self.device)
        self.slot_scores.index_copy_(0, self.new_slots.reshape(-1), scores.reshape(-1).to(torch.float32))

    def new_keys(self) -> torch.Tensor:
        """(B, H, q, d) keys (RoPE applied) of the last update's tokens, before any eviction."""
        return self.keys[self.new_slots]

    def drop_new(self, drop: torch.Tensor) -> torch.Tensor:
        """The (N,) slot mask of `drop` (B, H, q), given over the last update's tokens."""
        mask = torch.zeros(self.slot_positions.shape, dtype=torch.bool, device=self.device)
        return mask.index_put_((self.new_slots.reshape(-1),), drop.reshape(-1))

    def evict(self, drop: torch.Tensor, compact: bool) -> None:
        """Evict the entries whose slots `drop` (N,) marks; `compact` (after a multi-token forward) repacks the arena
        to free memory, otherwise each row's freed slot waits for that row's next token.

        `drop` must only mark occupied slots (policies select among stored entries).
        """
        if compact:
            if self._dirty or bool(drop.any()):
                self._repack(drop=drop)
            return
        slots = drop.nonzero().flatten()
        if slots.numel() == 0:
            return
        rows = torch.searchsorted(self.start, slots, right=True) - 1
        one_per_row = slots.numel() == 1 or bool((rows[1:] != rows[:-1]).all())
        if self._holes is not None or self._dirty or not one_per_row:
            self._repack(drop=drop)
            return
        self.slot_positions.index_fill_(0, slots, -1)
        self._holes = torch.full_like(self.start, -1).index_copy_(0, rows, slots)

    # --- measurements --------------------------------------------------------------------------------------------
    def kept(self) -> torch.Tensor:
        """(B, H) number of real entries held."""
        if not self.is_initialized:
            return torch.zeros(0, 0, dtype=torch.long)
        n_slots = self.slot_positions.shape[0]
        row_of_slot = torch.repeat_interleave(
            torch.arange(self.rows, device=self.device), self.capacity, output_size=n_slots
        )
        kept = torch.bincount(row_of_slot[self.slot_positions >= 0], minlength=self.rows)
        return kept.view(-1, self.heads)

    def evicted(self) -> torch.Tensor:
        """(B, H) number of real entries evicted so far (padding never counts)."""
        return self.real_tokens[:, None] - self.kept()

    @property
    def positions(self) -> torch.Tensor:
        """(B, H, L) logical position of each slot of each row's region, in storage order, -1 = free; L is the
        longest region (shorter rows padded with -1). For inspection: the storage is `slot_positions`."""
        longest = self.longest_region
        if self.slot_positions.numel() == 0:
            return torch.full((self.rows // self.heads, self.heads, longest), -1, dtype=torch.int32)
        offsets = torch.arange(longest, device=self.device)
        inside = offsets < self.capacity[:, None]
        index = (self.start[:, None] + offsets).clamp_(max=self.slot_positions.shape[0] - 1)
        view = self.slot_positions[index].masked_fill(~inside, -1)
        return view.view(-1, self.heads, longest)

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds: the key and value arenas (free slots included) and bookkeeping."""
        if not self.is_initialized:
            return 0
        tensors = [self.keys, self.values, self.slot_positions, self.start, self.capacity, self.count]
        tensors += [t for t in (self.slot_scores, self._holes, self.real_tokens) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def kv_entry_bytes(self) -> int:
        """Bytes of one cached entry's key and value."""
        return (self.keys.shape[-1] + self.values.shape[-1]) * self.keys.element_size()


class CompactCache(Cache):
    """A `Cache` of `CompactLayer`s; `begin_forward` tells it which new tokens are padding."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[CompactLayer() for _ in range(num_layers)])
        self._valid_new: torch.Tensor | None = None

    def begin_forward(self, valid_new: torch.Tensor | None) -> None:
        """Record the padding of the next forward's tokens, (B, q) bool or None when all are real."""
        self._valid_new = None if valid_new is None or bool(valid_new.all()) else valid_new.bool()

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        layer.check_matches(key_states, value_states, layer_idx)
        return layer.update(key_states, value_states, valid_new=self._valid_new)

    def stats(self) -> CompressionStats:
        """Kept/evicted entries per (layer, batch, head), and per layer the bytes held, kept and of a full cache."""
        stats = []
        for layer in self.layers:
            if not layer.is_initialized or layer.cumulative_length == 0:
                continue
            kept = layer.kept()
            entry = layer.kv_entry_bytes()
            stats.append(
                LayerStats(
                    kept=kept.cpu(),
                    evicted=layer.evicted().cpu(),
                    logical_length=layer.cumulative_length,
                    capacity=layer.capacity.view(-1, layer.heads).cpu(),
                    held_kv_bytes=layer.nbytes(),
                    kept_kv_bytes=int(kept.sum()) * entry,
                    full_kv_bytes=kept.numel() * layer.cumulative_length * entry,
                )
            )
        return CompressionStats(stats)
