"""The shared-prefill sweep engine: each context is prefilled once for all the runs of its (task, length) that can
share it, and each run's method gets its pruned cache from that one forward (`prefill_sharing.py`).

A (task, length) group is evaluated in at most two passes: first the runs with a setting of their own (full, each
KVzap tau, the fixed-ratio methods' `--ratios`), then the runs matched to the ratios KVzap achieved in the first
pass (their setting exists only once KVzap's rows do). Within a pass every run is still one lm-eval evaluation of
its own, so documents, prompts, metrics and aggregation are lm-eval's, exactly as with `--engine per-method`; what
is shared is the model work. The pass's first evaluation computes each batch of requests for all of the pass's
methods at once (the context prefilled once, then each method's question and answer, or continuation, against its
own cache); the other methods' outputs and cache statistics (new tokens, per-layer counts: no caches) wait until
their own evaluation asks for the same batch. The KVzip+ teacher scores each context once per group: its scores
wait on disk between the passes.

Memory: one batch's caches at a time (the dense one and the method in flight), whatever the sweep's size; what
waits per request is dropped when its pass ends.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..runtime.methods import Method, MethodConfig, build_method
from ..runtime.prefill_sharing import SharedPrefill, share_prefill
from ..runtime.scorers import KVzipPlusScorer
from ..runtime.session import compress
from .lm_eval_model import BatchResult, KVzapHFLM, LoglikelihoodBatch
from .protocol import PreparedBatch
from .sweep import Run, SweepState


def run_shared_prefill(state: SweepState, todo: list[tuple[str, Run]]) -> None:
    """Evaluate `todo` (row key, run) group by group, each group in its passes; rows as `--engine per-method`."""
    lm: SharedPrefillLM = state.lm
    groups: dict[tuple[str, int], list[tuple[str, Run]]] = {}
    for key, run in todo:
        groups.setdefault((run.task, run.length), []).append((key, run))
    for (task, length), members in groups.items():
        own = [(key, run) for key, run in members if run.matched_threshold is None]
        matched = [(key, run) for key, run in members if run.matched_threshold is not None]
        try:
            for number, runs in enumerate(filter(None, (own, matched)), 1):
                _run_pass(state, runs, f"{task} {length} pass {number}")
        finally:
            lm.teacher.clear()


def _run_pass(state: SweepState, runs: list[tuple[str, Run]], label: str) -> None:
    """The runs of one pass: the first evaluation computes every context for all of them (reported to
    `state.progress` as the pass goes), the others take their results; each row is written as its run ends."""
    lm: SharedPrefillLM = state.lm
    lm.begin_pass([state.settings(run) for _, run in runs], label)
    unwritten = len(runs)
    lm.on_contexts = lambda fraction: state.progress(unwritten * fraction)
    try:
        for index, (key, run) in enumerate(runs):
            lm.use(index)
            state.evaluate(key, run, seconds=lm.attributed_seconds)
            unwritten -= 1
            state.progress(unwritten * lm.contexts_fraction())
    finally:
        lm.end_pass()
        state.progress(0.0)


@dataclass
class EngineWork:
    """Where the engine's model time went (summed over the sweep)."""

    contexts: int = 0  # batch rows computed (each once for all the methods of its pass)
    shared_seconds: float = 0.0  # scorer preparation (the KVzip+ teacher) and the shared context prefill
    method_seconds: float = 0.0  # every method's own work: its cache derived, its question and answer


class SharedPrefillLM(KVzapHFLM):
    """`kvzap_hf` that computes each batch once for every method of a pass and hands each evaluation its own.

    Between `begin_pass(configs)` and `end_pass()`, `use(i)` selects the method the next evaluation runs; outside a
    pass it is `KVzapHFLM` (one method, set with `set_method`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = TeacherScores()
        self.work = EngineWork()
        self._methods: list[Method] = []
        self._configs: list[MethodConfig] = []
        self._current = 0
        self._waiting: dict[tuple[int, Hashable], deque[BatchResult]] = {}
        self._work_seconds: list[float] = []  # per method of the pass: its share of the model work so far
        self._work_in_evaluation = 0.0  # model work (for every method) done during the current evaluation
        self._progress: tqdm | None = None
        self.on_contexts: Callable[[float], None] = lambda fraction: None  # hears `contexts_fraction()` as it grows

    # --- passes ------------------------------------------------------------------------------------------------
    def begin_pass(self, configs: list[MethodConfig], label: str = "pass") -> None:
        """Build the methods of a pass: their batches are computed together from now until `end_pass`."""
        self._configs = list(configs)
        self._methods = [build_method(self.model, config, tokenizer=self.tokenizer) for config in configs]
        self._waiting.clear()
        self._work_seconds = [0.0] * len(configs)
        self._progress = tqdm(
            desc=f"{label} ({len(configs)} settings)", unit="context", leave=False, disable=self.rank != 0
        )

    def use(self, index: int) -> None:
        """Evaluate method `index` of the pass next (statistics reset, as `set_method` does)."""
        self._current = index
        self.method_config, self.method = self._configs[index], self._methods[index]
        self.reset_stats()
        self._work_in_evaluation = 0.0

    def contexts_fraction(self) -> float:
        """The fraction of the pass's contexts computed (for every method) so far; 0 before lm-eval says how many."""
        bar = self._progress
        return min(1.0, bar.n / bar.total) if bar is not None and bar.total else 0.0

    def end_pass(self) -> None:
        """Drop what the pass's methods left waiting, and the methods."""
        self._waiting.clear()
        self._methods, self._configs = [], []
        self.on_contexts = lambda fraction: None
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def waiting_results(self) -> int:
        """Batch results computed but not yet handed to their method's evaluation."""
        return sum(len(queue) for queue in self._waiting.values())

    def waiting_nbytes(self) -> int:
        """Bytes of the tensors waiting (new tokens, per-layer counts): what memory holds between evaluations."""
        total = 0
        for queue in self._waiting.values():
            for result in queue:
                tensors = [result.output] if isinstance(result.output, torch.Tensor) else []
                tensors += [t for layer in result.stats.layers for t in (layer.kept, layer.evicted)]
                total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    def attributed_seconds(self, wall: float) -> float:
        """A run's time: its evaluation's wall time without the model work done there for every method, plus its
        own share of the pass's model work (the shared prefill split evenly, its own question and answer)."""
        return wall - self._work_in_evaluation + self._work_seconds[self._current]

    # --- requests ----------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self._expect(len(requests))
        return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._expect(len(requests))
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _expect(self, requests: int) -> None:
        if self._progress is not None and self._progress.total is None:
            self._progress.total = requests
            self._progress.refresh()

    def _generate(self, batch: PreparedBatch, budget: int, stop, generation_kwargs: dict) -> BatchResult:
        if not self._methods:  # outside a pass: the method set with `set_method`, on its own
            return super()._generate(batch, budget, stop, generation_kwargs)
        key = ("generate", _digest(batch.input_ids, batch.attention_mask), tuple(batch.prefill_chunks), budget,
               tuple(stop), repr(sorted(generation_kwargs.items())))  # fmt: skip
        return self._take(key, lambda: self._generate_all(batch, budget, stop, generation_kwargs))

    def _score(self, batch: LoglikelihoodBatch) -> BatchResult:
        if not self._methods:
            return super()._score(batch)
        key = ("loglikelihood", _digest(batch.context_ids, batch.context_mask, batch.continuation_ids, batch.mask))
        return self._take(key, lambda: self._score_all(batch))

    def _take(self, key: Hashable, compute_all: Callable[[], list[BatchResult]]) -> BatchResult:
        """The current method's result for the batch `key`, computed now for every method if it is not waiting."""
        queue = self._waiting.get((self._current, key))
        if not queue:
            start = time.perf_counter()
            for index, result in enumerate(compute_all()):
                self._waiting.setdefault((index, key), deque()).append(result)
            self._work_in_evaluation += time.perf_counter() - start
            queue = self._waiting[(self._current, key)]
        result = queue.popleft()
        if not queue:
            del self._waiting[(self._current, key)]
        return result

    # --- the model work of one batch, for every method ---------------------------------------------------------
    def _generate_all(self, batch: PreparedBatch, budget: int, stop, generation_kwargs: dict) -> list[BatchResult]:
        width = sum(batch.prefill_chunks) or batch.input_ids.shape[1]
        context = (batch.input_ids[:, :width], batch.attention_mask[:, :width])
        if len(batch.prefill_chunks) != 1:  # no one context block (no question marked, or chunks): not shared

            def own_prefill(method: Method, shared: SharedPrefill | None, index: int) -> BatchResult:
                return _keep_new_tokens(self.generate_after_prefill(method, batch, budget, stop, generation_kwargs))

            return self._for_every_method(context, None, own_prefill)

        def after_shared(method: Method, shared: SharedPrefill | None, index: int) -> BatchResult:
            cache = shared.cache_for(index, reuse=index == len(self._methods) - 1)
            result = self.generate_after_prefill(method, batch, budget, stop, generation_kwargs, cache=cache)
            return _keep_new_tokens(result)

        return self._for_every_method(context, lambda cache, kwarg: self._prefill(batch, cache, kwarg), after_shared)

    def _score_all(self, batch: LoglikelihoodBatch) -> list[BatchResult]:
        def after_shared(method: Method, shared: SharedPrefill | None, index: int) -> BatchResult:
            cache = shared.cache_for(index, reuse=index == len(self._methods) - 1)
            with compress(self.model, method) as session:
                return self.score_continuations(session, batch, cache, shared.output)

        def forward(cache, kwarg: str) -> torch.Tensor:
            return self.prefill_context_logits(batch, cache, kwarg)

        return self._for_every_method((batch.context_ids, batch.context_mask), forward, after_shared)

    def _for_every_method(self, context, forward, finish) -> list[BatchResult]:
        """Prepare every method's scorer for `context` (ids, mask), prefill it once with `forward(cache, kwarg)`
        (None: each method prefills its own in `finish`), then `finish(method, shared, index)` for each method."""
        start = time.perf_counter()
        self._prepare_scorers(*context)
        shared = share_prefill(self.model, self._methods, forward) if forward is not None else None
        shared_seconds = time.perf_counter() - start
        results = []
        for index, method in enumerate(self._methods):
            start = time.perf_counter()
            result = finish(method, shared, index)
            if shared is not None:
                result.timer.add_timer(shared.timers[index])
            results.append(result)
            own_seconds = time.perf_counter() - start
            self._work_seconds[index] += shared_seconds / len(self._methods) + own_seconds
            self.work.method_seconds += own_seconds
        self.work.shared_seconds += shared_seconds
        self.work.contexts += context[0].shape[0]
        if self._progress is not None:
            self._progress.update(context[0].shape[0])
            self.on_contexts(self.contexts_fraction())
        return results

    def _prepare_scorers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """`Scorer.prepare` for every method; the KVzip+ teacher runs once per context for all oracle methods."""
        for method in self._methods:
            scorer = method.scorer
            if isinstance(scorer, KVzipPlusScorer):
                scorer.use_scores(self.teacher.scores(scorer, input_ids, attention_mask))
            elif scorer is not None:
                scorer.prepare(input_ids, attention_mask)


class TeacherScores:
    """The KVzip+ teacher's scores of each context, computed once and kept on disk (one file per batch of contexts,
    in a temporary folder) until `clear()`, so that the oracle runs of both passes of a group share one teacher
    pass per context while memory holds only the batch in flight."""

    def __init__(self) -> None:
        self._folder: tempfile.TemporaryDirectory | None = None
        self.passes = 0  # teacher passes run (one per batch of contexts)

    def scores(self, scorer: KVzipPlusScorer, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """`oracle.context_scores` of the contexts, as `scorer` computes them (KVzip+ or KVzip)."""
        from safetensors.torch import load_file, save_file

        from ..runtime.oracle import context_scores

        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="kvzap-teacher-")
        path = Path(self._folder.name) / f"{_digest(input_ids, attention_mask)}-{int(scorer.plus)}.safetensors"
        if path.exists():  # one tensor per layer, never unpickled
            saved = load_file(path)
            return [saved[str(layer)] for layer in range(len(saved))]
        scores = context_scores(scorer.model, scorer.tokenizer, input_ids, attention_mask, plus=scorer.plus)
        save_file({str(layer): t.contiguous() for layer, t in enumerate(scores)}, path)
        self.passes += 1
        return scores

    def clear(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def _keep_new_tokens(result: BatchResult) -> BatchResult:
    """The result with its own copy of the new tokens (not a view that keeps the whole prompt alive)."""
    result.output = result.output.clone()
    return result


def _digest(*tensors: torch.Tensor) -> str:
    """A batch's identity: the shapes and contents of its tensors."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
