"""kvpress 0.5.5 as an oracle: same surrogate weights, same tokens -> same scores and same evictions at every step.

Run with `tox -e oracle` (kvpress pins transformers<5.3, so it has its own environment). Without kvpress installed
this module is skipped. Both sides run in one process: kvpress wraps the attention functions registered when it
is imported, while our runtime registers its own attention names afterwards, and each side gets its own model
instance (kvpress also attaches attributes to the attention modules).

- Scores: `KVzapPress.score` (kvpress loads the checkpoint we saved, through its own `KVzapModel.from_pretrained`)
  equals our `TorchBackend` on the hidden states that enter each `self_attn`.
- Evictions: `DMSPress(KVzapPress, threshold, sliding_window_size, decoding=True)` against our `kvzap` method. A
  manual loop feeds one fixed random token sequence to both (prefill, then one token per forward), so the two
  can never diverge in their inputs. After prefill and after every decode step, for every layer, kvpress's
  `self_attn.masked_key_indices` triples must equal our evicted set: positions seen minus `layer.positions` kept.
"""

from __future__ import annotations

import pytest
import torch

kvpress = pytest.importorskip("kvpress")

from kvpress.presses.kvzap_press import KVzapModel  # noqa: E402

from kvzap_eval.llm.model_info import placement  # noqa: E402
from kvzap_eval.runtime.backends import TorchBackend  # noqa: E402
from kvzap_eval.runtime.methods import MethodConfig, build_method  # noqa: E402
from kvzap_eval.runtime.scorers import Scorer  # noqa: E402
from kvzap_eval.runtime.session import compress  # noqa: E402
from kvzap_eval.surrogate import random_surrogate, save_surrogate  # noqa: E402

from .conftest import CACHE_KWARG, output_cache, tiny_model  # noqa: E402

pytestmark = pytest.mark.oracle

THRESHOLD = -4.0
#: Surrogate scaling per type: scores = scale * f(h) + offset spread over roughly [-8, 0], around THRESHOLD.
SURROGATE = {"mlp": dict(scale=4.0, score_offset=-3.5), "linear": dict(scale=2.0, score_offset=-4.0)}
#: No score may lie this close to the threshold. The two sides' scores differ by < 1e-6 (hidden states differ in
#: the last bits only) and are asserted to differ by < MARGIN / 2, so both sides take the same side of it.
MARGIN = 1e-5


def kvpress_model_name(model, model_type: str) -> str:
    """The hub id `KVzapPress.post_init_from_model` derives; presetting it makes the press skip the hub."""
    return f"nvidia/KVzap-{model_type}-{model.config.name_or_path.split('/')[-1]}"


def local_kvzap_press(model, surrogate_dir, model_type: str):
    """A `KVzapPress` using the local checkpoint, loaded by kvpress's own `KVzapModel` (SPEC section 3)."""
    press = kvpress.KVzapPress(model_type=model_type)
    press.kvzap_model_name = kvpress_model_name(model, model_type)
    press.kvzap_model = KVzapModel.from_pretrained(str(surrogate_dir))
    return press


def surrogate_dir(tmp_path, model, model_type: str, seed: int = 1):
    surrogate = random_surrogate(model.config, model_type, seed=seed, **SURROGATE[model_type])
    return surrogate, save_surrogate(surrogate, tmp_path / f"KVzap-{model_type}")


def attention_inputs(model, ids) -> dict[int, torch.Tensor]:
    """The hidden states each `self_attn` receives (post input-layernorm), from a plain dense forward."""
    seen: dict[int, torch.Tensor] = {}

    def hook(module, args, kwargs):
        seen[module.layer_idx] = kwargs["hidden_states"].detach().clone()

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def random_tokens(length: int, seed: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------- scores


@pytest.mark.parametrize("model_type", ["mlp", "linear"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_scores_equal_kvzap_press(tmp_path, arch, model_type):
    model = tiny_model(arch, attn_implementation="sdpa")
    surrogate, directory = surrogate_dir(tmp_path, model, model_type)
    press = local_kvzap_press(model, directory, model_type)
    ours = TorchBackend(surrogate, placement(model))

    with press(model):  # entering runs post_init_from_model: it must keep our local surrogate
        assert press.kvzap_model_name == kvpress_model_name(model, model_type)
    kvzap_model = press.kvzap_model
    assert type(kvzap_model) is KVzapModel
    assert (kvzap_model.config.hidden_dim is None) == (model_type == "linear")
    ours_state = surrogate.state_dict()
    theirs_state = kvzap_model.state_dict()
    assert sorted(theirs_state) == sorted(ours_state)
    for name, tensor in ours_state.items():
        assert torch.equal(theirs_state[name].float(), tensor.float()), name

    hidden = attention_inputs(model, random_tokens(37, seed=5))
    attention_modules = [layer.self_attn for layer in model.model.layers]
    with torch.no_grad():
        for layer_idx, module in enumerate(attention_modules):
            h = hidden[layer_idx]
            expected = press.score(module, h, None, None, None, {})
            got = ours(layer_idx, h)
            assert got.shape == expected.shape == (1, model.config.num_key_value_heads, 37)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            # also on a batch of random hidden states with a wider spread
            h = torch.randn(3, 11, model.config.hidden_size, generator=torch.Generator().manual_seed(layer_idx)) * 3
            expected = press.score(module, h, None, None, None, {})
            torch.testing.assert_close(ours(layer_idx, h), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- evictions


class RecordingKVpressScores:
    """Wraps a kvpress scorer instance's `score` to keep every (layer -> list of (1, H, q)) score it returns."""

    def __init__(self, press):
        self.scores: dict[int, list[torch.Tensor]] = {}
        self._score = press.score
        press.score = self

    def __call__(self, module, hidden_states, *args):
        scores = self._score(module, hidden_states, *args)
        self.scores.setdefault(module.layer_idx, []).append(scores.detach().float().clone())
        return scores


class RecordingScorer(Scorer):
    """Wraps our method's scorer the same way."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.scores: dict[int, list[torch.Tensor]] = {}

    def score(self, call):
        scores = self.scorer.score(call)
        self.scores.setdefault(call.layer_idx, []).append(scores.detach().float().clone())
        return scores


def kvpress_evicted(model) -> list[set[tuple[int, int, int]]]:
    """Per layer, kvpress's masked (batch, kv_head, position) triples."""
    result = []
    for layer in model.model.layers:
        indices = getattr(layer.self_attn, "masked_key_indices", None)
        if indices is None:
            result.append(set())
            continue
        triples = list(zip(*(t.tolist() for t in indices)))
        assert len(triples) == len(set(triples)), "kvpress masked a triple twice"
        result.append(set(triples))
    return result


def ours_evicted(cache) -> list[set[tuple[int, int, int]]]:
    """Per layer, the (batch, kv_head, position) triples seen but no longer held by our compact cache."""
    result = []
    for layer in cache.layers:
        b, h, _ = layer.positions.shape
        evicted = set()
        for bi in range(b):
            for hi in range(h):
                kept = layer.positions[bi, hi]
                kept = kept[kept >= 0].tolist()
                assert len(kept) == len(set(kept)), "a position is held twice"
                evicted |= {(bi, hi, p) for p in set(range(layer.cumulative_length)) - set(kept)}
        result.append(evicted)
    return result


def drive(model, tokens: torch.Tensor, chunks: tuple[int, ...], read_evicted, read_ratio):
    """Forward `chunks` tokens at a time (prefill, then e.g. a question), then the rest one token per forward;
    record the evicted sets, the compression ratio and the last logits after every forward."""
    bounds, start = [], 0
    for size in list(chunks) + [1] * (tokens.shape[1] - sum(chunks)):
        bounds.append((start, start + size))
        start += size
    evicted, ratios, logits = [], [], []
    cache = None
    with torch.no_grad():
        for start, stop in bounds:
            out = model(input_ids=tokens[:, start:stop], use_cache=True, **{CACHE_KWARG: cache})
            cache = output_cache(out)
            evicted.append(read_evicted(cache))
            ratios.append(read_ratio())
            logits.append(out.logits[:, -1].float())
    return evicted, ratios, torch.cat(logits)


CASES = [  # (surrogate type, window, sizes of the multi-token forwards, decode steps)
    pytest.param("mlp", 16, (64,), 60, id="mlp-w16-p64"),
    pytest.param("linear", 16, (64,), 60, id="linear-w16-p64"),
    pytest.param("mlp", 128, (200,), 60, id="mlp-w128-p200"),
    # a second multi-token forward against the pruned cache (a question after a context). Kept short: kvpress masks
    # with a fake key found by `search_hyperplane`, which needs all queries of a KV group in one half-space; with
    # head_dim 16, 2 query heads per group and 24 tokens (48 queries) it raises "Could not find fake keys".
    pytest.param("mlp", 16, (40, 6), 60, id="mlp-w16-p40-q6"),
    # a prompt shorter than the window: nothing is decided in prefill, decisions start mid-decode
    pytest.param("linear", 128, (64,), 100, id="linear-w128-p64"),
]


@pytest.mark.parametrize(("model_type", "window", "chunks", "decode_steps"), CASES)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_evictions_equal_dms_press(tmp_path, arch, model_type, window, chunks, decode_steps):
    reference_model = tiny_model(arch, attn_implementation="sdpa")
    model = tiny_model(arch, attn_implementation="sdpa")  # same seed: identical weights, untouched by kvpress
    _, directory = surrogate_dir(tmp_path, model, model_type)
    tokens = random_tokens(sum(chunks) + decode_steps, seed=sum(chunks) + window)

    # kvpress
    scorer_press = local_kvzap_press(reference_model, directory, model_type)
    kvpress_scores = RecordingKVpressScores(scorer_press)
    dms = kvpress.DMSPress(scorer_press, threshold=THRESHOLD, sliding_window_size=window, decoding=True)
    with dms(reference_model):
        expected, expected_ratios, expected_logits = drive(
            reference_model,
            tokens,
            chunks,
            lambda cache: kvpress_evicted(reference_model),
            lambda: dms.compression_ratio,
        )

    # ours
    method = build_method(
        model, MethodConfig(method="kvzap", surrogate=str(directory), threshold=THRESHOLD, window=window)
    )
    method.scorer = ours_scores = RecordingScorer(method.scorer)
    with compress(model, method) as session:
        got, ratios, logits = drive(
            model, tokens, chunks, ours_evicted, lambda: session.stats().achieved_compression_ratio
        )

    # no score is ambiguous at the threshold
    num_layers = model.config.num_hidden_layers
    for layer_idx in range(num_layers):
        theirs = torch.cat(kvpress_scores.scores[layer_idx], dim=-1)
        assert float((theirs - THRESHOLD).abs().min()) > MARGIN, "a score lies at the threshold: change the seed"

    # the same evictions after prefill and after every later forward, in every layer
    assert len(got) == len(expected) == len(chunks) + decode_steps
    for step, (theirs, mine) in enumerate(zip(expected, got)):
        phase = "prefill" if step == 0 else ("chunk" if step < len(chunks) else "decode")
        for layer_idx in range(num_layers):
            assert mine[layer_idx] == theirs[layer_idx], (
                f"forward {step} ({phase}), layer {layer_idx}: "
                f"only kvpress {sorted(theirs[layer_idx] - mine[layer_idx])[:8]}, "
                f"only ours {sorted(mine[layer_idx] - theirs[layer_idx])[:8]}"
            )
    # ... and the test means something: evictions in prefill (when the prompt exceeds the window) and while
    # decoding, in every layer, but not everything
    total_heads = model.config.num_key_value_heads
    for layer_idx in range(num_layers):
        after_prefill, before_decode, final = (expected[i][layer_idx] for i in (0, len(chunks) - 1, -1))
        assert bool(after_prefill) == (chunks[0] > window), f"layer {layer_idx}: prefill evictions {len(after_prefill)}"
        assert final > before_decode, f"layer {layer_idx}: nothing evicted while decoding"
        decided = total_heads * (tokens.shape[1] - window)
        assert len(final) < decided, f"layer {layer_idx}: everything was evicted"
    if len(chunks) > 1:
        assert all(expected[1][i] > expected[0][i] for i in range(num_layers)), "the second chunk evicted nothing"

    # the same scores were computed on both sides (one per token and layer, from its own hidden state)
    for layer_idx in range(num_layers):
        theirs = torch.cat(kvpress_scores.scores[layer_idx], dim=-1)
        mine = torch.cat(ours_scores.scores[layer_idx], dim=-1)
        assert mine.shape == theirs.shape == (1, model.config.num_key_value_heads, tokens.shape[1])
        torch.testing.assert_close(mine, theirs, atol=MARGIN / 2, rtol=0)
    # the same compression ratio (SPEC section 3 formula) after every forward
    assert ratios == pytest.approx(expected_ratios, abs=1e-12)
    # fake-key masking (kvpress) vs removal (ours): the same attention, up to rounding
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
