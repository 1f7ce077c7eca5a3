"""KVzip+ as an inference-time oracle: the teacher's scores of the actual context, for `KVzipPlusScorer`.

Before the compressed prefill, every batch row's real tokens are scored by one KVzip+ (or KVzip) pass over
`context + bridge + context`, where the bridge is what the chat template puts between the two copies of the
training teacher's repeat prompt (`\\n\\nRepeat the previous context exactly.` and the turn markers). The scores then
feed the same policies as KVzap (method `kvzip_plus`: threshold, prefill only, or AdaKV fixed ratio):

    method = build_method(model, MethodConfig(method="kvzip_plus", threshold=-4.0), tokenizer=tokenizer)
    method.scorer.prepare(inputs["input_ids"], inputs["attention_mask"])
    with compress(model, method) as session:
        model(**inputs)

Prefill only: the scores exist for the context that was scored, so decoding steps cannot be scored (KVzip costs a
second pass over the context, about 2-3x a prefill). Pass the same `input_ids` to the model as to the oracle.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import KVzapError
from ..teacher import REPEAT_INSTRUCTION, render_repeat_text, run_teacher

_PLACEHOLDER = "KVZAPCONTEXTPLACEHOLDER"


def repeat_bridge_ids(tokenizer: Any) -> list[int]:
    """Token ids of the text between the context and its copy in the teacher's repeat prompt."""
    rendered, _ = render_repeat_text(tokenizer, _PLACEHOLDER)
    first = rendered.find(_PLACEHOLDER)
    second = rendered.find(_PLACEHOLDER, first + len(_PLACEHOLDER))
    bridge = rendered[first + len(_PLACEHOLDER) : second] if second > first >= 0 else REPEAT_INSTRUCTION + "\n"
    return tokenizer(bridge, add_special_tokens=False)["input_ids"]


def context_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    plus: bool = True,
    attention: str = "auto",
) -> list[torch.Tensor]:
    """Log KVzip+ scores of every real token, per layer (B, H_kv, n) float32, indexed by real-token position.

    Padding (attention_mask 0) is skipped; row b's i-th real token is column i (later columns of shorter rows are 0).
    """
    bridge = torch.tensor(repeat_bridge_ids(tokenizer), dtype=torch.long)
    rows = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b].cpu()
        rows.append(ids[attention_mask[b].cpu().bool()] if attention_mask is not None else ids)
    n_max = max(len(r) for r in rows)
    n_layers = model.config.num_hidden_layers
    scores: list[torch.Tensor | None] = [None] * n_layers
    for b, ids in enumerate(rows):
        n = len(ids)
        if n == 0:
            continue
        extended = torch.cat([ids, bridge, ids])[None]
        start = n + len(bridge)

        def sink(layer_idx: int, hidden: torch.Tensor, log_scores: torch.Tensor, b=b, n=n) -> None:
            if scores[layer_idx] is None:
                scores[layer_idx] = torch.zeros(len(rows), log_scores.shape[1], n_max)
            scores[layer_idx][b, :, :n] = log_scores.T.float().cpu()

        run_teacher(model, extended, queries=(start, start + n), keys=(0, n), sink=sink, plus=plus, attention=attention)
    if any(s is None for s in scores):
        raise KVzapError("the oracle got no real tokens to score: check input_ids and attention_mask")
    return scores  # type: ignore[return-value]
