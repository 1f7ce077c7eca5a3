"""KVzip+ teacher: the log importance of every context token per KV head, from one eager pass over a repeat prompt.

KVzip+ (KVzap paper, arXiv 2601.07891, eq. 3; kvpress `kvzap/data.py`): the context is followed by an instruction to
repeat it and by the context again, and one forward pass with eager attention (probabilities needed) is run. For a
decoder layer with attention probabilities A (B, H_q, T, T), post-`input_layernorm` hidden states h, values v_i
(of the KV head that query head h reads) and W_O^h the slice of `o_proj` that reads query head h:

    S[h, j, i] = A[h, j, i] * ||W_O^h v_i|| / ||h_j||
    y[i, g]    = log( max over queries j of the repeated span and over the query heads h of KV group g of S[h, j, i] )

for every token i of the original span. KVzip (without "+") drops the two norms. Scores are computed in float32 and
floored at the smallest normal float32 before the log, so an underflowed probability gives -87.3, never -inf.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .model_info import attention_modules
from .train_errors import TeacherError

REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly."
#: Floor applied to scores before the log (an all-zero attention column would otherwise give -inf).
SCORE_FLOOR = torch.finfo(torch.float32).tiny

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
    hidden: torch.Tensor,
    values: torch.Tensor,
    o_weight: torch.Tensor,
    *,
    queries: Span,
    keys: Span,
    plus: bool = True,
) -> torch.Tensor:
    """Log KVzip+ (or KVzip with `plus=False`) scores of the key span, (B, H_kv, n_keys), in float32.

    attn (B, H_q, T_q, T_k) attention probabilities; hidden (B, T_q, D) post-norm inputs of the queries; values
    (B, H_kv, T_k, d); o_weight (D_out, H_q * d), `o_proj.weight`. Query head h reads KV head h // (H_q / H_kv).
    """
    (q0, q1), (k0, k1) = queries, keys
    b, h_q = attn.shape[:2]
    h_kv, d = values.shape[1], values.shape[-1]
    scores = attn[:, :, q0:q1, k0:k1].float()
    if plus:
        scores = scores / hidden[:, q0:q1].float().norm(dim=-1)[:, None, :, None]
    scores = scores.amax(dim=2)  # (B, H_q, n); the ||W_O v_i|| factor is positive, so it commutes with the max
    if plus:
        w_o = o_weight.float().T.reshape(h_q, d, -1)  # rows of W_O^T that read query head h
        gram = w_o @ w_o.transpose(1, 2)  # (H_q, d, d): ||W_O^h v||^2 = v^T G_h v
        v = values[:, :, k0:k1].float().repeat_interleave(h_q // h_kv, dim=1)  # (B, H_q, n, d)
        scores = scores * torch.einsum("bhnd,hde,bhne->bhn", v, gram, v).clamp_min(0).sqrt()
    scores = scores.view(b, h_kv, h_q // h_kv, -1).amax(dim=2)
    return scores.clamp_min(SCORE_FLOOR).log()


# ------------------------------------------------------------------------------------------------ the pass


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` with eager attention inside the block, restoring its implementation afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _layer_values(kwargs: dict, layer_idx: int) -> torch.Tensor:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        raise TeacherError("the attention layer received no cache to read values from: run with use_cache=True")
    return cache.layers[layer_idx].values


def _teacher_hook(queries: Span, keys: Span, plus: bool, sink: LayerSink, model_name: str):
    def hook(module, args, kwargs, output):
        attn = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if attn is None:
            raise TeacherError(
                f"model {model_name!r} returns no attention probabilities under eager attention: the KVzip+ teacher "
                "needs an architecture whose self_attn returns them (Llama, Mistral, Qwen2/3)"
            )
        hidden = kwargs["hidden_states"]
        values = _layer_values(kwargs, module.layer_idx)
        scores = kvzip_log_scores(attn, hidden, values, module.o_proj.weight, queries=queries, keys=keys, plus=plus)
        sink(module.layer_idx, hidden[0, keys[0] : keys[1]], scores[0].T)
        return None

    return hook


def run_teacher(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    queries: Span,
    keys: Span,
    sink: LayerSink,
    plus: bool = True,
) -> None:
    """One eager forward of `input_ids` (1, T); `sink` receives each layer's key-span hidden states and log-scores.

    Only the decoder runs (no LM head). The model's attention implementation is restored afterwards.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise TeacherError(f"the teacher scores one sequence at a time: got input_ids of shape {list(input_ids.shape)}")
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    hook = _teacher_hook(queries, keys, plus, sink, name)
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attention_modules(model)]
    decoder = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    try:
        with eager_attention(model), torch.inference_mode():
            decoder(input_ids=input_ids.to(device), use_cache=True)
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class TeacherOutput:
    """Per-layer teacher data of one prompt: hidden (L, n, D) post-norm states of the scored tokens, log_scores
    (L, n, H_kv)."""

    hidden: torch.Tensor
    log_scores: torch.Tensor


def teacher_scores(model: torch.nn.Module, prompt: RepeatPrompt, *, plus: bool = True) -> TeacherOutput:
    """KVzip+ (or KVzip) log-scores and hidden states of the original span of a repeat prompt, for every layer."""
    hidden: dict[int, torch.Tensor] = {}
    scores: dict[int, torch.Tensor] = {}

    def sink(layer_idx: int, h: torch.Tensor, y: torch.Tensor) -> None:
        hidden[layer_idx], scores[layer_idx] = h.float().cpu(), y.cpu()

    run_teacher(model, prompt.input_ids, queries=prompt.repeated, keys=prompt.original, sink=sink, plus=plus)
    order = sorted(hidden)
    return TeacherOutput(torch.stack([hidden[i] for i in order]), torch.stack([scores[i] for i in order]))
