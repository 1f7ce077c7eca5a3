"""How a prompt reaches a compressed cache before generation: the evaluation protocol.

- `paper` (default): the context is prefilled and pruned first, then the question is processed against the pruned
  cache (kvpress's pipeline, used for every number in the KVzap paper); the question never sees evicted tokens.
- `chunked`: the prompt is prefilled in chunks of `prefill_chunk` tokens, each against the already-pruned cache.
- `dense`: one dense prefill over the whole prompt, pruned afterwards (the question attends to everything, which
  flatters every method).

A batch may hold rows whose questions have different lengths: the context block and the question block are
left-padded separately, so padding sits in the middle of a row, where the compact cache simply never keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROTOCOLS = ("paper", "chunked", "dense")


@dataclass
class PreparedBatch:
    """Token ids and mask with the prefix to prefill by hand; `generate` then processes the remaining columns."""

    input_ids: torch.Tensor  # (B, W)
    attention_mask: torch.Tensor  # (B, W)
    prefill_chunks: list[int]  # widths of the forwards run before `generate` (their sum < W)


def split_context_question(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, question_tokens: list[int]
) -> PreparedBatch:
    """Re-pack a left-padded batch as [left-padded contexts | left-padded questions] (question = last n tokens).

    Every row needs at least one question token, so that generation starts from each row's last real token.
    """
    contexts, questions = [], []
    for ids, mask, n_question in zip(input_ids, attention_mask, question_tokens):
        real = ids[mask.bool()]
        contexts.append(real[: len(real) - n_question])
        questions.append(real[len(real) - n_question :])
    ctx_ids, ctx_mask = _left_pad(contexts, input_ids.new_zeros(()))
    q_ids, q_mask = _left_pad(questions, input_ids.new_zeros(()))
    chunks = [ctx_ids.shape[1]] if ctx_ids.shape[1] > 0 else []
    return PreparedBatch(torch.cat([ctx_ids, q_ids], 1), torch.cat([ctx_mask, q_mask], 1), chunks)


def chunk_widths(width: int, chunk: int) -> list[int]:
    """Widths of the manual prefill forwards for a prompt of `width` columns: all but the last token, by `chunk`."""
    head = width - 1
    return [min(chunk, head - start) for start in range(0, head, chunk)]


def _left_pad(sequences: list[torch.Tensor], pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in sequences), default=0)
    ids = pad.expand(len(sequences), width).clone()
    mask = torch.zeros(len(sequences), width, dtype=torch.long, device=pad.device)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = seq
            mask[row, width - len(seq) :] = 1
    return ids, mask
