"""The package in wings: old import paths still work (with a DeprecationWarning), public names stay, each wing
says what it is for, the import rules hold (lint-imports), and the lm-eval startup hook stays cheap."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import kvzap_eval
from kvzap_eval.moved import MOVED

ROOT = Path(__file__).resolve().parent.parent
WINGS = ("llm", "surrogate", "runtime", "train", "evaluation", "tools")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_new_module_with_a_deprecation_warning(old, monkeypatch):
    new = importlib.import_module(MOVED[old])
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is new


def test_a_module_under_an_old_package_is_the_new_module(monkeypatch):
    from kvzap_eval.runtime.backends import onnxruntime_backend

    for name in ("kvzap_eval.backends", "kvzap_eval.backends.onnxruntime_backend"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from kvzap_eval.backends.onnxruntime_backend import OrtSettings
    assert OrtSettings is onnxruntime_backend.OrtSettings
    moved = [str(w.message).split(" moved")[0] for w in caught if w.category is DeprecationWarning]
    assert moved == ["kvzap_eval.backends", "kvzap_eval.backends.onnxruntime_backend"]


def test_the_warning_points_at_the_importing_line(monkeypatch):
    monkeypatch.delitem(sys.modules, "kvzap_eval.loading", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.import_module("kvzap_eval.loading")
    assert [Path(w.filename).name for w in caught if w.category is DeprecationWarning] == [Path(__file__).name]


def test_public_names_of_the_readme_and_of_the_old_modules_still_import(monkeypatch):
    from kvzap_eval import METHODS, KVzapSession, Method, MethodConfig, build_method, compress
    from kvzap_eval.runtime.methods import build_method as built_by
    from kvzap_eval.runtime.session import compress as compressed_by

    assert build_method is built_by and compress is compressed_by
    assert {"kvzap", "full"} <= set(METHODS) and MethodConfig and Method and KVzapSession
    monkeypatch.delitem(sys.modules, "kvzap_eval.loading", raising=False)
    with pytest.warns(DeprecationWarning):
        from kvzap_eval.loading import load_causal_lm
    from kvzap_eval.llm.loading import load_causal_lm as loader

    assert load_causal_lm is loader
    from kvzap_eval.runtime import KVzapSession as session_class  # the old module kvzap_eval.runtime's names

    assert session_class is KVzapSession
    from kvzap_eval.train import TrainConfig, main, train_surrogates  # the old module kvzap_eval.train's names
    from kvzap_eval.train.pipeline import TrainConfig as config_class

    assert TrainConfig is config_class and callable(main) and callable(train_surrogates)
    with pytest.warns(DeprecationWarning, match="kvzap_eval.train.prepare_output moved"):
        from kvzap_eval.train import prepare_output
    assert callable(prepare_output)
    with pytest.raises(AttributeError):
        kvzap_eval.runtime.no_such_name  # noqa: B018


@pytest.mark.parametrize("wing", WINGS)
def test_each_wing_says_what_it_is_for(wing):
    doc = importlib.import_module(f"kvzap_eval.{wing}").__doc__
    assert doc and len(doc.split()) >= 15, f"kvzap_eval/{wing}/__init__.py needs a docstring that says what it holds"


def test_the_lm_eval_startup_hook_and_the_package_import_neither_torch_nor_transformers():
    heavy = "{'torch', 'transformers', 'lm_eval'}"
    code = f"import sys, kvzap_eval, kvzap_eval.evaluation.lm_eval_hook; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_m_kvzap_eval_train_and_the_train_subcommand_print_the_same_help():
    module = subprocess.run(
        [sys.executable, "-m", "kvzap_eval.train", "--help"], env=ENV, capture_output=True, text=True, check=True
    ).stdout
    subcommand = subprocess.run(
        [sys.executable, "-m", "kvzap_eval", "train", "--help"], env=ENV, capture_output=True, text=True, check=True
    ).stdout
    assert "--out" in module and module == subcommand


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed (extra `test`)")
def test_the_import_rules_hold():
    result = subprocess.run(["lint-imports", "--no-cache"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_model_args_are_checked_without_importing_lm_eval():
    code = (
        "import sys; from kvzap_eval.evaluation.sweep import parse_model_args; "
        "print(parse_model_args('window=8,decoding=no'), 'lm_eval' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{'window': 8, 'decoding': False} False"


def test_a_measurement_is_achieved_compression_ratio_and_the_old_name_warns():
    import torch

    from kvzap_eval.runtime.stats import CompressionStats, LayerStats

    kept, evicted = torch.tensor([[3, 1]]), torch.tensor([[1, 3]])
    layer = LayerStats(kept, evicted, 4, kept + 16, 10, 8, 20)
    stats = CompressionStats([layer])
    assert stats.achieved_compression_ratio == layer.achieved_compression_ratio == 0.5
    with pytest.warns(DeprecationWarning, match="CompressionStats.achieved_compression_ratio"):
        assert stats.compression_ratio == 0.5
    with pytest.warns(DeprecationWarning, match="LayerStats.achieved_compression_ratio"):
        assert layer.compression_ratio == 0.5
    assert stats.summary()["achieved_compression_ratio"] == 0.5 and "compression_ratio" not in stats.summary()


def test_the_old_entry_points_of_scorers_and_policies_warn_and_still_answer():
    import torch

    from kvzap_eval.runtime.cache import CompactLayer
    from kvzap_eval.runtime.policies import FixedRatioPolicy
    from kvzap_eval.runtime.scorers import LayerCall, StreamingScorer

    scorer, token_index = StreamingScorer(num_kv_heads=1, n_sink=1), torch.arange(4)[None]
    expected = scorer.score(LayerCall(0, torch.zeros(1, 4, 8), token_index, module=None, kwargs={}, layer=None))
    with pytest.warns(DeprecationWarning, match="StreamingScorer.score"):
        assert torch.equal(scorer(0, torch.zeros(1, 4, 8), token_index), expected)
    layer = CompactLayer()
    keys = torch.randn(1, 1, 4, 2)
    layer.update(keys, keys.clone())
    with pytest.warns(DeprecationWarning, match="FixedRatioPolicy.decide"):
        drop = FixedRatioPolicy(0.5).select(layer, expected)
    assert drop.sum() == 2
