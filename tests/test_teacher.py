"""KVzip+ teacher and oracle: vectorised scores equal the formula evaluated loop by loop, spans, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvzap_eval import MethodConfig, build_method
from kvzap_eval.errors import ConfigError, KVzapError, TeacherError
from kvzap_eval.runtime.oracle import context_scores, repeat_bridge_ids
from kvzap_eval.runtime.scorers import KVzipPlusScorer, LayerCall
from kvzap_eval.runtime.session import compress
from kvzap_eval.teacher import (
    SCORE_FLOOR,
    build_repeat_prompt,
    run_teacher,
    teacher_scores,
)

from .conftest import tiny_model

WORDS = ["<unk>", "<|user|>", "<|assistant|>", "<end>", "Repeat", "the", "previous", "context", "exactly."]
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }} <end>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def word_tokenizer(chat_template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer (ids < 128, the tiny models' vocabulary) with a minimal chat template."""
    vocab = WORDS + [f"w{i}" for i in range(128 - len(WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


def words(n: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, 100, (n,), generator=g))


# ------------------------------------------------------------------------------------------ loop reference


@torch.no_grad()
def loop_scores(model, input_ids, queries, keys, plus=True) -> torch.Tensor:
    """The formula, one (layer, KV head, key, query, query head) at a time, in float64: (L, n_keys, H_kv)."""
    model.set_attn_implementation("eager")
    out = model(input_ids, output_attentions=True, output_hidden_states=True)
    cfg = model.config
    h_q, h_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    group = h_q // h_kv
    result = torch.zeros(cfg.num_hidden_layers, keys[1] - keys[0], h_kv, dtype=torch.float64)
    for layer_idx, layer in enumerate(model.model.layers):
        attn = out.attentions[layer_idx][0].double()  # (H_q, T, T)
        h = layer.input_layernorm(out.hidden_states[layer_idx])[0].double()  # post-norm input of this layer
        d = layer.self_attn.head_dim
        v = layer.self_attn.v_proj.double()(h).view(-1, h_kv, d)  # (T, H_kv, d)
        w_o = layer.self_attn.o_proj.weight.double()
        for g in range(h_kv):
            for n, i in enumerate(range(*keys)):
                best = 0.0
                for head in range(g * group, (g + 1) * group):
                    wov = torch.linalg.vector_norm(w_o[:, head * d : (head + 1) * d] @ v[i, g]).item()
                    for j in range(*queries):
                        s = attn[head, j, i].item()
                        if plus:
                            s = s * wov / torch.linalg.vector_norm(h[j]).item()
                        best = max(best, s)
                result[layer_idx, n, g] = math.log(max(best, SCORE_FLOOR))
        layer.self_attn.v_proj.float()
    return result


@pytest.mark.parametrize("attention", ["eager", "block"])
@pytest.mark.parametrize("plus", [True, False], ids=["kvzip+", "kvzip"])
def test_scores_equal_loop_by_loop_formula(arch, attention, plus):
    model = tiny_model(arch)
    ids = torch.randint(1, 128, (1, 23), generator=torch.Generator().manual_seed(3))
    queries, keys = (13, 22), (2, 11)  # spans inside the sequence; a trailing token after the queries
    got_y, got_x = {}, {}

    def sink(layer_idx, hidden, log_scores):
        got_x[layer_idx], got_y[layer_idx] = hidden.clone(), log_scores.clone()

    run_teacher(model, ids, queries=queries, keys=keys, sink=sink, plus=plus, attention=attention)
    expected = loop_scores(model, ids, queries, keys, plus)
    assert sorted(got_y) == [0, 1]
    for layer_idx, scores in got_y.items():
        assert scores.shape == (keys[1] - keys[0], model.config.num_key_value_heads)
        torch.testing.assert_close(scores.double(), expected[layer_idx], atol=2e-5, rtol=1e-5)


def test_hidden_states_are_the_post_norm_inputs_of_the_context(llama):
    ids = torch.randint(1, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    got = {}
    run_teacher(llama, ids, queries=(12, 20), keys=(1, 9), sink=lambda i, h, y: got.setdefault(i, h.clone()))
    with torch.no_grad():
        states = llama(ids, output_hidden_states=True).hidden_states
    for i, layer in enumerate(llama.model.layers):
        torch.testing.assert_close(got[i], layer.input_layernorm(states[i])[0, 1:9], atol=1e-5, rtol=1e-5)


def test_teacher_restores_the_attention_implementation(llama):
    llama.set_attn_implementation("sdpa")
    run_teacher(llama, torch.ones(1, 12, dtype=torch.long), queries=(7, 12), keys=(1, 6), sink=lambda *a: None)
    assert llama.config._attn_implementation == "sdpa"


# -------------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("template", [TEMPLATE, None], ids=["chat-template", "plain"])
def test_repeat_prompt_spans_cover_the_context_and_its_copy(template):
    tokenizer = word_tokenizer(template)
    text = words(30)
    prompt = build_repeat_prompt(tokenizer, "  " + text + "\n")
    (s0, e0), (s1, e1) = prompt.original, prompt.repeated
    ids = prompt.input_ids[0]
    assert e0 - s0 == 30 and prompt.n_context == 30
    assert torch.equal(ids[s0:e0], ids[s1:e1])
    assert tokenizer.decode(ids[s0:e0]) == text
    assert e1 == len(ids)  # cut after the repeated copy
    assert "Repeat" in tokenizer.convert_ids_to_tokens(ids[e0:s1].tolist())


def test_empty_context_is_refused():
    with pytest.raises(TeacherError, match="empty"):
        build_repeat_prompt(word_tokenizer(), "   \n")


def test_teacher_scores_stack_all_layers(llama):
    out = teacher_scores(llama, build_repeat_prompt(word_tokenizer(), words(12)))
    assert out.hidden.shape == (2, 12, 64) and out.log_scores.shape == (2, 12, 2)
    assert torch.isfinite(out.log_scores).all()


def test_model_without_attention_weights_is_refused(llama):
    def drop_weights(module, args, kwargs, output):
        return output[0], None

    handles = [layer.self_attn.register_forward_hook(drop_weights, with_kwargs=True) for layer in llama.model.layers]
    try:
        with pytest.raises(TeacherError, match="no attention probabilities under eager attention"):
            run_teacher(
                llama,
                torch.ones(1, 10, dtype=torch.long),
                queries=(6, 10),
                keys=(0, 4),
                sink=lambda *a: None,
                attention="eager",
            )
    finally:
        for h in handles:
            h.remove()


def test_unknown_attention_mode_is_refused(llama):
    with pytest.raises(ConfigError, match="teacher attention"):
        run_teacher(
            llama,
            torch.ones(1, 8, dtype=torch.long),
            queries=(5, 8),
            keys=(0, 3),
            sink=lambda *a: None,
            attention="flash",
        )


# --------------------------------------------------------------------------------------------------- oracle


def test_oracle_scores_each_row_like_the_teacher_on_its_real_tokens(llama):
    tokenizer = word_tokenizer()
    bridge = torch.tensor(repeat_bridge_ids(tokenizer))
    assert tokenizer.convert_ids_to_tokens(bridge.tolist())[0] == "Repeat"
    ids = torch.randint(5, 128, (2, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    scores = context_scores(llama, tokenizer, ids, mask)
    assert len(scores) == 2 and scores[0].shape == (2, 2, 14)
    real = ids[1, 4:]
    expected = {}
    run_teacher(
        llama,
        torch.cat([real, bridge, real])[None],
        queries=(10 + len(bridge), 20 + len(bridge)),
        keys=(0, 10),
        sink=lambda i, h, y: expected.setdefault(i, y),
    )
    torch.testing.assert_close(scores[1][1, :, :10], expected[1].T)


def test_kvzip_plus_keeps_exactly_the_context_tokens_scoring_at_least_tau(llama):
    tokenizer = word_tokenizer()
    ids = torch.randint(5, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    expected = context_scores(llama, tokenizer, ids)[0][0, 0]  # layer 0, row 0, KV head 0
    tau = float(expected.median())
    method = build_method(llama, MethodConfig(method="kvzip_plus", threshold=tau, window=0), tokenizer=tokenizer)
    method.scorer.prepare(ids, None)
    with compress(llama, method) as session:
        llama(ids)
    kept = session.cache.layers[0].positions[0, 0]
    assert set(kept[kept >= 0].tolist()) == set((expected >= tau).nonzero().flatten().tolist())


def test_kvzip_plus_refuses_decoding_and_other_inputs(llama):
    scorer = KVzipPlusScorer(llama, word_tokenizer())

    def score(token_index):
        hidden = torch.zeros(1, token_index.shape[1], 64)
        return scorer.score(LayerCall(0, hidden, token_index, module=None, kwargs={}, layer=None))

    with pytest.raises(RuntimeError, match="prepare"):
        score(torch.arange(8)[None])
    scorer.prepare(torch.randint(5, 128, (1, 8)), None)
    with pytest.raises(KVzapError, match="prefill only"):
        score(torch.tensor([[8]]))
    with pytest.raises(KVzapError, match="same input_ids"):
        score(torch.arange(9)[None])
    assert score(torch.arange(8)[None]).shape == (1, 2, 8)
