"""Train KVzap surrogates for a causal LM in one command: corpus -> KVzip+ teacher -> fit -> R² -> calibration.

    python -m kvzap_eval.train --model <hub id | directory | embedded> --out DIR [--corpus PATH ...]
                               [--type linear|mlp|both] [--resume | --force]

Writes `DIR/KVzap-{type}-{basename}/` (the `nvidia/KVzap-*` layout: config.json + model.safetensors, plus
training_report.json), `DIR/training_report.json` (both types) and `DIR/data/` (the collected pairs; removed at the
end with --delete-data). A non-empty DIR is refused unless --resume (complete an interrupted run; finished prompts
are kept) or --force (start over). `train_surrogates(TrainConfig(...))` does the same from Python.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cli_args import OneLineParser, check_writable_dir, non_negative_int, open_fraction, positive_float, positive_int
from ..errors import ConfigError, CorpusError, KVzapError, OutputDirError
from ..llm.loading import DTYPES, as_torch_dtype, load_causal_lm
from ..moved import warn_moved
from ..surrogate import KVzapSurrogate, check_hidden_dim, save_surrogate, surrogate_config_for
from ..surrogate.report import probe_scores, write_report
from .calibration import Calibration, CalibrationConfig, calibrate
from .collect import CollectConfig, CollectedData, collect, peak_rss_mb
from .corpus import BUILTIN_SOURCES, DEFAULT_SOURCES, Corpus, CorpusConfig, build_corpus
from .fit import MLPConfig, RidgeAccumulator, squared_pearson, train_mlp

TYPES = ("linear", "mlp")
DATA_DIR = "data"


@dataclass
class TrainConfig:
    """Everything one training run needs; the CLI fills it from its arguments."""

    out: str
    model: str = "embedded"
    types: tuple[str, ...] = TYPES
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    mlp_hidden_dim: int | None = None  # None: hidden_size // 8 (kvpress)
    mlp_lr_grid: tuple[float, ...] = ()  # several: each layer keeps the one with the lowest validation MSE
    ridge_alpha: float = 1.0
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    dtype: str = "float32"
    resume: bool = False
    force: bool = False
    keep_data: bool = True
    progress: bool = True
    command: str | None = None

    def __post_init__(self) -> None:
        bad = [t for t in self.types if t not in TYPES]
        if bad or not self.types:
            raise ConfigError(f"surrogate type(s) {bad or self.types} unknown: use linear, mlp or both")
        if self.resume and self.force:
            raise ConfigError("--resume and --force exclude each other: pick one")
        as_torch_dtype(self.dtype)
        check_hidden_dim(self.mlp_hidden_dim)
        for lr in self.mlp_lr_grid:  # each value as the MLP recipe's own rate: MLPConfig says which rates are valid
            replace(self.mlp, lr=lr)
        if len(self.mlp_lr_grid) > 1 and self.mlp.val_fraction == 0:
            raise ConfigError("several --lr values are chosen by validation loss: keep a validation split")
        if not (math.isfinite(self.ridge_alpha) and self.ridge_alpha > 0):
            raise ConfigError(f"ridge alpha must be a finite number above 0, got {self.ridge_alpha}")


# ------------------------------------------------------------------------------------------------- stages


def prepare_output(out: Path, resume: bool, force: bool) -> None:
    """Refuse a non-empty output directory unless resuming it or forcing; --force removes earlier results."""
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output {str(out)!r} is a file: pass a directory")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and force:
        for entry in entries:
            if entry.name == DATA_DIR or entry.name.startswith("KVzap-"):
                shutil.rmtree(entry)
            elif entry.name == "training_report.json":
                entry.unlink()
    elif entries and resume:
        if not (out / DATA_DIR / "manifest.json").is_file():
            raise OutputDirError(f"{out} holds no collection to resume ({DATA_DIR}/manifest.json): use --force")
    elif entries:
        raise OutputDirError(
            f"output directory {str(out)!r} is not empty: pass --resume to continue its run or --force to overwrite"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(
            f"cannot create output directory {str(out)!r} ({exc.strerror}): give another --out"
        ) from None


def load_model(name: str, dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
    """Deprecated: `kvzap_eval.llm.loading.load_causal_lm(name, dtype)`."""
    warn_moved("kvzap_eval.train.pipeline.load_model", "kvzap_eval.llm.loading.load_causal_lm", depth=1)
    return load_causal_lm(name, dtype)


def check_inputs(config: TrainConfig, out: Path) -> None:
    """Everything that can be checked before any work or any change to --out: the model (found, supported), the
    corpus files, and that --out can be written."""
    from ..llm.embedded import resolve_pretrained
    from ..llm.loading import load_model_config

    load_model_config(resolve_pretrained(config.model))
    for name in config.corpus.files:
        if not Path(name).expanduser().exists():
            raise CorpusError(f"corpus path {name!r} does not exist: pass text files or directories")
    check_writable_dir(out, "--out")


def _layers(n: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, unit="layer", disable=not progress)


def fit_linear(data: CollectedData, model_config: Any, alpha: float, progress: bool) -> KVzapSurrogate:
    """Ridge per layer, streaming the training rows in chunks."""
    surrogate = KVzapSurrogate(surrogate_config_for(model_config, "linear"))
    rows = data.rows("train")
    y_all = data.y("train")
    for layer in _layers(data.num_layers, "ridge", progress):
        acc = RidgeAccumulator(surrogate.config.input_dim, surrogate.config.output_dim)
        for chunk in np.array_split(np.arange(len(rows)), max(1, len(rows) // 20000)):
            acc.add(data.x(layer, "train", rows[chunk]), y_all[chunk, layer])
        weight, bias = acc.solve(alpha)
        with torch.no_grad():
            surrogate.layers[layer].weight.copy_(weight)
            surrogate.layers[layer].bias.copy_(bias)
    return surrogate.eval()


def fit_mlp(
    data: CollectedData,
    model_config: Any,
    config: MLPConfig,
    progress: bool,
    hidden_dim: int | None = None,
    lr_grid: tuple[float, ...] = (),
) -> tuple[KVzapSurrogate, list[dict[str, float]]]:
    """The MLP recipe, one layer at a time; returns the surrogate and each layer's final losses.

    With several learning rates in `lr_grid`, each layer is trained with each and keeps the one whose validation MSE
    (whole held-out training prompts, never the test prompts) is lowest.
    """
    surrogate = KVzapSurrogate(surrogate_config_for(model_config, "mlp", hidden_dim))
    y_all = data.y("train")
    prompts = data.rows("train") // data.k  # the validation split holds out whole prompts
    losses = []
    for layer in _layers(data.num_layers, "mlp", progress):
        x = data.x(layer, "train")
        best = None
        for lr in lr_grid or (config.lr,):
            mlp, history = train_mlp(x, y_all[:, layer], surrogate.config.hidden_dim, replace(config, lr=lr), prompts)
            if not all(torch.isfinite(p).all() for p in mlp.parameters()):
                raise ConfigError(f"MLP training of layer {layer} diverged (non-finite weights): lower --lr (now {lr})")
            epoch = history.best_epoch or len(history.train_loss)
            val = history.val_loss[epoch - 1]
            if best is None or val < best[0]:
                best = (val, lr, epoch, history, mlp)
        _, lr, epoch, history, mlp = best
        surrogate.layers[layer].load_state_dict(mlp.state_dict())
        losses.append(
            {
                "epoch_kept": epoch,
                "train_mse": round(history.train_loss[epoch - 1], 5),
                "val_mse": round(history.val_loss[epoch - 1], 5),
                **({"lr": lr} if len(lr_grid) > 1 else {}),
            }
        )
    return surrogate.eval(), losses


@torch.no_grad()
def held_out_r2(surrogate: KVzapSurrogate, data: CollectedData) -> dict[str, Any]:
    """Squared Pearson per (layer, head) on the test prompts: overall mean, per-layer means, the full table, and the
    overall mean on each corpus source's test prompts alone."""
    y_test = data.y("test")
    source_of = {p["index"]: p.get("source", "?") for p in data.manifest["prompts"]}
    row_source = np.repeat([source_of[i] for i in data.prompts["test"]], data.k)
    table, per_source = [], {name: [] for name in dict.fromkeys(row_source)}
    for layer in range(data.num_layers):
        x = torch.from_numpy(data.x(layer, "test"))
        pred = surrogate.layers[layer](x.to(next(surrogate.parameters()).dtype)).float().numpy()
        table.append(squared_pearson(y_test[:, layer], pred))
        for name, values in per_source.items():
            rows = row_source == name
            values.append(squared_pearson(y_test[rows, layer], pred[rows]))
    r2 = np.stack(table)
    return {
        "overall": round(float(r2.mean()), 4),
        "per_layer": [round(float(v), 4) for v in r2.mean(1)],
        "per_layer_head": [[round(float(v), 4) for v in row] for row in r2],
        "per_source": {str(name): round(float(np.mean(values)), 4) for name, values in per_source.items()},
        "n_test_rows": int(y_test.shape[0]),
    }


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("kvzap-eval", "torch", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _collection_summary(corpus: Corpus, data: CollectedData, config: TrainConfig, seconds: float) -> dict[str, Any]:
    return {
        "teacher": "KVzip+" if config.collect.plus else "KVzip",
        **asdict(config.collect),
        "n_train_rows": data.n_rows("train"),
        "n_test_rows": data.n_rows("test"),
        "seconds_this_run": round(seconds, 1),
        "teacher_seconds_total": data.manifest.get("collect_seconds"),
        "peak_rss_mb": data.manifest.get("peak_rss_mb"),
        "mean_prompt_tokens": round(float(np.mean([p.n_tokens for p in corpus.prompts])), 1),
    }


@dataclass
class TrainResult:
    """The combined report (also written to DIR/training_report.json) and the trained surrogates."""

    report: dict[str, Any]
    surrogates: dict[str, KVzapSurrogate]


def train_surrogates(config: TrainConfig) -> TrainResult:
    """Run the whole pipeline (see the module docstring)."""
    started = time.perf_counter()
    out = Path(config.out).expanduser()
    check_inputs(config, out)
    prepare_output(out, config.resume, config.force)
    model, tokenizer = load_causal_lm(config.model, config.dtype)
    basename = str(getattr(model.config, "name_or_path", "") or config.model).rstrip("/").split("/")[-1]
    corpus = build_corpus(tokenizer, config.corpus)

    t0 = time.perf_counter()
    collect(model, tokenizer, corpus, out / DATA_DIR, config.collect, resume=config.resume, progress=config.progress)
    data = CollectedData(out / DATA_DIR)
    collection = _collection_summary(corpus, data, config, time.perf_counter() - t0)

    surrogates: dict[str, KVzapSurrogate] = {}
    fits: dict[str, dict[str, Any]] = {}
    for kind in config.types:
        t0 = time.perf_counter()
        if kind == "linear":
            surrogates[kind] = fit_linear(data, model.config, config.ridge_alpha, config.progress)
            fits[kind] = {"method": "ridge per layer, closed form", "alpha": config.ridge_alpha}
        else:
            surrogates[kind], losses = fit_mlp(
                data, model.config, config.mlp, config.progress, config.mlp_hidden_dim, config.mlp_lr_grid
            )
            fits[kind] = {
                "method": "MLP per layer, validation = 5% of the training prompts",
                **asdict(config.mlp),
                **({"lr_grid": list(config.mlp_lr_grid), "lr": None} if len(config.mlp_lr_grid) > 1 else {}),
                "hidden_dim": surrogates[kind].config.hidden_dim,
                "losses_per_layer": losses,
            }
        fits[kind]["seconds"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    test_texts = [p.text for p in corpus.prompts if p.split == "test"]
    calibrations = calibrate(model, tokenizer, surrogates, test_texts, config.calibration)
    calibration_seconds = time.perf_counter() - t0

    common = {
        "model": config.model,
        "model_name_or_path": str(getattr(model.config, "name_or_path", "")),
        "command": config.command,
        "corpus": corpus.provenance(),
        "collection": collection,
        "versions": _versions(),
    }
    reports = {
        kind: _type_report(surrogate, data, fits[kind], calibrations[kind], calibration_seconds)
        for kind, surrogate in surrogates.items()
    }
    run = {"wall_seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": peak_rss_mb()}
    combined: dict[str, Any] = {**common, "surrogates": {}, **run}
    for kind, surrogate in surrogates.items():
        directory = out / f"KVzap-{kind}-{basename}"
        save_surrogate(surrogate, directory, dtype=torch.float32)
        write_report(directory, {**common, "surrogate_type": kind, **reports[kind], **run})
        combined["surrogates"][kind] = {"directory": directory.name, **reports[kind]}
    if not config.keep_data:
        shutil.rmtree(out / DATA_DIR)
    write_report(out, combined)
    return TrainResult(combined, surrogates)


def _type_report(
    surrogate: KVzapSurrogate, data: CollectedData, fit: dict, calibration: Calibration, seconds: float
) -> dict[str, Any]:
    return {
        "surrogate_config": asdict(surrogate.config),
        "training": fit,
        "r2": held_out_r2(surrogate, data),
        "calibration": {**calibration.to_json(), "seconds": round(seconds, 1)},
        "recommended_threshold": calibration.recommended_threshold,
        "probe": {
            "input": "torch.randn(4, input_dim) from torch.Generator().manual_seed(0)",
            "scores": probe_scores(surrogate),
        },
    }


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m kvzap_eval.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="hub id, local directory, or 'embedded' (SmolLM2-135M)")
    p.add_argument("--out", required=True, help="output directory (must be empty unless --resume/--force)")
    p.add_argument(
        "--corpus",
        nargs="+",
        metavar="PATH",
        help=f"your own text files/directories instead of the built-in sources ({', '.join(BUILTIN_SOURCES)})",
    )
    p.add_argument(
        "--sources",
        nargs="+",
        choices=BUILTIN_SOURCES,
        default=list(DEFAULT_SOURCES),
        metavar="SOURCE",
        help=f"built-in sources to use (default: all of {', '.join(DEFAULT_SOURCES)})",
    )
    p.add_argument("--type", choices=["linear", "mlp", "both"], default="both", help="surrogate type(s) to train")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="complete an interrupted run in --out")
    g.add_argument("--force", action="store_true", help="overwrite earlier results in --out")
    d = CorpusConfig()
    p.add_argument(
        "--train-prompts", type=positive_int, default=d.n_train, help="training prompts (default %(default)s)"
    )
    p.add_argument("--test-prompts-per-source", type=positive_int, default=d.n_test_per_source)
    p.add_argument("--min-tokens", type=positive_int, default=d.min_tokens)
    p.add_argument("--max-tokens", type=positive_int, default=d.max_tokens)
    c = CollectConfig()
    p.add_argument("--tokens-per-prompt", type=positive_int, default=c.tokens_per_prompt)
    p.add_argument("--x-dtype", choices=["float16", "float32"], default=c.x_dtype, help="stored dtype of X")
    p.add_argument(
        "--attention",
        choices=["auto", "block", "eager"],
        default=c.attention,
        help="teacher attention: block = SDPA + the needed probabilities only; eager = full matrices",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="corpus, sampling and MLP seed")
    m = MLPConfig()
    p.add_argument("--epochs", type=positive_int, default=m.epochs)
    p.add_argument(
        "--lr",
        type=positive_float,
        nargs="+",
        default=[m.lr],
        help="MLP learning rate; several: each layer keeps the one of lowest validation MSE (default %(default)s)",
    )
    p.add_argument(
        "--hidden-dim",
        type=positive_int,
        default=None,
        help="MLP hidden width (default: the LLM's hidden_size // 8, as kvpress)",
    )
    p.add_argument("--batch-size", type=positive_int, default=m.batch_size)
    p.add_argument(
        "--standardize",
        choices=["global", "feature", "none"],
        default=m.standardize,
        help="MLP input scaling while training, folded into the checkpoint (none = kvpress)",
    )
    p.add_argument(
        "--no-early-stopping",
        action="store_true",
        help="keep the last epoch (kvpress) instead of the epoch with the lowest validation MSE",
    )
    p.add_argument("--alpha", type=positive_float, default=1.0, help="ridge alpha (default %(default)s)")
    p.add_argument(
        "--target-ratio",
        type=open_fraction,
        default=CalibrationConfig().target_ratio,
        help="compression ratio the recommended threshold aims at (default 2/3 = 3x)",
    )
    p.add_argument(
        "--window", type=non_negative_int, default=CalibrationConfig().window, help="DMS window for calibration"
    )
    p.add_argument(
        "--dtype", default="float32", choices=tuple(DTYPES), help="dtype to run the LLM in (default float32)"
    )
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    p.add_argument("--delete-data", action="store_true", help="remove DIR/data after training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace, command: str | None = None) -> TrainConfig:
    """The `TrainConfig` that the parsed CLI arguments describe."""
    return TrainConfig(
        out=args.out,
        model=args.model,
        types=TYPES if args.type == "both" else (args.type,),
        corpus=CorpusConfig(
            sources=tuple(args.sources),
            files=tuple(args.corpus or ()),
            min_tokens=args.min_tokens,
            max_tokens=args.max_tokens,
            n_train=args.train_prompts,
            n_test_per_source=args.test_prompts_per_source,
            seed=args.seed,
        ),
        collect=CollectConfig(
            tokens_per_prompt=args.tokens_per_prompt, seed=args.seed, x_dtype=args.x_dtype, attention=args.attention
        ),
        mlp_hidden_dim=args.hidden_dim,
        mlp_lr_grid=tuple(args.lr) if len(args.lr) > 1 else (),
        mlp=MLPConfig(
            lr=args.lr[0],
            epochs=args.epochs,
            batch_size=args.batch_size,
            standardize=args.standardize,
            early_stopping=not args.no_early_stopping,
            seed=args.seed,
        ),
        ridge_alpha=args.alpha,
        calibration=CalibrationConfig(window=args.window, target_ratio=args.target_ratio),
        dtype=args.dtype,
        resume=args.resume,
        force=args.force,
        keep_data=not args.delete_data,
        progress=not args.no_progress,
        command=command,
    )


def _summary(report: dict[str, Any]) -> str:
    lines = []
    for r in report["surrogates"].values():
        lines.append(
            f"{r['directory']}: held-out R2 {r['r2']['overall']:.3f}, recommended threshold "
            f"{r['recommended_threshold']} (ratio {r['calibration']['recommended_ratio']:.2f})"
        )
    lines.append(f"wall {report['wall_seconds']:.0f} s, peak RSS {report['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        config = config_from_args(args, "python -m kvzap_eval.train " + shlex.join(argv))
        report = train_surrogates(config).report
    except KVzapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command with --resume to continue", file=sys.stderr)
        return 130
    print(_summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
