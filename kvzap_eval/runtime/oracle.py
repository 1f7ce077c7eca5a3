"""KVzip+ as an inference-time oracle: score the actual context with the teacher's repeat pass, then prune.

Before the compressed prefill, every batch row's real tokens are scored by one KVzip+ (or KVzip) pass over
`context + bridge + context`, where the bridge is what the chat template puts between the two copies of the
training teacher's repeat prompt (`\\n\\nRepeat the previous context exactly.` and the turn markers). The scores then
feed the same policies as KVzap: threshold (DMS, prefill only) or fixed ratio (per head, or per layer as AdaKV).

    method = oracle_method(model, tokenizer, inputs["input_ids"], inputs["attention_mask"], threshold=-4.0)
    with compress(model, method) as session:
        model(**inputs)

Prefill only: the scores exist for the context that was scored, so decoding steps cannot be scored (KVzip costs a
second pass over the context, about 2-3x a prefill). Pass the same `input_ids` to the model as to the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, KVzapError
from ..settings import DEFAULT_WINDOW
from ..teacher import REPEAT_INSTRUCTION, render_repeat_text, run_teacher
from .policies import FixedRatioPolicy, Policy, ThresholdPolicy
from .scorers import Scorer

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


@dataclass
class OracleScorer(Scorer):
    """Returns precomputed per-layer scores for the prefill tokens, by their index among real tokens."""

    scores: list[torch.Tensor]

    def __call__(self, layer_idx, hidden_states, positions):
        if positions.shape[1] == 1:
            raise KVzapError("the KVzip+ oracle scores the prefill only: use it with decoding=False")
        table = self.scores[layer_idx].to(hidden_states.device)
        if positions.shape[0] != table.shape[0] or int(positions.max()) >= table.shape[-1]:
            raise KVzapError("the model got other tokens than the oracle scored: pass the same input_ids to both")
        index = positions.clamp_min(0)[:, None, :].expand(-1, table.shape[1], -1)
        return table.gather(2, index)


@dataclass(frozen=True)
class OracleConfig:
    """Oracle settings: exactly one of `threshold` (DMS, window) or `compression_ratio` (`scope` head or layer)."""

    threshold: float | None = None
    compression_ratio: float | None = None
    window: int = DEFAULT_WINDOW
    scope: str = "layer"
    alpha: float = 0.2
    plus: bool = True
    attention: str = "auto"

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.compression_ratio is None):
            raise ConfigError("the oracle needs exactly one of threshold=<log-score> or compression_ratio=<[0, 1)>")
        oracle_policy(self)  # checks threshold, window, ratio, scope and alpha now, not at the first prefill


@dataclass
class OracleMethod:
    """What `compress(model, method)` needs: a scorer and a policy (duck-typed like `methods.Method`)."""

    config: OracleConfig
    scorer: OracleScorer
    policy: Policy


def oracle_policy(config: OracleConfig) -> Policy:
    """Threshold policy without decoding, or a fixed-ratio policy."""
    if config.threshold is not None:
        return ThresholdPolicy(config.threshold, config.window, decoding=False)
    return FixedRatioPolicy(config.compression_ratio, scope=config.scope, alpha=config.alpha)


def oracle_method(
    model: torch.nn.Module,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: OracleConfig | None = None,
    **settings: Any,
) -> OracleMethod:
    """Score `input_ids` with KVzip+ now and return the method that prunes their prefill (call outside compress)."""
    config = config or OracleConfig(**settings)
    policy = oracle_policy(config)
    scores = context_scores(model, tokenizer, input_ids, attention_mask, plus=config.plus, attention=config.attention)
    return OracleMethod(config, OracleScorer(scores), policy)
