"""lm-eval model `kvzap_hf`: `HFLM` whose generation and loglikelihood run with KVzap pruning.

    lm_eval --model kvzap_hf --model_args threshold=-5 --tasks kvzap_longctx --include_path tasks

Generation follows an evaluation protocol (`protocol.py`: `paper` by default, `chunked`, `dense`); loglikelihood
prefills the context with pruning and scores the continuation against the pruned cache, so multiple-choice and
perplexity tasks reflect compression (a single forward pass would not: lm-eval issue #3298). Statistics (achieved
compression, KV bytes, per-layer scorer latency) go to `results["config"]["kvzap"]` through `get_model_info()`,
and per sample to our tasks' `kv_compression` metric.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..errors import ConfigError
from ..llm.embedded import resolve_pretrained
from ..llm.loading import load_model_config
from ..runtime.methods import MethodConfig, build_method
from ..runtime.session import KVzapSession, ScorerTimer, compress
from ..runtime.stats import CompressionStats
from . import lm_eval_summary, sample_stats
from .lm_eval_preflight import check_current_command
from .model_args import OWN_ARGS, method_config_from_args
from .protocol import PreparedBatch, chunk_widths, split_context_question
from .run_stats import RunStats

#: from_pretrained keywords accepted besides HFLM's named parameters.
FROM_PRETRAINED_ARGS = {"attn_implementation", "low_cpu_mem_usage", "device_map"}


def _check_known(kwargs: dict) -> None:
    allowed = set(OWN_ARGS) | set(inspect.signature(HFLM.__init__).parameters) | FROM_PRETRAINED_ARGS
    allowed -= {"self", "kwargs"}
    for name in kwargs:
        if name not in allowed:
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown model_arg {name!r} for kvzap_hf{hint}: see README 'model_args'")


@dataclass
class BatchResult:
    """What one batch of requests gave: the output lm-eval gets (new tokens, or loglikelihood answers) and the
    measurements of its cache (statistics, scorer timings), recorded when the answers are handed out."""

    output: Any
    stats: CompressionStats
    timer: ScorerTimer


@dataclass
class LoglikelihoodBatch:
    """Contexts (left-padded) and continuations (right-padded, last token left out) of a loglikelihood batch."""

    context_ids: torch.Tensor
    context_mask: torch.Tensor
    continuation_ids: torch.Tensor
    mask: torch.Tensor  # contexts and continuations
    positions: torch.Tensor
    continuations: list[list[int]]  # the target tokens of each row

    @classmethod
    def of(cls, requests, device) -> LoglikelihoodBatch:
        """From lm-eval's (cache key, context tokens, continuation tokens) requests."""
        contexts = [torch.tensor(c, device=device) for _, c, _ in requests]
        ctx_ids, ctx_mask = _pad(contexts, left=True)
        cont_ids, cont_mask = _pad([torch.tensor(c[:-1], device=device) for _, _, c in requests], left=False)
        mask = torch.cat([ctx_mask, cont_mask], 1)
        return cls(ctx_ids, ctx_mask, cont_ids, mask, _positions(mask), [list(c) for _, _, c in requests])


class KVzapHFLM(HFLM):
    """HFLM with KVzap (or a baseline) compressing the KV cache of every request."""

    def __init__(self, pretrained: str | None = None, **kwargs) -> None:
        check_current_command()  # lm-eval tasks that cannot run offline, before anything loads
        _check_known(kwargs)
        own = {name: kwargs.pop(name) for name in list(kwargs) if name in OWN_ARGS}
        self.method_config, self.protocol, self.prefill_chunk = method_config_from_args(own)
        if isinstance(pretrained, (str, os.PathLike)) or pretrained is None:
            pretrained = resolve_pretrained(pretrained)
            load_model_config(pretrained)  # an unsupported or unloadable model fails here, before HFLM loads weights
        super().__init__(pretrained=pretrained, **kwargs)
        self._join_data_parallel()
        self.method = build_method(self.model, self.method_config, tokenizer=self.tokenizer)
        self._question_tokens: dict[tuple[int, ...], tuple[int, str | None, str]] = {}
        self._padding: Counter = Counter()  # request key -> copies lm-eval added to even out the ranks
        self._rolling_windows: int | None = None  # rolling loglikelihood with several ranks: real windows left
        self.run_stats = RunStats()  # this process's requests
        self._all_ranks_stats: RunStats | None = None  # rank 0: every rank's, gathered at each barrier

    def _join_data_parallel(self) -> None:
        """Take every process of an `accelerate launch` as a data-parallel rank, on any device.

        HFLM only turns data parallelism on when it counts more than one GPU, and ranks processes by their index on
        their own machine; kvzap_hf splits the requests over every launched process, CPU ones included, ranked by
        their global index so that several machines never share a rank.
        """
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

    def set_method(self, config: MethodConfig) -> None:
        """Switch the compression method between runs (the model stays loaded) and reset the statistics."""
        self.method_config = config
        self.method = build_method(self.model, config, tokenizer=self.tokenizer)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.run_stats = RunStats()
        self._all_ranks_stats = None

    # --- data parallel -----------------------------------------------------------------------------------------
    def _note_padding(self, requests, key) -> None:
        """Remember the copies of the last request lm-eval appends so that every rank runs as many requests.

        Their answers are dropped by lm-eval; their statistics must not count either, or the totals of a sharded
        run would differ from one process's.
        """
        self._padding = Counter()
        extra = _padding_copies(requests) if self.world_size > 1 else 0
        if extra > 0:
            self._padding[key(requests[-1])] = extra

    def barrier(self) -> None:
        """lm-eval's synchronisation point after each request type, on every rank: also gather the statistics."""
        super().barrier()
        if self.world_size > 1:
            parts = self.gather_object(self.run_stats, dst=0)
            if self.rank == 0:
                self._all_ranks_stats = RunStats.merged(parts)

    # --- generation --------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self._question_tokens = {}
        for request in requests:
            self._register_prompt(request)
        self._note_padding(requests, lambda request: self._prompt_ids(request.args[0]))
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def _prompt_ids(self, prompt: str) -> tuple[int, ...]:
        return tuple(self.tok_batch_encode([prompt])[0][0].tolist())

    def _register_prompt(self, request) -> None:
        prompt, gen_kwargs = request.args
        ids = list(self._prompt_ids(prompt))
        budget = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        if len(ids) + budget > self.max_length:
            raise ConfigError(
                f"prompt of {len(ids)} tokens + max_gen_toks {budget} exceeds max_length {self.max_length} "
                f"(task {request.task_name}, doc {request.doc_id}): raise max_length= or use shorter contexts"
            )
        doc = request.doc if isinstance(request.doc, dict) else {}
        question = doc.get("kvzap_question")
        n_question = self._count_question_tokens(prompt, question, len(ids)) if question else 0
        self._question_tokens[tuple(ids)] = (n_question, doc.get("kvzap_uid"), request.task_name)

    def _count_question_tokens(self, prompt: str, question: str, n_tokens: int) -> int:
        start = prompt.rfind(question)
        if start < 0:
            return 0
        special = self.tok_batch_encode([""])[0].shape[1]  # tokens added by the tokenizer itself (BOS)
        encoding = self.tokenizer(prompt, add_special_tokens=special > 0, return_offsets_mapping=True)
        if len(encoding["input_ids"]) != n_tokens:
            return 0
        return sum(1 for begin, end in encoding["offset_mapping"] if begin >= start and end > begin)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        mask = generation_kwargs.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones_like(context)
        keys = [tuple(ids[m.bool()].tolist()) for ids, m in zip(context, mask)]
        rows = [self._question_tokens.get(key, (0, None, None)) for key in keys]
        batch = self._prepare(context, mask, [n for n, _, _ in rows])
        budget = max_length - context.shape[1]
        result = self._generate(batch, budget, stop, generation_kwargs)
        self._record(result, [(key, uid, task) for key, (_, uid, task) in zip(keys, rows)])
        return torch.cat([context, result.output], dim=1)

    def _generate(self, batch: PreparedBatch, budget: int, stop, generation_kwargs: dict) -> BatchResult:
        """The model work of one generation batch with `self.method` (the shared-prefill engine replaces it)."""
        pruned = sum(batch.prefill_chunks) or batch.input_ids.shape[1]
        if self.method.scorer is not None:
            self.method.scorer.prepare(batch.input_ids[:, :pruned], batch.attention_mask[:, :pruned])
        return self.generate_after_prefill(self.method, batch, budget, stop, generation_kwargs)

    def generate_after_prefill(
        self, method, batch: PreparedBatch, budget: int, stop, generation_kwargs: dict, cache=None
    ) -> BatchResult:
        """Generate `budget` tokens at most with `method`: prefill `batch`'s context blocks with pruning (or take
        `cache`, the context already prefilled and pruned by `method`), then the rest of the prompt and the answer.
        The method's scorer must have been prepared for the context."""
        with compress(self.model, method) as session:
            if cache is None:
                cache = session.new_cache()
                with torch.no_grad():
                    self._prefill(batch, cache, session.cache_kwarg)
            pause = session.pause() if method.prefill_only and batch.prefill_chunks else nullcontext()
            with pause:
                out = super()._model_generate(
                    batch.input_ids,
                    batch.input_ids.shape[1] + budget,
                    stop,
                    attention_mask=batch.attention_mask,
                    **{session.cache_kwarg: cache},
                    **generation_kwargs,
                )
            return BatchResult(out[:, batch.input_ids.shape[1] :], session.stats(), session.timer)

    def _prepare(self, context: torch.Tensor, mask: torch.Tensor, question_tokens: list[int]) -> PreparedBatch:
        if self.protocol == "paper" and any(question_tokens):
            return split_context_question(context, mask, [max(1, n) for n in question_tokens])
        if self.protocol == "chunked" or (self.protocol == "paper" and self.prefill_chunk):
            return PreparedBatch(context, mask, chunk_widths(context.shape[1], self.prefill_chunk))
        return PreparedBatch(context, mask, [])

    def _prefill(self, batch: PreparedBatch, cache, cache_kwarg: str) -> None:
        start = 0
        for width in batch.prefill_chunks:
            end = start + width
            self.model(
                input_ids=batch.input_ids[:, start:end],
                attention_mask=batch.attention_mask[:, :end],
                position_ids=_positions(batch.attention_mask)[:, start:end],
                use_cache=True,
                logits_to_keep=1,  # the context's logits are not needed: no (tokens x vocab) tensor
                **{cache_kwarg: cache},
            )
            start = end

    # --- loglikelihood -----------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._request_tasks = {request.args: request.task_name for request in requests}
        self._note_padding(requests, lambda request: tuple(request.args))
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        """HFLM's rolling loglikelihood; with several ranks, the statistics count the real windows only.

        lm-eval evens out the ranks twice here: copies of the last request, then copies of the first window appended
        after all the real windows. Windows run in order, so counting the real ones is enough to skip the rest.
        """
        self._rolling_windows = None
        if self.world_size > 1 and requests:
            from lm_eval.utils import get_rolling_token_windows

            real = requests[: len(requests) - _padding_copies(requests)]
            self._rolling_windows = sum(
                sum(1 for _ in get_rolling_token_windows(self.tok_encode(r.args[0]), self.prefix_token_id,
                                                         self.max_length, 1))
                for r in real
            )  # fmt: skip
        try:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        finally:
            self._rolling_windows = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        size = self.batch_size if isinstance(self.batch_size, int) else 1
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            for index, answer in zip(chunk, self._score_batch([requests[i] for i in chunk])):
                results[index] = answer
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
                bar.update(1)
        bar.close()
        return results

    def _score_batch(self, batch) -> list[tuple[float, bool]]:
        """Prefill each context with pruning, then score its continuation against the pruned cache."""
        for _, context, continuation in batch:
            if len(context) + len(continuation) > self.max_length + 1:
                raise ConfigError(
                    f"context {len(context)} + continuation {len(continuation)} tokens exceed max_length "
                    f"{self.max_length}: raise max_length= or shorten the input"
                )
        result = self._score(LoglikelihoodBatch.of(batch, self.device))
        tasks = getattr(self, "_request_tasks", {})
        keys = [tuple(pair) if pair else None for pair, _, _ in batch]
        self._record(result, [(key, None, tasks.get(key)) for key in keys])
        return result.output

    def _score(self, batch: LoglikelihoodBatch) -> BatchResult:
        """The model work of one loglikelihood batch with `self.method` (the shared-prefill engine replaces it)."""
        if self.method.scorer is not None:
            self.method.scorer.prepare(batch.context_ids, batch.context_mask)
        with compress(self.model, self.method) as session, torch.no_grad():
            cache = session.new_cache()
            first = self.prefill_context_logits(batch, cache, session.cache_kwarg)
            return self.score_continuations(session, batch, cache, first)

    def prefill_context_logits(self, batch: LoglikelihoodBatch, cache, cache_kwarg: str) -> torch.Tensor:
        """Prefill the contexts into `cache` (inside a compress() block); the last position's logits (B, 1, V)."""
        return self.model(
            input_ids=batch.context_ids,
            attention_mask=batch.context_mask,
            position_ids=batch.positions[:, : batch.context_ids.shape[1]],
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg: cache},
        ).logits[:, -1:]

    def score_continuations(self, session: KVzapSession, batch: LoglikelihoodBatch, cache, first) -> BatchResult:
        """Inside `session`'s compress() block: score the continuations against `cache` (the contexts prefilled and
        pruned by the session's method; `first` their last logits). Answers: lm-eval's (log-likelihood, is greedy)."""
        logits = [first]
        if batch.continuation_ids.shape[1] > 0:
            with session.pause() if session.method.prefill_only else nullcontext(), torch.no_grad():
                rest = self.model(
                    input_ids=batch.continuation_ids,
                    attention_mask=batch.mask,
                    position_ids=batch.positions[:, batch.context_ids.shape[1] :],
                    use_cache=True,
                    **{session.cache_kwarg: cache},
                )
            logits.append(rest.logits)
        logprobs = F.log_softmax(torch.cat(logits, 1).float(), dim=-1)
        answers = []
        for row, continuation in enumerate(batch.continuations):
            target = torch.tensor(continuation, device=logprobs.device)
            row_logprobs = logprobs[row, : len(continuation)]
            total = row_logprobs.gather(1, target[:, None]).sum().item()
            answers.append((total, bool((row_logprobs.argmax(-1) == target).all())))
        return BatchResult(answers, cache.stats(), session.timer)

    # --- statistics --------------------------------------------------------------------------------------------
    def _record(self, result: BatchResult, rows: list[tuple[object, str | None, str | None]]) -> None:
        """Record a batch; rows are (request key, sample uid, task). lm-eval's padding copies are not counted."""
        stats = result.stats
        for (_, uid, _), ratio in zip(rows, stats.per_row_achieved_compression_ratio()):
            if uid is not None:
                sample_stats.record(uid, ratio)
        keep = []
        for key, _, _ in rows:
            if key is None and self._rolling_windows is not None:  # a rolling window
                keep.append(self._rolling_windows > 0)
                self._rolling_windows -= 1
            elif self._padding.get(key, 0) > 0:  # a copy lm-eval added to even out the ranks
                keep.append(False)
                self._padding[key] -= 1
            else:
                keep.append(True)
        if not any(keep):
            return
        if not all(keep):
            stats = stats.select_rows([row for row, kept in enumerate(keep) if kept])
        self.run_stats.add(stats, result.timer, [task for (_, _, task), kept in zip(rows, keep) if kept])

    def get_model_info(self) -> dict:
        """HFLM's model info plus `kvzap`: the method's settings and the run's statistics over every rank (lm-eval
        calls it once the evaluation is done; the figures also go to the summary printed under its table)."""
        info = super().get_model_info()
        settings = {f.name: getattr(self.method_config, f.name) for f in fields(self.method_config)}
        run_stats = self._all_ranks_stats if self._all_ranks_stats is not None else self.run_stats
        info["kvzap"] = {
            **{name: value for name, value in settings.items() if value is not None},
            "threshold": getattr(self.method.policy, "threshold", None),
            "protocol": self.protocol,
            "prefill_chunk": self.prefill_chunk,
            "ranks": self.world_size,
            **run_stats.summary(),
        }
        lm_eval_summary.record(info["kvzap"])
        return info


def _padding_copies(requests) -> int:
    """How many copies of the last request lm-eval appended to even out the ranks (each request appears `repeats`
    times in a row; the padding adds whole copies of the last one)."""
    if not requests:
        return 0
    last = requests[-1]
    trailing = 0
    for request in reversed(requests):
        if request is not last:
            break
        trailing += 1
    return max(0, trailing - max(1, getattr(last, "repeats", 1)))


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a 2D mask, as `generate` computes them (padding gets 0... and is never kept)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _pad(sequences: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long, device=sequences[0].device)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = seq
        mask[row, span] = 1
    return ids, mask
