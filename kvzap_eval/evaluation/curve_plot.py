"""The accuracy-vs-compression figure that `kvzap-eval report` and `kvzap-eval compare` both draw: one curve per
label with 95% error bars, the full cache as a horizontal line inside its 95% band."""

from __future__ import annotations

from pathlib import Path

from ..plotting import pyplot
from .intervals import Estimate

#: a curve's points: (compression ratio, accuracy estimate), in any order
CurvePoints = list[tuple[float, Estimate]]


def plot_curves(curves: dict[str, CurvePoints], path: Path, title: str, full: str = "full") -> None:
    """Write the figure to `path`; the curve labelled `full` is the full cache's line and band."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for label, members in sorted(curves.items()):
        members = sorted(members, key=lambda point: point[0])
        estimates = [estimate for _, estimate in members]
        ys = [100 * e.mean for e in estimates]
        if label == full:
            axis.axhspan(100 * estimates[0].low, 100 * estimates[0].high, color="grey", alpha=0.2)
            axis.axhline(ys[0], color="black", linestyle="--", label="full cache (95% band)")
        else:
            err = [[100 * (e.mean - e.low) for e in estimates], [100 * (e.high - e.mean) for e in estimates]]
            axis.errorbar([x for x, _ in members], ys, yerr=err, marker="o", capsize=3, label=label)
    axis.set_xlabel("compression ratio (fraction of KV entries evicted)")
    axis.set_ylabel("accuracy (%), 95% intervals")
    axis.set_title(title)
    axis.set_ylim(-2, 102)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
