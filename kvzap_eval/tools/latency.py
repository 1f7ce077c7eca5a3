"""`kvzap-eval latency`: the per-layer scorer call of every available backend, beside the kvpress-style call.

For each surrogate (SmolLM2's shipped linear/MLP, and Qwen3-8B-shaped linear/MLP with random weights) and each
thread count, it times one scorer call per layer:

- decode [1, 1, D], "same layer" (one layer's weights, cache-hot, the usual micro-benchmark) and "layers in turn"
  (every layer once, as a decode step does; the weights of all layers do not fit in cache at D=4096);
- prefill [1, T, D] for T in --prefill (default 512, 4096, 32768);

with the backends interleaved round by round at the same thread count; each figure is the best of the rounds'
median times (the round least disturbed by other jobs). On CPU, onnxruntime
runs both the fp32 export and the int8 weight-only one (`onnxruntime int8`, fewer bytes to read per call; its
keep/evict agreement with the fp32 surrogate is reported beside the table). The reference is the
kvpress-style call, `module.to(device, dtype)(h).transpose(1, 2)` on every call, as kvpress's `KVzapPress.score`
does. It also times one SmolLM2 decoder layer (prefill at each T <= 4096, decode at a 4096-token context) and
reports the scorer time as a fraction of it. Writes `latency.md`, `latency.json` and `latency.png` to --out.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from ..atomic import write_text_atomic
from ..cli_args import OneLineParser, check_device, check_writable_dir, positive_float, positive_int
from ..errors import ConfigError, KVzapError
from ..plotting import pyplot
from ..surrogate import (
    KVzapSurrogate,
    SurrogateConfig,
    load_surrogate,
    shipped_surrogate,
)

REFERENCE = "kvpress-style"
SMOLLM2 = "SmolLM2-135M-Instruct"
#: name -> (model basename, surrogate shape); SmolLM2 uses the shipped weights when they are installed.
SURROGATES = {
    "smollm2-mlp": (SMOLLM2, SurrogateConfig(576, 3, 30, 72)),
    "smollm2-linear": (SMOLLM2, SurrogateConfig(576, 3, 30)),
    "qwen3-8b-mlp": ("Qwen3-8B", SurrogateConfig(4096, 8, 36, 512)),
    "qwen3-8b-linear": ("Qwen3-8B", SurrogateConfig(4096, 8, 36)),
}
DEFAULT_PREFILL = (512, 4096, 32768)


@dataclass
class Case:
    """One surrogate to time: `label` names model and type, `origin` says whether the weights are real."""

    label: str
    surrogate: KVzapSurrogate
    origin: str


@dataclass
class Row:
    """One measurement: median seconds per scorer call, and the ratio to the kvpress-style call of its group."""

    surrogate: str
    origin: str
    phase: str
    threads: int
    backend: str
    seconds: float
    ratio: float | None = None


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    decoder_layer: list[dict] = field(default_factory=list)
    environment: dict = field(default_factory=dict)


def make_case(name: str, seed: int = 0) -> Case:
    """The surrogate named in `SURROGATES`: shipped weights when available, else seeded random ones."""
    basename, config = SURROGATES[name]
    shipped = shipped_surrogate(basename, config.model_type)
    label = f"{basename} {config.model_type} (D={config.input_dim})"
    if shipped is not None:
        return Case(label, load_surrogate(shipped), "shipped")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        surrogate = KVzapSurrogate(config).eval()
    surrogate.source = f"random-{name}-seed{seed}"
    return Case(label, surrogate, "random weights, same shapes")


def kvpress_style(surrogate: KVzapSurrogate) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """kvpress's `KVzapPress.score`: move/cast the layer's module on every call, forward, transpose."""

    def score(layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        module = surrogate.layers[layer_idx].to(hidden_states.device, dtype=hidden_states.dtype).eval()
        return module(hidden_states).transpose(1, 2)

    return score


BACKEND_NAMES = ("torch", "onnxruntime", "onnxruntime int8", "cuda_graph", "tensorrt")


def _make(name: str, case: Case, placement, threads: int):
    from ..runtime.backends import make_backend

    if name == "onnxruntime int8":
        from ..runtime.backends.onnxruntime_backend import OnnxRuntimeBackend, OrtSettings

        return OnnxRuntimeBackend(case.surrogate, placement, None, OrtSettings(threads=threads, dtype="int8"))
    return make_backend(name, case.surrogate, placement, threads=threads)


def available_backends(case: Case, threads: int, device: torch.device, names: Sequence[str] | None) -> dict:
    """name -> scorer callable for every backend that can run here (missing packages are skipped with a note)."""
    placement = [(device, torch.float32)] * case.surrogate.config.n_modules
    found: dict[str, Callable] = {REFERENCE: kvpress_style(case.surrogate)}
    for name in names or BACKEND_NAMES:
        gpu_only, cpu_only = name in ("cuda_graph", "tensorrt"), name.endswith("int8")
        if (gpu_only and device.type != "cuda") or (cpu_only and device.type != "cpu"):
            continue
        try:
            found[name] = _make(name, case, placement, threads)
        except (KVzapError, ImportError) as exc:
            print(f"  {name}: skipped ({exc})", file=sys.stderr)
    return found


def agreement_note(case: Case, name: str, backend) -> str | None:
    """The export's validation figures (worst layer) for a backend that runs an export, else None."""
    manifest = getattr(backend, "manifest", None)
    if manifest is None:
        return None
    checks = [c for layer in manifest.layers if layer.validation for c in layer.validation["checks"]]
    medians = [c["agreement_at_median"] for c in checks if c["agreement_at_median"] is not None]
    if not medians:
        return None
    return (f"{case.label}, {name} ({manifest.dtype} export): vs the fp32 torch surrogate on random hidden states, "
            f"max abs error {max(c['max_abs_error'] for c in checks):.2e}, keep/evict agreement >= "
            f"{100 * min(medians):.2f}% at the median score (the hardest threshold), worst layer")  # fmt: skip


def time_interleaved(calls: dict[str, Callable[[], object]], threads: int, min_run_time: float, rounds: int,
                     device: torch.device) -> dict[str, float]:  # fmt: skip
    """Seconds per call of each callable: the best of `rounds` block medians. All are timed round by round, so
    drift hits all alike, and the best round is the one least disturbed by other jobs on the machine."""
    sync = "torch.cuda.synchronize()" if device.type == "cuda" else "pass"
    timers = {name: Timer("f()", globals={"f": fn}, num_threads=threads, setup=sync) for name, fn in calls.items()}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for fn in calls.values():
            fn()  # warm-up (lazy initialisation, first allocations)
        for _ in range(rounds):
            for name, timer in timers.items():
                samples[name].append(timer.blocked_autorange(min_run_time=min_run_time / rounds).median)
    return {name: min(values) for name, values in samples.items()}


def _phases(case: Case, prefill: Sequence[int], device: torch.device) -> list[tuple[str, torch.Tensor, bool]]:
    dim = case.surrogate.config.input_dim
    generator = torch.Generator().manual_seed(0)
    phases = [("decode, same layer", torch.randn(1, 1, dim, generator=generator).to(device), False),
              ("decode, layers in turn", torch.randn(1, 1, dim, generator=generator).to(device), True)]  # fmt: skip
    phases += [(f"prefill T={t}", torch.randn(1, t, dim, generator=generator).to(device), False) for t in prefill]
    return phases


def measure_case(report: Report, case: Case, threads: int, prefill: Sequence[int], min_run_time: float,
                 rounds: int, device: torch.device, backends: Sequence[str] | None = None) -> None:  # fmt: skip
    """Add the rows of every phase and backend of one surrogate at one thread count (and the exports' figures)."""
    torch.set_num_threads(threads)
    scorers = available_backends(case, threads, device, backends)
    for name, scorer in scorers.items():
        note = agreement_note(case, name, scorer)
        if note and note not in report.notes:
            report.notes.append(note)
    n_layers = case.surrogate.config.n_modules
    rows = report.rows
    for phase, hidden, all_layers in _phases(case, prefill, device):
        if all_layers:
            calls = {name: (lambda f=f, h=hidden: [f(i, h) for i in range(n_layers)]) for name, f in scorers.items()}
        else:
            calls = {name: (lambda f=f, h=hidden: f(0, h)) for name, f in scorers.items()}
        budget = min_run_time * (3 if phase.startswith("decode") else 1)
        seconds = time_interleaved(calls, threads, budget, rounds, device)
        per_call = {name: s / (n_layers if all_layers else 1) for name, s in seconds.items()}
        for name, value in per_call.items():
            rows.append(Row(case.label, case.origin, phase, threads, name, value, value / per_call[REFERENCE]))
        print(f"  {case.label} {phase} threads={threads}: "
              + ", ".join(f"{n} {1e6 * v:.1f} us" for n, v in per_call.items()), file=sys.stderr)  # fmt: skip


def decoder_layer_times(threads: int, prefill: Sequence[int], min_run_time: float, context: int = 4096) -> list[dict]:
    """Seconds of one SmolLM2 decoder layer (layer 0, sdpa, fp32): prefill [1, T, 576] for each T <= 8192, and one
    decode step at a `context`-token cache."""
    from transformers import DynamicCache

    from ..llm.loading import load_causal_lm

    model, _ = load_causal_lm()
    torch.set_num_threads(threads)
    layer, rotary = model.model.layers[0], model.model.rotary_emb
    results = []

    def inputs(length: int, start: int = 0):
        h = torch.randn(1, length, model.config.hidden_size)
        positions = torch.arange(start, start + length)[None]
        return h, positions, rotary(h, positions)

    with torch.no_grad():
        for t in [t for t in prefill if t <= 8192]:
            h, pos, pe = inputs(t)
            timer = Timer("layer(h, position_ids=pos, position_embeddings=pe)", num_threads=threads,
                          globals={"layer": layer, "h": h, "pos": pos, "pe": pe})  # fmt: skip
            results.append({"phase": f"prefill T={t}", "threads": threads,
                            "seconds": timer.blocked_autorange(min_run_time=min_run_time).median})  # fmt: skip
        cache = DynamicCache(config=model.config)
        h, pos, pe = inputs(context)
        layer(h, position_ids=pos, position_embeddings=pe, cache=cache, use_cache=True)
        h, pos, pe = inputs(1, context)
        names = {"layer": layer, "h": h, "pos": pos, "pe": pe, "cache": cache}
        timer = Timer("layer(h, position_ids=pos, position_embeddings=pe, cache=cache, use_cache=True)",
                      num_threads=threads, globals=names)  # fmt: skip
        results.append({"phase": f"decode, {context}-token context", "threads": threads,
                        "seconds": timer.blocked_autorange(min_run_time=min_run_time).median})  # fmt: skip
    return results


def environment(device: torch.device) -> dict:
    """What the numbers depend on: CPU/GPU, versions, and the machine's load (other jobs make timings noisy)."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
           "cpu": _cpu_name(), "cores": os.cpu_count(), "load_average": list(os.getloadavg())}  # fmt: skip
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------------------------ output


def _us(seconds: float) -> str:
    return f"{1e6 * seconds:,.1f}" if seconds < 0.01 else f"{1e3 * seconds:,.2f} ms"


def _header(env: dict) -> str:
    gpu = f", GPU {env['gpu']}" if "gpu" in env else ""
    load = f"load average {env.get('load_average')} at start, {env.get('load_average_end')} at end"
    return (
        f"CPU {env.get('cpu')} ({env.get('cores')} cores){gpu}; torch {env.get('torch')}, onnxruntime "
        f"{env.get('onnxruntime', 'absent')}; {load}. Best of interleaved rounds' medians; µs unless marked ms; "
        "ratio = backend / kvpress-style call at the same thread count."
    )


def render_markdown(report: Report) -> str:
    """The report as markdown: one table per surrogate, then the decoder-layer fractions."""
    lines = ["# Scorer latency per layer call", "", _header(report.environment), ""]
    backends = list(dict.fromkeys(r.backend for r in report.rows))
    for surrogate in dict.fromkeys(r.surrogate for r in report.rows):
        rows = [r for r in report.rows if r.surrogate == surrogate]
        lines += [f"## {surrogate} — {rows[0].origin}", "",
                  "| phase | threads | " + " | ".join(backends) + " | best / kvpress-style |",
                  "|---|---|" + "---|" * len(backends) + "---|"]  # fmt: skip
        for phase, threads in dict.fromkeys((r.phase, r.threads) for r in rows):
            group = {r.backend: r for r in rows if r.phase == phase and r.threads == threads}
            cells = [(_us(group[b].seconds) + ("" if b == REFERENCE else f" ({group[b].ratio:.2f}x)")) if b in group
                     else "-" for b in backends]  # fmt: skip
            best = min((r for b, r in group.items() if b != REFERENCE), key=lambda r: r.seconds, default=None)
            verdict = f"{best.ratio:.2f}x ({best.backend})" if best else "-"
            lines.append(f"| {phase} | {threads} | " + " | ".join(cells) + f" | {verdict} |")
        lines.append("")
    if report.notes:
        lines += ["Exports used (validation figures from their manifests):", ""]
        lines += [f"- {note}" for note in report.notes] + [""]
    if report.decoder_layer:
        lines += _fraction_table(report)
    return "\n".join(lines) + "\n"


def _fraction_table(report: Report) -> list[str]:
    lines = ["## Scorer time as a fraction of one SmolLM2 decoder layer", "",
             "| phase | threads | decoder layer | surrogate | backend | scorer | fraction |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for entry in report.decoder_layer:
        phase = entry["phase"]
        scorer_phase = "decode, same layer" if phase.startswith("decode") else phase
        for row in report.rows:
            if row.surrogate.startswith(SMOLLM2) and row.phase == scorer_phase and row.threads == entry["threads"]:
                lines.append(f"| {phase} | {row.threads} | {_us(entry['seconds'])} | {row.surrogate} | {row.backend} "
                             f"| {_us(row.seconds)} | {100 * row.seconds / entry['seconds']:.2f}% |")  # fmt: skip
    return lines + [""]


def _short(label: str) -> str:
    return label.split(" (")[0].replace("-135M-Instruct", "")


def render_png(report: Report, path: Path) -> None:
    """Grouped bars (log scale), one panel per phase: per surrogate and thread count, one bar per backend."""
    plt = pyplot()

    panels = list(dict.fromkeys(r.phase for r in report.rows))
    backends = list(dict.fromkeys(r.backend for r in report.rows))
    groups = list(dict.fromkeys((r.surrogate, r.threads) for r in report.rows))
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    width = 0.8 / max(len(backends), 1)
    for ax, phase in zip(axes.flat, panels):
        for k, backend in enumerate(backends):
            values = []
            for surrogate, threads in groups:
                match = [r.seconds for r in report.rows if (r.surrogate, r.threads, r.phase, r.backend)
                         == (surrogate, threads, phase, backend)]  # fmt: skip
                values.append(1e6 * match[0] if match else 0.0)
            ax.bar([g + k * width for g in range(len(groups))], values, width, label=backend)
        ax.set_yscale("log")
        ax.set_title(phase)
        ax.set_ylabel("µs per layer call")
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{_short(s)}\n{t} thr" for s, t in groups], fontsize=8)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_report(path: Path) -> Report:
    """A report back from its `latency.json` (to re-render the markdown and chart without measuring again)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        report = Report([Row(**row) for row in data["rows"]], list(data.get("notes", [])),
                        list(data["decoder_layer"]), dict(data["environment"]))  # fmt: skip
    except FileNotFoundError:
        raise ConfigError(
            f"--from-json {path}: no such file: give a latency.json written by kvzap-eval latency"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--from-json {path} is not readable JSON ({exc}): give a latency.json") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"--from-json {path} is not a latency.json written by kvzap-eval latency (bad or missing field: {exc})"
        ) from None
    return report


def write_report(report: Report, out: Path) -> list[Path]:
    """latency.md, latency.json and (when matplotlib is installed) latency.png in `out`."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --out {out} ({exc.strerror}): give another directory") from None
    paths = [out / "latency.md", out / "latency.json"]
    write_text_atomic(paths[0], render_markdown(report))
    data = {"environment": report.environment, "rows": [asdict(r) for r in report.rows], "notes": report.notes,
            "decoder_layer": report.decoder_layer}  # fmt: skip
    write_text_atomic(paths[1], json.dumps(data, indent=2) + "\n")
    try:
        render_png(report, out / "latency.png")
        paths.append(out / "latency.png")
    except ImportError:
        print("matplotlib is not installed: no latency.png (pip install 'kvzap-eval[report]')", file=sys.stderr)
    return paths


def best_backend_decode_ratio(surrogate: str = "smollm2-mlp", threads: int = 1, min_run_time: float = 1.0,
                              rounds: int = 5, device: str = "cpu") -> tuple[str, float] | None:  # fmt: skip
    """(backend, its decode scorer latency / the torch backend's) for the fastest non-torch backend available here,
    both timed interleaved in this process ("decode, same layer"); None when only torch can run."""
    case = make_case(surrogate)
    dev = torch.device(device)
    torch.set_num_threads(threads)
    scorers = available_backends(case, threads, dev, None)
    scorers.pop(REFERENCE)
    others = [name for name in scorers if name != "torch"]
    if "torch" not in scorers or not others:
        return None
    hidden = _phases(case, [], dev)[0][1]
    seconds = time_interleaved({n: (lambda f=f: f(0, hidden)) for n, f in scorers.items()}, threads, min_run_time,
                               rounds, dev)  # fmt: skip
    best = min(others, key=seconds.__getitem__)
    return best, seconds[best] / seconds["torch"]


def run_latency(cases: Sequence[Case], threads: Sequence[int], prefill: Sequence[int], min_run_time: float = 0.5,
                rounds: int = 3, device: str = "cpu", backends: Sequence[str] | None = None,
                layer_fraction: bool = True) -> Report:  # fmt: skip
    """Measure every case at every thread count (see the module docstring)."""
    dev = torch.device(device)
    report = Report(environment=environment(dev))
    for case in cases:
        for t in threads:
            measure_case(report, case, t, prefill, min_run_time, rounds, dev, backends)
    if layer_fraction and any(c.label.startswith(SMOLLM2) for c in cases):
        for t in threads:
            report.decoder_layer += decoder_layer_times(t, prefill, min_run_time)
    report.environment["load_average_end"] = list(os.getloadavg())
    return report


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="kvzap-eval latency", description=__doc__.splitlines()[0])
    parser.add_argument("--surrogates", nargs="+", default=list(SURROGATES), choices=list(SURROGATES))
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, torch.get_num_threads()])
    parser.add_argument("--prefill", type=positive_int, nargs="*", default=list(DEFAULT_PREFILL))
    parser.add_argument("--backends", nargs="+", choices=BACKEND_NAMES, help="default: every available one")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--min-run-time", type=positive_float, default=0.5,
                        help="seconds per (phase, backend), all rounds")  # fmt: skip
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--no-layer-fraction", action="store_true", help="skip timing the SmolLM2 decoder layer")
    parser.add_argument("--out", type=Path, default=Path("reports/latency"))
    parser.add_argument("--from-json", type=Path, help="re-render a latency.json into --out instead of measuring")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_writable_dir(args.out, "--out")
    if args.from_json:
        print("wrote " + ", ".join(str(p) for p in write_report(load_report(args.from_json), args.out)))
        return 0
    check_device(args.device)

    cases = [make_case(name) for name in args.surrogates]
    if args.device.startswith("cuda"):
        for case in cases:
            case.surrogate.to(args.device)
    report = run_latency(cases, list(dict.fromkeys(args.threads)), args.prefill, args.min_run_time, args.rounds,
                         args.device, args.backends, not args.no_layer_fraction)  # fmt: skip
    paths = write_report(report, args.out)
    print(render_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
