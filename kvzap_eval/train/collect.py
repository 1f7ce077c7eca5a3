"""Streamed, resumable collection of KVzap training pairs: X = post-norm hidden state, y = log KVzip+ score.

For every prompt of a `Corpus`, the KVzip+ teacher runs once; `tokens_per_prompt` random context tokens (the same
positions for all layers, drawn from the seed and the prompt's index) are kept. Each layer's rows go straight to
disk as the layer finishes, so memory holds one prompt's activations at most, whatever the number of prompts.

Layout of the collection directory:

- `manifest.json`: settings, model shapes, the prompts (split, source, length, sha256), `done` (the indices of
  finished prompts), `collect_seconds` (teacher time summed over runs) and `peak_rss_mb` (the largest peak of the
  collecting processes). It is replaced atomically after each prompt.
- `X_{layer:03d}.npy`: (n_prompts * tokens_per_prompt, hidden_size) hidden states, one file per layer.
- `y.npy`: (n_rows, n_layers, n_kv_heads) float32 log-scores; `positions.npy`: (n_prompts, tokens_per_prompt)
  the sampled context positions.

Prompt i owns rows [i * k, (i + 1) * k) of every file. Rows are written in place, so an interrupted prompt is simply
written again on resume: a collection never holds duplicate rows. Test prompts come first.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import write_json_atomic
from ..errors import OutputDirError, TeacherError
from ..llm.model_info import num_kv_heads
from ..teacher import ATTENTION_MODES, build_repeat_prompt, run_teacher
from .corpus import Corpus

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
X_DTYPES = ("float16", "float32")
#: Manifest keys that readers of a collection need.
MANIFEST_KEYS = ("tokens_per_prompt", "num_layers", "done", "prompts")


@dataclass(frozen=True)
class CollectConfig:
    """Collection settings: rows per prompt, sampling seed, stored dtype of X, teacher variant and attention."""

    tokens_per_prompt: int = 500
    seed: int = 0
    x_dtype: str = "float16"
    plus: bool = True
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.tokens_per_prompt < 1:
            raise OutputDirError(f"tokens_per_prompt must be positive, got {self.tokens_per_prompt}")
        if self.x_dtype not in X_DTYPES:
            raise OutputDirError(f"x_dtype must be one of {', '.join(X_DTYPES)}, got {self.x_dtype!r}")
        if self.attention not in ATTENTION_MODES:
            raise OutputDirError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")


def x_path(directory: Path, layer: int) -> Path:
    return directory / f"X_{layer:03d}.npy"


class _RowFile:
    """An `.npy` file of fixed shape whose rows are written in place with `pwrite` (no memory map stays resident)."""

    def __init__(self, path: Path, n_rows: int, row_shape: tuple[int, ...], dtype: str, create: bool) -> None:
        if create:
            np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n_rows, *row_shape)).flush()
        else:
            _check_existing(path, (n_rows, *row_shape), np.dtype(dtype))
        self.path = path
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(row_shape)) * self.dtype.itemsize
        self.offset = _data_offset(path)
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, first_row: int, rows: np.ndarray) -> None:
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        os.pwrite(self.fd, data, self.offset + first_row * self.row_bytes)

    def close(self) -> None:
        os.close(self.fd)


def _check_existing(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Refuse to resume into a file that is missing, truncated, or of another shape or dtype than this run's."""
    try:
        existing = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise OutputDirError(
            f"{path} is missing or damaged ({exc}): use --force to start the collection over"
        ) from None
    found = (existing.shape, existing.dtype)
    del existing
    if found != (shape, dtype):
        raise OutputDirError(
            f"{path} holds {found[0]} {found[1]}, this run needs {shape} {dtype}: use --force to start over"
        )


def _data_offset(path: Path) -> int:
    """Byte offset of the array data in an `.npy` file."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        if major == 1:
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        return f.tell()


def _manifest_settings(model: torch.nn.Module, corpus: Corpus, config: CollectConfig) -> dict[str, Any]:
    cfg = model.config
    return {
        "format": FORMAT_VERSION,
        "model": getattr(cfg, "name_or_path", "") or type(model).__name__,
        "num_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "num_kv_heads": num_kv_heads(cfg),
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **asdict(config),
        "corpus_digest": corpus.digest(),
        "n_test_prompts": corpus.n_test,
        "prompts": [
            {"index": p.index, "split": p.split, "source": p.source, "n_tokens": p.n_tokens, "sha256": p.sha256}
            for p in corpus.prompts
        ],
    }


def _check_resumable(directory: Path, settings: dict[str, Any]) -> tuple[list[int], dict[str, float]]:
    """The finished prompts and the time and memory spent so far, after checking the settings are the same."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputDirError(f"{directory} has no readable {MANIFEST} to resume from ({exc}): use --force") from None
    if not isinstance(manifest, dict):
        raise OutputDirError(f"{directory / MANIFEST} is not a collection manifest: use --force")
    changed = [k for k in settings if manifest.get(k) != settings[k]]
    if changed:
        raise OutputDirError(
            f"{directory} was collected with other settings ({', '.join(changed)} differ): rerun with the same "
            "settings, or use --force to start over"
        )
    totals = {key: manifest[key] for key in ("collect_seconds", "peak_rss_mb") if key in manifest}
    return sorted(set(manifest.get("done", []))), totals


@dataclass
class CollectionStats:
    """What one `collect` call did."""

    collected: int
    skipped: int
    seconds: float


def collect(
    model: torch.nn.Module,
    tokenizer: Any,
    corpus: Corpus,
    directory: str | os.PathLike,
    config: CollectConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    on_prompt: Callable[[int], None] | None = None,
) -> CollectionStats:
    """Collect teacher pairs for every prompt of `corpus` into `directory` (see the module docstring).

    With `resume`, an existing collection made with the same settings is completed; otherwise `directory` must not
    hold one. `on_prompt(index)` is called after each finished prompt.
    """
    config = config or CollectConfig()
    directory = Path(directory)
    settings = _manifest_settings(model, corpus, config)
    exists = (directory / MANIFEST).exists()
    if exists and not resume:
        raise OutputDirError(f"{directory} already holds a collection: pass --resume to complete it or --force")
    done, totals = _check_resumable(directory, settings) if exists else ([], {"collect_seconds": 0.0})
    directory.mkdir(parents=True, exist_ok=True)
    k, n_layers = config.tokens_per_prompt, settings["num_layers"]
    n_rows = len(corpus.prompts) * k
    create = not exists
    x_files = [
        _RowFile(x_path(directory, i), n_rows, (settings["hidden_size"],), config.x_dtype, create)
        for i in range(n_layers)
    ]
    y_file = _RowFile(directory / "y.npy", n_rows, (n_layers, settings["num_kv_heads"]), "float32", create)
    pos_file = _RowFile(directory / "positions.npy", len(corpus.prompts), (k,), "int64", create)
    if create:
        write_json_atomic(directory / MANIFEST, {**settings, "done": [], **totals}, indent=1)
    todo = [p for p in corpus.prompts if p.index not in set(done)]
    start = time.perf_counter()
    try:
        bar = _progress(len(corpus.prompts), len(done), progress)
        for prompt in todo:
            t0 = time.perf_counter()
            _collect_prompt(model, tokenizer, prompt, config, settings["num_kv_heads"], x_files, y_file, pos_file)
            done.append(prompt.index)
            totals["collect_seconds"] = round(totals.get("collect_seconds", 0.0) + time.perf_counter() - t0, 2)
            totals["peak_rss_mb"] = max(totals.get("peak_rss_mb", 0.0), peak_rss_mb())
            write_json_atomic(directory / MANIFEST, {**settings, "done": sorted(done), **totals}, indent=1)
            if on_prompt is not None:
                on_prompt(prompt.index)
            bar.set_postfix_str(f"{time.perf_counter() - t0:.1f} s/prompt", refresh=False)
            bar.update(1)
        bar.close()
    finally:
        for f in [*x_files, y_file, pos_file]:
            f.close()
    return CollectionStats(len(todo), len(corpus.prompts) - len(todo), time.perf_counter() - start)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="teacher (prompts)", unit="prompt", disable=not enabled)


def sample_positions(n_context: int, k: int, seed: int, prompt_index: int) -> np.ndarray:
    """`k` distinct sorted positions in [0, n_context), reproducible from (seed, prompt index)."""
    if n_context < k:
        raise TeacherError(
            f"prompt {prompt_index} has {n_context} context tokens, fewer than tokens_per_prompt={k}: raise "
            "--min-tokens or lower --tokens-per-prompt"
        )
    rng = np.random.default_rng([seed, prompt_index])
    return np.sort(rng.choice(n_context, size=k, replace=False))


def _collect_prompt(model, tokenizer, prompt, config: CollectConfig, heads: int, x_files, y_file, pos_file) -> None:
    """Teacher pass over one prompt; each layer's sampled rows are written as soon as the layer has run."""
    repeat = build_repeat_prompt(tokenizer, prompt.text)
    k = config.tokens_per_prompt
    positions = sample_positions(repeat.n_context, k, config.seed, prompt.index)
    index = torch.from_numpy(positions)
    y_rows = np.zeros((k, len(x_files), heads), dtype=np.float32)
    first_row = prompt.index * k

    def sink(layer_idx: int, hidden: torch.Tensor, log_scores: torch.Tensor) -> None:
        x = hidden.index_select(0, index.to(hidden.device)).float().cpu().numpy().astype(config.x_dtype)
        if not np.isfinite(x).all():
            raise TeacherError(f"hidden states of layer {layer_idx} overflow {config.x_dtype}: use --x-dtype float32")
        x_files[layer_idx].write(first_row, x)
        y_rows[:, layer_idx] = log_scores.index_select(0, index.to(log_scores.device)).cpu().numpy()

    run_teacher(
        model,
        repeat.input_ids,
        queries=repeat.repeated,
        keys=repeat.original,
        sink=sink,
        plus=config.plus,
        attention=config.attention,
    )
    y_file.write(first_row, y_rows)
    pos_file.write(prompt.index, positions[None])


# --------------------------------------------------------------------------------------------------- reading


class CollectedData:
    """Read access to a collection: finished prompts only, one layer at a time (memory ~ one layer's rows)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        try:
            self.manifest = json.loads((self.directory / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise OutputDirError(f"{self.directory} holds no readable collection ({exc}): run the collection") from None
        missing = (
            [key for key in MANIFEST_KEYS if key not in self.manifest] if isinstance(self.manifest, dict) else ["*"]
        )
        if missing:
            raise OutputDirError(
                f"{self.directory / MANIFEST} is not a collection manifest (missing {', '.join(missing)}): use --force"
            )
        self.k = self.manifest["tokens_per_prompt"]
        self.num_layers = self.manifest["num_layers"]
        done = set(self.manifest["done"])
        self.prompts = {
            split: [p["index"] for p in self.manifest["prompts"] if p["split"] == split and p["index"] in done]
            for split in ("train", "test")
        }

    def rows(self, split: str) -> np.ndarray:
        """Row indices of the finished prompts of `split`, in prompt order."""
        blocks = [np.arange(i * self.k, (i + 1) * self.k) for i in self.prompts[split]]
        return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)

    def n_rows(self, split: str) -> int:
        return len(self.prompts[split]) * self.k

    def x(self, layer: int, split: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Hidden states (n, D) of one layer as float32 (all finished rows of `split`, or the given rows)."""
        data = np.load(x_path(self.directory, layer), mmap_mode="r")
        return np.array(data[self.rows(split) if rows is None else rows], dtype=np.float32)

    def y(self, split: str, layer: int | None = None) -> np.ndarray:
        """Log-scores (n, L, H) of `split`, or (n, H) of one layer."""
        data = np.load(self.directory / "y.npy", mmap_mode="r")
        rows = self.rows(split)
        return np.array(data[rows] if layer is None else data[rows, layer], dtype=np.float32)
