"""The ragged KV storage: each (batch, KV head) row holds only its kept entries (+ SLACK free slots), decoding reuses
freed slots without growing, padding is never held, and the storage refuses keys of another dtype or device."""

from __future__ import annotations

import pytest
import torch

from kvzap_eval import build_method, compress
from kvzap_eval.errors import CacheMismatchError
from kvzap_eval.evaluation.protocol import split_context_question
from kvzap_eval.llm.model_info import placement
from kvzap_eval.runtime.attention import row_attention
from kvzap_eval.runtime.backends import TorchBackend
from kvzap_eval.runtime.cache import SLACK, CompactCache, CompactLayer
from kvzap_eval.runtime.methods import Method, MethodConfig
from kvzap_eval.runtime.policies import ThresholdPolicy
from kvzap_eval.runtime.scorers import KVzapScorer
from kvzap_eval.surrogate import save_surrogate

from .conftest import CACHE_KWARG, left_padded, output_cache, surrogate_for, tiny_model
from .dms_reference import MaskingDMS, masking_dms

D = 4


def step(layer: CompactLayer, policy, keys: torch.Tensor, scores: torch.Tensor, valid=None) -> None:
    """What the runtime does for one layer and forward: store, score, decide, evict."""
    layer.update(keys, keys + 1000.0, valid_new=valid)
    layer.set_pending_scores(scores)
    drop = policy.decide(layer, scores)
    if drop is not None:
        layer.evict(drop, compact=keys.shape[2] > 1)


def held_keys(layer: CompactLayer) -> dict[tuple[int, int, int], torch.Tensor]:
    """(batch, head, position) -> key of every entry the layer holds."""
    out = {}
    starts, counts = layer.start.tolist(), layer.count.tolist()
    for row, (s, c) in enumerate(zip(starts, counts)):
        for slot in range(s, s + c):
            position = int(layer.slot_positions[slot])
            if position >= 0:
                out[(row // layer.heads, row % layer.heads, position)] = layer.keys[slot]
    return out


@pytest.fixture
def surrogate_dir(tmp_path, llama):
    return str(save_surrogate(surrogate_for(llama), tmp_path / "KVzap-mlp-tiny"))


def test_a_head_that_keeps_little_holds_little():
    layer = CompactLayer()
    scores = torch.stack([torch.full((200,), 5.0), torch.full((200,), -5.0)])[None]  # head 0 keeps, head 1 evicts
    step(layer, ThresholdPolicy(0.0, window=4), torch.randn(1, 2, 200, D), scores)
    assert layer.kept().tolist() == [[200, 4]]
    assert layer.capacity.tolist() == [200 + SLACK, 4 + SLACK]
    entry = 2 * D * 4  # key + value, fp32
    slots = 200 + 4 + 2 * SLACK
    bookkeeping = slots * (4 + 4) + 2 * 3 * 8 + 1 * 8  # slot position + score; row start/capacity/count; real tokens
    assert layer.nbytes() == slots * entry + bookkeeping


def test_bytes_held_track_the_kept_count_in_a_model(llama, surrogate_dir):
    ids, mask = left_padded([120, 90])
    with compress(llama, build_method(llama, surrogate=surrogate_dir, threshold=0.0, window=8)) as session:
        llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        stats = session.stats()
    for layer, layer_stats in zip(session.cache.layers, stats.layers):
        kept = int(layer.kept().sum())
        entry = layer.kv_entry_bytes()
        assert layer_stats.kept_kv_bytes == kept * entry
        assert layer_stats.held_kv_bytes == layer.nbytes()
        assert kept * entry < layer_stats.held_kv_bytes <= (kept + SLACK * layer.rows) * (entry + 8) + 256
        assert layer_stats.full_kv_bytes == 2 * 2 * layer.cumulative_length * entry
    assert stats.held_kv_bytes_fraction < 1 - stats.achieved_compression_ratio + 0.3  # tiny rows: SLACK weighs a lot


def test_decoding_reuses_freed_slots_without_growing():
    layer, policy = CompactLayer(), ThresholdPolicy(0.0, window=8)
    step(layer, policy, torch.randn(2, 3, 20, D), torch.full((2, 3, 20), -1.0))
    arena, size = layer.keys.data_ptr(), layer.keys.shape[0]
    for _ in range(500):  # every token leaving the window is evicted: each step's hole takes the next token
        step(layer, policy, torch.randn(2, 3, 1, D), torch.full((2, 3, 1), -1.0))
        assert layer.keys.data_ptr() == arena and layer.keys.shape[0] == size
    assert layer.kept().flatten().tolist() == [8] * 6
    assert sorted({p for (_, _, p) in held_keys(layer)}) == list(range(512, 520))


def test_a_row_that_keeps_everything_grows_by_slack_while_others_do_not():
    layer, policy = CompactLayer(), ThresholdPolicy(0.0, window=2)
    keep_head0 = torch.tensor([5.0, -5.0])[None, :, None]
    step(layer, policy, torch.randn(1, 2, 10, D), keep_head0.expand(1, 2, 10))
    sizes = set()
    for _ in range(100):
        step(layer, policy, torch.randn(1, 2, 1, D), keep_head0)
        sizes.add(layer.keys.shape[0])
        assert layer.keys.shape[0] <= int(layer.kept().sum()) + 1 + 2 * SLACK
    assert layer.kept().tolist() == [[110, 2]]
    assert len(sizes) <= 100 // SLACK + 1, "the arena grows once per SLACK tokens of the growing row"


def test_storage_keeps_every_kept_key_under_random_forwards():
    torch.manual_seed(0)
    layer, policy = CompactLayer(), ThresholdPolicy(0.0, window=3)
    given, scores_of = {}, {}
    position = 0
    for q in [17, 1, 1, 5, 1, 1, 1, 9, 1, 3, 1, 1]:
        keys, scores = torch.randn(2, 3, q, D), torch.randn(2, 3, q)
        for b in range(2):
            for h in range(3):
                for i in range(q):
                    given[(b, h, position + i)] = keys[b, h, i]
                    scores_of[(b, h, position + i)] = float(scores[b, h, i])
        step(layer, policy, keys, scores)
        position += q
    expected = {k for k in given if k[2] >= position - 3 or scores_of[k] >= 0.0}
    held = held_keys(layer)
    assert set(held) == expected
    for key, stored in held.items():
        assert torch.equal(stored, given[key])


def test_several_decisions_in_one_decode_step_are_applied():
    layer, policy = CompactLayer(), ThresholdPolicy(0.0, window=2)
    step(layer, policy, torch.randn(1, 1, 6, D), torch.tensor([[[1.0, -1.0, 1.0, -1.0, -1.0, -1.0]]]))
    for _ in range(3):  # decode steps without a policy (a paused session): nothing decided
        layer.update(torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D))
        layer.set_pending_scores(torch.tensor([[[-1.0]]]))
    step(layer, policy, torch.randn(1, 1, 1, D), torch.tensor([[[1.0]]]))  # positions 4, 5, 6, 7 leave at once
    assert sorted(p for (_, _, p) in held_keys(layer)) == [0, 2, 8, 9]


def test_padding_is_never_held_even_without_evictions(llama, surrogate_dir):
    """A threshold nothing falls below: the padded batch still leaves no padding in the storage, and the logits equal
    the stock dense cache's."""
    ids, mask = left_padded([40, 29, 17])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    dense = llama.generate(input_ids=ids, attention_mask=mask, **settings)
    with compress(llama, build_method(llama, surrogate=surrogate_dir, threshold=-1e9)) as session:
        ours = llama.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(ours.sequences, dense.sequences)
    torch.testing.assert_close(torch.stack(ours.logits), torch.stack(dense.logits), atol=1e-4, rtol=0)
    for layer in session.cache.layers:
        assert layer.kept().tolist() == [[45, 45], [34, 34], [22, 22]]  # real prompt tokens + 5 decoded, no padding
        assert int((layer.slot_positions >= 0).sum()) == 2 * (45 + 34 + 22)


def run_chunks(model, context, ids, mask, widths):
    """Forwards of `widths` columns each (the paper protocol's context, then its question, then decode steps), with
    the 2-D mask so far and positions counted over real tokens; the logits of every forward."""
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits, cache, start = [], None, 0
    with context as handle:
        for width in widths:
            end = start + width
            out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                        use_cache=True, **{CACHE_KWARG: cache})  # fmt: skip
            cache = output_cache(out)
            logits.append(out.logits)
            start = end
    return torch.cat(logits, dim=1), handle


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_padded_question_after_a_context_equals_the_masked_reference(kernel):
    """A left-padded context, then a left-padded question against the pruned cache (padding in the middle of each
    row), then decode steps: the logits of real tokens and the evictions equal the masking reference's."""
    model = tiny_model("llama", attn_implementation=kernel)
    backend = TorchBackend(surrogate_for(model), placement(model))
    ids, mask = left_padded([50, 37, 23], seed=5)
    batch = split_context_question(ids, mask, [6, 3, 9])
    steps = torch.randint(1, 128, (3, 4), generator=torch.Generator().manual_seed(1))
    ids = torch.cat([batch.input_ids, steps], 1)
    mask = torch.cat([batch.attention_mask, torch.ones_like(steps)], 1)
    width = batch.prefill_chunks[0]
    widths = [width, batch.input_ids.shape[1] - width, 1, 1, 1, 1]
    method = Method(MethodConfig(), KVzapScorer(backend), ThresholdPolicy(0.0, window=4))
    reference = MaskingDMS(backend, 0.0, 4)
    ref_logits, _ = run_chunks(model, masking_dms(model, reference, kernel), ids, mask, widths)
    logits, session = run_chunks(model, compress(model, method), ids, mask, widths)
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-4, rtol=0)
    for layer_idx in range(2):
        layer = session.cache.layers[layer_idx]
        ours = {(b, h, p) for b in range(3) for h in range(2) for p in range(ids.shape[1]) if real[b, p]}
        ours -= {(b, h, p) for (b, h, p) in held_keys(layer)}
        assert ours == reference.evicted_triples(layer_idx, real) != set()
        assert int((layer.slot_positions >= 0).sum()) == int(layer.kept().sum()), "no padding held"


def test_beam_search_reorders_the_ragged_rows(llama, surrogate_dir):
    ids, mask = left_padded([30, 21])
    settings = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True)  # fmt: skip
    dense = llama.generate(input_ids=ids, attention_mask=mask, **settings)
    with compress(llama, build_method(llama, surrogate=surrogate_dir, threshold=-1e9)):
        ours = llama.generate(input_ids=ids, attention_mask=mask, **settings)
    assert torch.equal(ours.sequences, dense.sequences)
    torch.testing.assert_close(ours.sequences_scores, dense.sequences_scores, atol=1e-4, rtol=0)


def test_batch_selection_moves_each_rows_entries():
    layer = CompactLayer()
    step(layer, ThresholdPolicy(0.0, window=1), torch.randn(3, 2, 8, D), torch.randn(3, 2, 8))
    before = held_keys(layer)
    layer.batch_select_indices(torch.tensor([2, 0, 0]))
    after = held_keys(layer)
    for new_b, old_b in enumerate([2, 0, 0]):
        for (b, h, p), key in before.items():
            if b == old_b:
                assert torch.equal(after[(new_b, h, p)], key)
    assert len(after) == sum(1 for (b, _, _) in before if b == 2) + 2 * sum(1 for (b, _, _) in before if b == 0)


def test_row_attention_equals_dense_attention_over_the_kept_entries():
    torch.manual_seed(1)
    layer = CompactLayer()
    step(layer, ThresholdPolicy(0.0, window=2), torch.randn(2, 2, 12, D), torch.randn(2, 2, 12))
    layer.update(torch.randn(2, 2, 3, D), torch.randn(2, 2, 3, D))  # three new tokens at the end of every row
    query = torch.randn(2, 4, 3, D)  # 4 query heads: G = 2 per KV head
    out = row_attention(layer, query, scale=0.5)
    for b in range(2):
        for h in range(4):
            row = b * 2 + h // 2
            s, c = int(layer.start[row]), int(layer.count[row])
            keys, values = layer.keys[s : s + c], layer.values[s : s + c]
            mask = torch.ones(3, c, dtype=torch.bool).tril_(c - 3)
            logits = (query[b, h] @ keys.T * 0.5).masked_fill(~mask, float("-inf"))
            expected = torch.softmax(logits, -1) @ values
            torch.testing.assert_close(out[b, :, h], expected, atol=1e-5, rtol=1e-5)


def test_keys_of_another_dtype_are_refused_in_one_line():
    cache = CompactCache(2)
    keys = torch.randn(1, 2, 5, D)
    cache.update(keys, keys, 0)
    with pytest.raises(CacheMismatchError, match=r"layer 0 holds keys as torch.float32 on cpu .* torch.bfloat16") as e:
        cache.update(keys[:, :, :1].bfloat16(), keys[:, :, :1].bfloat16(), 0)
    assert "\n" not in str(e.value) and "new cache" in str(e.value)


def test_keys_on_another_device_are_refused():
    cache = CompactCache(1)
    keys = torch.randn(1, 2, 5, D)
    cache.update(keys, keys, 0)
    meta = torch.empty(1, 2, 1, D, device="meta")
    with pytest.raises(CacheMismatchError, match="on cpu but the model now gives torch.float32 on meta"):
        cache.update(meta, meta, 0)


def test_a_model_cast_between_forwards_is_refused(surrogate_dir):
    model = tiny_model()
    ids, _ = left_padded([20])
    with compress(model, build_method(model, surrogate=surrogate_dir, threshold=0.0)) as session:
        cache = session.new_cache()
        out = model(input_ids=ids, use_cache=True, **{CACHE_KWARG: cache})
        model.to(torch.bfloat16)
        with pytest.raises(CacheMismatchError, match="session.new_cache"):
            model(input_ids=ids[:, :1], use_cache=True, **{CACHE_KWARG: output_cache(out)})


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                          window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
                          num_splits=None):  # fmt: skip
    """`varlen_attn`'s documented semantics in plain torch (the kernel itself is CUDA-only), with torch 2.13's
    keywords: sequence i's queries attend its first `seqused_k[i]` keys, causally aligned bottom-right when
    window_size is (-1, 0); more query heads than key heads only with enable_gqa."""
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise RuntimeError(f"{query.shape[1]} query heads over {key.shape[1]} key heads need enable_gqa=True")
    outs = []
    for i in range(len(cu_seq_q) - 1):
        q = query[cu_seq_q[i] : cu_seq_q[i + 1]].transpose(0, 1)  # (H_q, Tq, D)
        k = key[cu_seq_k[i] : cu_seq_k[i] + seqused_k[i]].transpose(0, 1)
        v = value[cu_seq_k[i] : cu_seq_k[i] + seqused_k[i]].transpose(0, 1)
        n_q, n_k = q.shape[1], k.shape[1]
        mask = torch.ones(n_q, n_k, dtype=torch.bool).tril_(n_k - n_q) if tuple(window_size) == (-1, 0) else None
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


def reference_varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                               window_size=(-1, -1), seqused_k=None):  # fmt: skip
    """The same with torch 2.11's keywords: no `enable_gqa` (seen on a lent H200: our call raised TypeError)."""
    return reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux,
                                 scale=scale, window_size=window_size, seqused_k=seqused_k)  # fmt: skip


def reference_varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                               is_causal=False):  # fmt: skip
    """torch 2.10's keywords: no window, no used-slot counts."""
    raise AssertionError("a varlen_attn without seqused_k cannot skip the unused slots: it must not be called")


@pytest.fixture
def varlen_as(monkeypatch):
    """Replace torch's `varlen_attn` by a reference with another torch's keywords (the keyword cache reset)."""
    import torch.nn.attention.varlen as varlen

    from kvzap_eval.runtime.attention import varlen_keywords

    def use(function):
        monkeypatch.setattr(varlen, "varlen_attn", function)
        varlen_keywords.cache_clear()

    yield use
    varlen_keywords.cache_clear()


def ragged_layer_with_new_tokens(q: int) -> CompactLayer:
    torch.manual_seed(2)
    layer = CompactLayer()
    step(layer, ThresholdPolicy(0.0, window=2), torch.randn(2, 3, 14, D), torch.randn(2, 3, 14))
    layer.update(torch.randn(2, 3, q, D), torch.randn(2, 3, q, D))
    return layer


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("reference", [reference_varlen_attn, reference_varlen_attn_2_11])
def test_varlen_layout_equals_row_attention(varlen_as, reference, q):
    """The CUDA path's plumbing (queries per row as G heads, region starts as key offsets, used slots as seqused_k;
    without enable_gqa a decode step's G heads as G queries of one head), checked on CPU against the kernel's
    documented semantics; what a torch's varlen_attn cannot take goes to the per-row path."""
    from kvzap_eval.runtime.attention import varlen_attention, varlen_serves

    varlen_as(reference)
    if not varlen_serves(q):
        assert reference is reference_varlen_attn_2_11 and q > 1  # causal GQA chunks need enable_gqa
        return
    layer, query = ragged_layer_with_new_tokens(q), torch.randn(2, 6, q, D)
    torch.testing.assert_close(
        varlen_attention(layer, query, 0.5), row_attention(layer, query, 0.5), atol=1e-5, rtol=1e-5
    )


def test_varlen_serves_what_each_torch_can_take(varlen_as):
    from kvzap_eval.runtime.attention import varlen_serves

    varlen_as(reference_varlen_attn)
    assert varlen_serves(1) and varlen_serves(4)
    varlen_as(reference_varlen_attn_2_11)
    assert varlen_serves(1) and not varlen_serves(4)
    varlen_as(reference_varlen_attn_2_10)
    assert not varlen_serves(1) and not varlen_serves(4)


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_gathered_rectangle_equals_row_attention(q, padded):
    """The CUDA path without flash varlen (fp32, padding): the rows gathered into one masked rectangle attend exactly
    as the per-row calls, new tokens causal and their padding hidden (a padding query sees itself)."""
    from kvzap_eval.runtime.attention import gathered_attention

    torch.manual_seed(3)
    layer = CompactLayer()
    step(layer, ThresholdPolicy(0.0, window=2), torch.randn(2, 3, 14, D), torch.randn(2, 3, 14))
    valid = torch.tensor([[False] * (q - 1) + [True], [True] * q]) if padded else None
    layer.update(torch.randn(2, 3, q, D), torch.randn(2, 3, q, D), valid_new=valid)
    assert len(set(layer.count.tolist())) > 1  # rows of different lengths: the rectangle really is padded
    query = torch.randn(2, 6, q, D)
    torch.testing.assert_close(
        gathered_attention(layer, query, 0.5), row_attention(layer, query, 0.5), atol=1e-5, rtol=1e-5
    )
