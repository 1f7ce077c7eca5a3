"""KVzip+ teacher: the log importance of every context token per KV head, from one eager pass over a repeat prompt.

KVzip+ (KVzap paper, arXiv 2601.07891, eq. 3; kvpress `kvzap/data.py`): the context is followed by an instruction to
repeat it and by the context again, and one forward pass with eager attention (probabilities needed) is run. For a
decoder layer with attention probabilities A (B, H_q, T, T), post-`input_layernorm` hidden states h, values v_i
(of the KV head that query head h reads) and W_O^h the slice of `o_proj` that reads query head h:

    S[h, j, i] = A[h, j, i] * ||W_O^h v_i|| / ||h_j||
    y[i, g]    = log( max over queries j of the repeated span, and query heads h of KV group g, of S[h, j, i] )

for every token i of the original span. KVzip (without "+") drops the two norms. Scores are computed in float32
and floored at the smallest normal float32 before the log, so an underflowed probability gives -87.3, never -inf.

The eager pass materialises A for all T x T pairs. The default "block" mode takes the layer output from SDPA and
computes the same softmax probabilities for the (repeated span x original span) block only, about 3x cheaper on
CPU; the tests pin both modes to a loop-by-loop evaluation of the formula.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .errors import ConfigError, TeacherError
from .llm.model_info import SUPPORTED_MODEL_TYPES, attention_modules

REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly."
#: Floor applied to scores before the log (an all-zero attention column would otherwise give -inf).
SCORE_FLOOR = torch.finfo(torch.float32).tiny

#: Attention implementation name of the block attention below, and the forward keyword that carries the spans.
TEACHER_ATTENTION = "kvzap_teacher"
SPANS_KWARG = "kvzap_teacher_spans"
ATTENTION_MODES = ("auto", "block", "eager")

Span = tuple[int, int]
#: Called once per decoder layer: (layer index, hidden states (n, D) of the scored span, log-scores (n, H_kv)).
LayerSink = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class RepeatPrompt:
    """A tokenised repeat prompt, cut right after the repeated copy (later tokens cannot change the scores).

    `original` = [s0, e0) is the context's token span, `repeated` = [s1, e1) its copy, whose tokens are the queries.
    """

    input_ids: torch.Tensor  # (1, e1) int64
    original: Span
    repeated: Span

    @property
    def n_context(self) -> int:
        """Number of scored context tokens."""
        return self.original[1] - self.original[0]


def render_repeat_text(tokenizer: Any, text: str) -> tuple[str, bool]:
    """The repeat prompt as text, and whether the chat template made it (else the plain fallback is used).

    Chat template over [user: `text + REPEAT_INSTRUCTION`, assistant: `text`]; a tokenizer without a chat
    template gets `text + REPEAT_INSTRUCTION + "\\n" + text`.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "user", "content": text + REPEAT_INSTRUCTION},
            {"role": "assistant", "content": text},
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False), True
    return text + REPEAT_INSTRUCTION + "\n" + text, False


def _first_token_at(starts: torch.Tensor, char: int) -> int:
    """Index of the first token starting at or after character `char` (len(starts) - 1 = end sentinel)."""
    return int(torch.nonzero(starts >= char)[0, 0])


def build_repeat_prompt(tokenizer: Any, text: str) -> RepeatPrompt:
    """Tokenise the repeat prompt of `text` and locate its original and repeated spans by character offsets."""
    text = text.strip()
    if not text:
        raise TeacherError("the text to score is empty: pass a non-empty context")
    rendered, templated = render_repeat_text(tokenizer, text)
    first = rendered.find(text)
    second = rendered.find(text, first + len(text)) if first >= 0 else -1
    if second < 0:
        raise TeacherError("the chat template altered the context text: score it with a tokenizer without a template")
    if not getattr(tokenizer, "is_fast", False):
        raise TeacherError("the teacher needs character offsets: load the tokenizer with use_fast=True")
    enc = tokenizer(rendered, return_offsets_mapping=True, add_special_tokens=not templated, return_tensors="pt")
    starts = torch.cat([enc["offset_mapping"][0, :, 0], torch.tensor([len(rendered)])])
    s0, e0 = _first_token_at(starts, first), _first_token_at(starts, first + len(text))
    s1, e1 = _first_token_at(starts, second), _first_token_at(starts, second + len(text))
    if e0 <= s0 or e1 <= s1:
        raise TeacherError("the context tokenises to an empty span: pass a longer context")
    return RepeatPrompt(enc["input_ids"][:, :e1].clone(), (s0, e0), (s1, e1))


# ------------------------------------------------------------------------------------------------- formula


def kvzip_log_scores(
    attn: torch.Tensor,
    query_hidden: torch.Tensor,
    values: torch.Tensor,
    o_weight: torch.Tensor,
    *,
    plus: bool = True,
) -> torch.Tensor:
    """Log KVzip+ (or KVzip with `plus=False`) scores of the keys, (B, H_kv, N), in float32.

    attn (B, H_q, R, N): attention probabilities of the R queries over the N scored keys; query_hidden (B, R, D):
    post-norm inputs of those queries; values (B, H_kv, N, d) of those keys; o_weight (D_out, H_q * d), the
    `o_proj.weight`. Query head h reads KV head h // (H_q / H_kv).
    """
    b, h_q = attn.shape[:2]
    h_kv, d = values.shape[1], values.shape[-1]
    scores = attn.float()
    if plus:
        scores = scores / query_hidden.float().norm(dim=-1)[:, None, :, None]
    scores = scores.amax(dim=2)  # (B, H_q, N); the ||W_O v_i|| factor is positive, so it commutes with the max
    if plus:
        w_o = o_weight.float().T.reshape(h_q, d, -1)  # rows of W_O^T that read query head h
        gram = w_o @ w_o.transpose(1, 2)  # (H_q, d, d): ||W_O^h v||^2 = v^T G_h v
        v = values.float().repeat_interleave(h_q // h_kv, dim=1)  # (B, H_q, N, d)
        scores = scores * torch.einsum("bhnd,hde,bhne->bhn", v, gram, v).clamp_min(0).sqrt()
    scores = scores.view(b, h_kv, h_q // h_kv, -1).amax(dim=2)
    return scores.clamp_min(SCORE_FLOOR).log()


# ---------------------------------------------------------------------------------------- block attention


def block_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal SDPA for the layer output, plus eager-softmax probabilities of the scored block only.

    Registered as `TEACHER_ATTENTION`. For one unpadded sequence in a fresh forward, returns (output, probs) with
    probs (1, H_q, R, N) = softmax over all visible keys of the R query rows, restricted to the N scored keys. The
    spans come through the forward keyword `SPANS_KWARG`; without it the probabilities are None.
    """
    if query.shape[0] != 1 or key.shape[-2] != query.shape[-2]:
        raise TeacherError("block attention scores one unpadded sequence in a fresh forward: use attention='eager'")
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise TeacherError(f"this model's attention uses {unsupported}: run the teacher with attention='eager'")
    window = kwargs.get("sliding_window")
    if window is not None and window < key.shape[-2]:
        raise TeacherError("this model's sliding window is shorter than the prompt: use attention='eager'")
    groups = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        query, keys, value.repeat_interleave(groups, dim=1), is_causal=True, scale=scaling
    )
    out = out.transpose(1, 2).contiguous()
    spans = kwargs.get(SPANS_KWARG)
    if spans is None:
        return out, None
    (q0, q1), (k0, k1) = spans
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(query[:, :, q0:q1].float(), keys[:, :, :q1].float().transpose(-1, -2)) * scale
    visible = torch.ones(q1 - q0, q1, dtype=torch.bool, device=query.device).tril_(q0)
    logits.masked_fill_(~visible, float("-inf"))
    probs = (logits[..., k0:k1] - logits.logsumexp(dim=-1, keepdim=True)).exp_()
    return out, probs


def register_block_attention() -> None:
    """Register `block_attention` with transformers under `TEACHER_ATTENTION` (idempotent)."""
    AttentionInterface.register(TEACHER_ATTENTION, block_attention)


# ------------------------------------------------------------------------------------------------ the pass


@contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run `model` with the named attention implementation inside the block, restoring the previous one after."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _layer_values(kwargs: dict, layer_idx: int) -> torch.Tensor:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        raise TeacherError("the attention layer received no cache to read values from: run with use_cache=True")
    return cache.layers[layer_idx].values


def _teacher_hook(queries: Span, keys: Span, block: bool, plus: bool, sink: LayerSink, model_name: str):
    (q0, q1), (k0, k1) = queries, keys

    def hook(module, args, kwargs, output):
        attn = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if attn is None:
            raise TeacherError(
                f"model {model_name!r} returns no attention probabilities under eager attention: the KVzip+ teacher "
                "needs an architecture whose self_attn returns them (Llama, Mistral, Qwen2/3)"
            )
        if not block:
            attn = attn[:, :, q0:q1, k0:k1]
        hidden = kwargs["hidden_states"]
        values = _layer_values(kwargs, module.layer_idx)[:, :, k0:k1]
        scores = kvzip_log_scores(attn, hidden[:, q0:q1], values, module.o_proj.weight, plus=plus)
        sink(module.layer_idx, hidden[0, k0:k1], scores[0].T)

    return hook


def _resolve_attention(model: torch.nn.Module, attention: str) -> str:
    if attention not in ATTENTION_MODES:
        raise ConfigError(f"teacher attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    if attention == "auto":
        return "block" if getattr(model.config, "model_type", None) in SUPPORTED_MODEL_TYPES else "eager"
    return attention


def run_teacher(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    queries: Span,
    keys: Span,
    sink: LayerSink,
    plus: bool = True,
    attention: str = "auto",
) -> None:
    """One forward of `input_ids` (1, T); `sink` receives each layer's key-span hidden states and log-scores.

    `attention="eager"` runs the model's eager attention and reads its full probabilities; `"block"` runs SDPA and
    computes the same softmax probabilities for the queries x keys block only (about 3x cheaper on CPU); `"auto"`
    picks block for the architectures the runtime supports. Only the decoder runs (no LM head); the model's
    attention implementation is restored afterwards.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise TeacherError(f"the teacher scores one sequence at a time: got input_ids of shape {list(input_ids.shape)}")
    mode = _resolve_attention(model, attention)
    if mode == "block":
        register_block_attention()
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    hook = _teacher_hook(queries, keys, mode == "block", plus, sink, name)
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    decoder = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    extra = {SPANS_KWARG: (queries, keys)} if mode == "block" else {}
    try:
        with attention_implementation(model, TEACHER_ATTENTION if mode == "block" else "eager"), torch.inference_mode():
            decoder(input_ids=input_ids.to(device), use_cache=True, **extra)
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class TeacherOutput:
    """Per-layer teacher data of one prompt: hidden (L, n, D) post-norm states of the scored tokens, log_scores
    (L, n, H_kv)."""

    hidden: torch.Tensor
    log_scores: torch.Tensor


def teacher_scores(
    model: torch.nn.Module, prompt: RepeatPrompt, *, plus: bool = True, attention: str = "auto"
) -> TeacherOutput:
    """KVzip+ (or KVzip) log-scores and hidden states of the original span of a repeat prompt, for every layer."""
    hidden: dict[int, torch.Tensor] = {}
    scores: dict[int, torch.Tensor] = {}

    def sink(layer_idx: int, h: torch.Tensor, y: torch.Tensor) -> None:
        hidden[layer_idx], scores[layer_idx] = h.float().cpu(), y.cpu()

    run_teacher(
        model,
        prompt.input_ids,
        queries=prompt.repeated,
        keys=prompt.original,
        sink=sink,
        plus=plus,
        attention=attention,
    )
    order = sorted(hidden)
    return TeacherOutput(torch.stack([hidden[i] for i in order]), torch.stack([scores[i] for i in order]))
