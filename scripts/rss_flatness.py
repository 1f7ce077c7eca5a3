"""Resident memory of a long `kvzap_hf` run, sampled against the number of requests done.

    python scripts/rss_flatness.py --model-args pretrained=DIR,surrogate=DIR --samples-per-task 112 \
        --out reports/memory/rss.json

Runs `lm_eval --model kvzap_hf` on the kvzap long-context tasks in a child process, reads the child's progress bar
to know how many requests are done, and samples its VmRSS twice a second. Reports RSS at 10/25/50/75/100 % of the
requests and the largest deviation from the 10 % value over the rest of the run (the first requests load the model,
tokenizer and tasks, and fill the allocator's pools; a leak shows as growth after that).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvzap_eval.atomic import write_json_atomic  # noqa: E402
from kvzap_eval.evaluation.suite import suite_tasks  # noqa: E402

PROGRESS = re.compile(r"Running generate_until requests:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
TASKS = suite_tasks(Path(__file__).resolve().parents[1] / "tasks")


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-args", default="", help="kvzap_hf model_args (default: the embedded SmolLM2)")
    parser.add_argument("--samples-per-task", type=int, default=112, help="9 tasks x 112 = 1,008 samples")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    metadata = json.dumps({"max_seq_lengths": [args.length], "num_samples": args.samples_per_task})
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "lm_eval", "--model", "kvzap_hf", "--include_path", "tasks",
                   "--tasks", ",".join(TASKS), "--metadata", metadata, "--output_path", tmp]  # fmt: skip
        if args.model_args:
            command += ["--model_args", args.model_args]
        start = time.perf_counter()
        child = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, bufsize=1)
        done = [0, 0]
        samples: list[tuple[float, int, int]] = []  # (seconds, requests done, rss)

        def read_progress() -> None:
            buffer = ""
            while chunk := child.stderr.read(256):
                buffer = (buffer + chunk)[-4096:]
                for match in PROGRESS.finditer(buffer):
                    done[0], done[1] = int(match.group(1)), int(match.group(2))

        reader = threading.Thread(target=read_progress, daemon=True)
        reader.start()
        while child.poll() is None:
            rss = rss_bytes(child.pid)
            if rss is not None:
                samples.append((time.perf_counter() - start, done[0], rss))
            time.sleep(0.5)
        reader.join(timeout=5)
        if child.returncode != 0:
            print(f"lm_eval failed with exit code {child.returncode}", file=sys.stderr)
            return child.returncode
    total = max(d for _, d, _ in samples) if samples else 0
    if total == 0:
        print("no progress was read from lm_eval: nothing to report", file=sys.stderr)
        return 1

    def rss_at(fraction: float) -> int:
        return next(r for _, d, r in samples if d >= fraction * total)

    # the generation phase: from 10 % of the requests to the first sample that saw them all (afterwards lm-eval
    # scores, writes and exits, and frees memory)
    end = next(i for i, (_, d, _) in enumerate(samples) if d >= total)
    during = [r for _, d, r in samples[: end + 1] if d >= 0.10 * total]
    reference = rss_at(0.10)
    result = {
        "command": " ".join(command[1:]),
        "requests": total,
        "seconds": samples[-1][0],
        "rss_mib_at_fraction_of_requests": {f"{p:.2f}": rss_at(p) / 2**20 for p in (0.10, 0.25, 0.5, 0.75, 1.0)},
        "max_deviation_from_10pct": max(abs(r - reference) for r in during) / reference,
        "growth_10pct_to_end": (rss_at(1.0) - reference) / reference,
        "peak_rss_mib": max(r for _, _, r in samples) / 2**20,
        "rss_mib_after_generation": samples[-1][2] / 2**20,
        "series": [{"s": round(s, 1), "requests": d, "rss_mib": round(r / 2**20, 1)} for s, d, r in samples],
    }
    write_json_atomic(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "series"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
