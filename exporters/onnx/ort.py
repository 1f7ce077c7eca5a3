"""Importing onnxruntime: one flavour installed, or a one-line error that says what to uninstall or install.

Used by the export validation and by the runtime's onnxruntime backend (the runtime imports the exporters, never
the other way round).
"""

from __future__ import annotations

from importlib import metadata

from kvzap_eval.errors import ConfigError, require

#: Distributions that all install the Python package `onnxruntime`; two at once overwrite each other's files.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-qnn", "onnxruntime-training")  # fmt: skip


def installed_onnxruntime() -> dict[str, str]:
    """{distribution: version} of every installed onnxruntime flavour."""
    found = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def import_onnxruntime():
    """Import `onnxruntime`, refusing an environment with two flavours (`ConfigError`) or none (`MissingExtraError`)."""
    flavours = installed_onnxruntime()
    if len(flavours) > 1:
        listed = ", ".join(f"{name} {version}" for name, version in flavours.items())
        raise ConfigError(
            f"{listed} are all installed: they share one `onnxruntime` folder and overwrite each other's files, "
            f"so the result is neither: pip uninstall -y {' '.join(flavours)}, then pip install "
            "'kvzap-eval[onnx]' (CPU) or 'kvzap-eval[onnx-gpu]' (CUDA)"
        )
    return require("onnxruntime", "onnx")
