"""Streamed collection (resume, no duplicate rows), corpus, ridge/MLP fitting, R², calibration, the one command,
and the surrogates shipped for the embedded SmolLM2."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kvzap_eval.errors import ConfigError, CorpusError, OutputDirError
from kvzap_eval.runtime.methods import MethodConfig, build_method
from kvzap_eval.runtime.session import compress
from kvzap_eval.surrogate import (
    SHIPPED,
    load_surrogate,
    random_surrogate,
    resolve_surrogate_source,
    save_surrogate,
    surrogate_config_for,
)
from kvzap_eval.surrogate.report import probe_input, probe_scores, recommended_threshold
from kvzap_eval.train import collect as collect_module
from kvzap_eval.train.calibration import CalibrationConfig, prefill_ratios, surrogate_scores
from kvzap_eval.train.collect import CollectConfig, CollectedData, collect
from kvzap_eval.train.corpus import CorpusConfig, build_corpus, common_licenses, python_topics
from kvzap_eval.train.fit import (
    MLPConfig,
    RidgeAccumulator,
    fit_ridge,
    squared_pearson,
    train_mlp,
    validation_split,
)
from kvzap_eval.train.pipeline import (
    TrainConfig,
    build_parser,
    config_from_args,
    main,
    prepare_output,
    train_surrogates,
)

from .conftest import tiny_model
from .test_teacher import word_tokenizer, words

SMALL = {"min_tokens": 60, "max_tokens": 200, "n_test_per_source": 2}
SMOL = "SmolLM2-135M-Instruct"


def write_corpus(directory: Path, n_files: int = 3, n_words: int = 700) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [words(10, seed=100 * i + j) for j in range(n_words // 10)]
        (directory / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture
def small_corpus(tmp_path):
    files = write_corpus(tmp_path / "corpus")
    return build_corpus(word_tokenizer(), CorpusConfig(files=(str(files),), n_train=4, **SMALL))


def read_all(directory: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted(directory.glob("*.npy"))}


# --------------------------------------------------------------------------------------------------- corpus


def test_corpus_prompts_fit_the_window_and_are_reproducible(small_corpus):
    tokenizer = word_tokenizer()
    assert [p.split for p in small_corpus.prompts] == ["test"] * 2 + ["train"] * 4
    for p in small_corpus.prompts:
        assert 60 <= p.n_tokens <= 200
        assert len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) == p.n_tokens
    again = build_corpus(tokenizer, small_corpus.config)
    assert again.digest() == small_corpus.digest()
    other = build_corpus(tokenizer, CorpusConfig(**{**small_corpus.config.__dict__, "seed": 1}))
    assert other.digest() != small_corpus.digest()
    provenance = small_corpus.provenance()
    assert provenance["n_test_prompts"] == 2 and len(provenance["documents"][0]["sha256"]) == 64


def test_corpus_too_short_for_the_token_window_is_refused(tmp_path):
    (tmp_path / "short.txt").write_text(words(40))
    with pytest.raises(CorpusError, match="yields 0 prompt"):
        build_corpus(word_tokenizer(), CorpusConfig(files=(str(tmp_path / "short.txt"),), n_train=2, **SMALL))


def test_missing_corpus_path_and_narrow_window_are_refused(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        build_corpus(word_tokenizer(), CorpusConfig(files=(str(tmp_path / "nope"),), **SMALL))
    with pytest.raises(CorpusError, match="too narrow"):
        CorpusConfig(min_tokens=750, max_tokens=760)


def test_builtin_sources_exist_offline():
    assert len(python_topics()) > 50
    licenses = common_licenses()
    assert len({d.sha256 for d in licenses}) == len(licenses)


# ----------------------------------------------------------------------------------------------- collection


def test_collection_layout_and_sampled_rows(tmp_path, small_corpus, llama):
    stats = collect(
        llama, word_tokenizer(), small_corpus, tmp_path / "data", CollectConfig(tokens_per_prompt=20), progress=False
    )
    assert stats.collected == 6
    data = CollectedData(tmp_path / "data")
    assert data.prompts == {"test": [0, 1], "train": [2, 3, 4, 5]}
    assert data.x(1, "train").shape == (80, 64) and data.y("test").shape == (40, 2, 2)
    positions = np.load(tmp_path / "data" / "positions.npy")
    assert all(len(set(row)) == 20 for row in positions)
    assert np.isfinite(data.y("train")).all()


def test_interrupted_collection_resumes_without_duplicating_rows(tmp_path, small_corpus, llama, monkeypatch):
    tokenizer, config = word_tokenizer(), CollectConfig(tokens_per_prompt=20)
    collect(llama, tokenizer, small_corpus, tmp_path / "full", config, progress=False)

    real_run_teacher, calls = collect_module.run_teacher, []

    def crashing_run_teacher(*args, sink, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the 4th prompt dies after writing its first layer

            def half_sink(layer_idx, hidden, log_scores):
                sink(layer_idx, hidden, log_scores)
                raise KeyboardInterrupt

            return real_run_teacher(*args, sink=half_sink, **kwargs)
        return real_run_teacher(*args, sink=sink, **kwargs)

    monkeypatch.setattr(collect_module, "run_teacher", crashing_run_teacher)
    with pytest.raises(KeyboardInterrupt):
        collect(llama, tokenizer, small_corpus, tmp_path / "cut", config, progress=False)
    assert json.loads((tmp_path / "cut" / "manifest.json").read_text())["done"] == [0, 1, 2]
    monkeypatch.setattr(collect_module, "run_teacher", real_run_teacher)

    stats = collect(llama, tokenizer, small_corpus, tmp_path / "cut", config, resume=True, progress=False)
    assert (stats.collected, stats.skipped) == (3, 3)
    full, cut = read_all(tmp_path / "full"), read_all(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for name in full:
        assert full[name].shape == cut[name].shape  # 6 prompts x 20 rows, never more
        np.testing.assert_array_equal(full[name], cut[name])
    assert CollectedData(tmp_path / "cut").n_rows("train") == 80


def test_existing_collection_needs_resume_and_the_same_settings(tmp_path, small_corpus, llama):
    tokenizer = word_tokenizer()
    collect(llama, tokenizer, small_corpus, tmp_path / "d", CollectConfig(tokens_per_prompt=20), progress=False)
    with pytest.raises(OutputDirError, match="--resume"):
        collect(llama, tokenizer, small_corpus, tmp_path / "d", CollectConfig(tokens_per_prompt=20), progress=False)
    with pytest.raises(OutputDirError, match="tokens_per_prompt differ"):
        collect(
            llama,
            tokenizer,
            small_corpus,
            tmp_path / "d",
            CollectConfig(tokens_per_prompt=10),
            resume=True,
            progress=False,
        )


def test_output_dir_not_empty_is_refused_unless_resume_or_force(tmp_path):
    out = tmp_path / "out"
    (out / "KVzap-mlp-x").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty"):
        prepare_output(out, resume=False, force=False)
    with pytest.raises(OutputDirError, match="no collection to resume"):
        prepare_output(out, resume=True, force=False)
    prepare_output(out, resume=False, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # our results go, other files stay


def test_cli_refuses_non_empty_output_with_one_line(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert main(["--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--resume" in err and "--force" in err


# ------------------------------------------------------------------------------------------------- fitting


def test_ridge_recovers_a_known_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 16, generator=g) * 3 + 1
    w, b = torch.randn(3, 16, generator=g), torch.tensor([-5.0, 0.5, 2.0])
    y = x @ w.T + b + 0.01 * torch.randn(6000, 3, generator=g)
    weight, bias = fit_ridge(zip(x.split(1000), y.split(1000)), alpha=1.0)
    torch.testing.assert_close(weight, w, atol=2e-3, rtol=0)
    torch.testing.assert_close(bias, b, atol=5e-3, rtol=0)


def test_ridge_equals_sklearn_ridge():
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 8)).astype(np.float32), rng.normal(size=(300, 2)).astype(np.float32)
    acc = RidgeAccumulator(8, 2)
    acc.add(x, y)
    weight, bias = acc.solve(alpha=5.0)
    ref = sklearn.Ridge(alpha=5.0).fit(x.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(weight.numpy(), ref.coef_, atol=1e-5)
    np.testing.assert_allclose(bias.numpy(), ref.intercept_, atol=1e-5)


@pytest.mark.parametrize("standardize", ["global", "feature", "none"])
def test_mlp_training_reduces_loss(standardize):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g) * 4 + 2
    y = torch.stack([torch.tanh(x[:, 0] / 4) * 3 - 5, (x[:, 1] / 4) ** 2], dim=1)
    config = MLPConfig(epochs=8, batch_size=128, standardize=standardize, early_stopping=False)
    mlp, history = train_mlp(x, y, hidden_dim=16, config=config)
    assert len(history.train_loss) == len(history.val_loss) == 8
    assert history.train_loss[-1] < 0.2 * history.train_loss[0]
    assert history.val_loss[-1] < 0.2 * float(((y - y.mean(0)) ** 2).mean())
    with torch.no_grad():  # the standardisation is folded in: the returned MLP reads raw inputs
        assert float(((mlp(x) - y) ** 2).mean()) < 0.2 * float(((y - y.mean(0)) ** 2).mean())


def test_validation_holds_out_whole_prompts_and_early_stopping_keeps_the_best_epoch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 8, generator=g)
    y = x[:, :2] * 2 + 0.5 * torch.randn(2000, 2, generator=g)
    groups = np.repeat(np.arange(40), 50)  # 40 "prompts" of 50 rows
    config = MLPConfig(epochs=6, batch_size=64, val_fraction=0.05)
    _, history = train_mlp(x, y, hidden_dim=8, config=config, groups=groups)
    assert history.best_epoch == 1 + int(np.argmin(history.val_loss))
    val, train = validation_split(2000, 0.05, torch.Generator().manual_seed(0), groups)
    assert len(val) == 100 and set(groups[val.numpy()]).isdisjoint(groups[train.numpy()])


def test_squared_pearson_per_column():
    t = np.arange(10.0)[:, None].repeat(3, 1)
    p = np.stack([2 * t[:, 0] + 1, -t[:, 1], np.ones(10)], axis=1)
    np.testing.assert_allclose(squared_pearson(t, p), [1.0, 1.0, 0.0])


# --------------------------------------------------------------------------------------------- calibration


def test_calibrated_ratio_equals_the_runtime_ratio(tmp_path, llama):
    surrogate = random_surrogate(llama.config, "mlp", seed=3, scale=4.0)
    save_surrogate(surrogate, tmp_path / "s")
    ids = torch.randint(1, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    scores = surrogate_scores(llama, ids, {"mlp": surrogate})["mlp"]
    for tau in (-1.0, 0.0, 0.5):
        method = build_method(
            llama, MethodConfig(method="kvzap", surrogate=str(tmp_path / "s"), threshold=tau, window=16)
        )
        with compress(llama, method) as session:
            llama(ids)
            ratio = session.stats().achieved_compression_ratio
        assert prefill_ratios(scores, [tau], window=16)[0] == pytest.approx(ratio, abs=1e-9)


# ------------------------------------------------------------------------------------------ one command


@pytest.fixture
def tiny_model_dir(tmp_path):
    model = tiny_model("llama")
    model.config.name_or_path = "Tiny-Llama"
    directory = tmp_path / "Tiny-Llama"
    model.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


def test_one_command_writes_hub_layout_checkpoints_and_report(tmp_path, tiny_model_dir):
    files = write_corpus(tmp_path / "corpus")
    config = TrainConfig(
        out=str(tmp_path / "out"),
        model=str(tiny_model_dir),
        corpus=CorpusConfig(files=(str(files),), n_train=4, **SMALL),
        collect=CollectConfig(tokens_per_prompt=20),
        mlp=MLPConfig(epochs=2, batch_size=16),
        calibration=CalibrationConfig(window=16),
        progress=False,
    )
    result = train_surrogates(config)
    report = result.report
    assert sorted(report["surrogates"]) == ["linear", "mlp"]
    for kind in ("linear", "mlp"):
        directory = tmp_path / "out" / f"KVzap-{kind}-Tiny-Llama"
        assert sorted(p.name for p in directory.iterdir()) == [
            "config.json",
            "model.safetensors",
            "training_report.json",
        ]
        r = json.loads((directory / "training_report.json").read_text())
        assert r["surrogate_type"] == kind
        assert len(r["r2"]["per_layer"]) == 2 and len(r["r2"]["per_layer_head"][0]) == 2
        assert r["r2"]["overall"] == pytest.approx(np.mean(r["r2"]["per_layer_head"]), abs=1e-3)
        assert list(r["r2"]["per_source"]) == ["files"] and 0 <= r["r2"]["per_source"]["files"] <= 1
        assert [row["threshold"] for row in r["calibration"]["table"]] == list(range(-9, 0))
        ratios = [row["compression_ratio"] for row in r["calibration"]["table"]]
        assert ratios == sorted(ratios)  # a higher tau never evicts less
        assert recommended_threshold(directory) == r["recommended_threshold"]
        loaded = load_surrogate(directory)
        x = torch.randn(1, 7, 64)
        assert torch.equal(loaded(1, x), result.surrogates[kind](1, x))
        assert probe_scores(loaded) == r["probe"]["scores"]
    assert report["collection"]["n_train_rows"] == 80 and report["collection"]["n_test_rows"] == 40
    assert report["corpus"]["digest"] and report["peak_rss_mb"] > 0

    with pytest.raises(OutputDirError, match="not empty"):
        train_surrogates(config)
    config.resume = True  # everything collected: resume only refits
    again = train_surrogates(config)
    assert again.report["collection"]["seconds_this_run"] < report["collection"]["seconds_this_run"] + 60
    assert again.report["surrogates"]["linear"]["r2"] == report["surrogates"]["linear"]["r2"]


def test_mlp_width_and_learning_rate_grid_chosen_per_layer_by_validation(tmp_path, tiny_model_dir):
    files = write_corpus(tmp_path / "corpus")
    grid = (3e-2, 1e-4)
    config = TrainConfig(
        out=str(tmp_path / "out"),
        model=str(tiny_model_dir),
        types=("mlp",),
        corpus=CorpusConfig(files=(str(files),), n_train=4, **SMALL),
        collect=CollectConfig(tokens_per_prompt=20),
        mlp=MLPConfig(epochs=2, batch_size=16, val_fraction=0.25),
        mlp_hidden_dim=5,
        mlp_lr_grid=grid,
        calibration=CalibrationConfig(window=16),
        progress=False,
    )
    report = train_surrogates(config).report["surrogates"]["mlp"]
    directory = tmp_path / "out" / "KVzap-mlp-Tiny-Llama"
    assert load_surrogate(directory).config.hidden_dim == 5 == report["training"]["hidden_dim"]
    assert report["training"]["lr_grid"] == list(grid) and report["training"]["lr"] is None
    data = CollectedData(tmp_path / "out" / "data")
    prompts = data.rows("train") // data.k
    for layer, kept in enumerate(report["training"]["losses_per_layer"]):
        # the kept rate is the one whose own run reaches the lowest validation MSE on this layer
        vals = {}
        for lr in grid:
            _, history = train_mlp(
                data.x(layer, "train"), data.y("train", layer), 5, replace(config.mlp, lr=lr), prompts
            )
            vals[lr] = history.val_loss[(history.best_epoch or len(history.val_loss)) - 1]
        assert kept["lr"] == min(vals, key=vals.get)
        assert kept["val_mse"] == pytest.approx(vals[kept["lr"]], abs=1e-5)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mlp_hidden_dim": 0}, "hidden width is a whole number >= 1"),
        ({"mlp_lr_grid": (1e-3, float("nan"))}, "learning rate must be a finite number above 0"),
        ({"mlp_lr_grid": (1e-3, 1e-4), "mlp": MLPConfig(val_fraction=0)}, "keep a validation split"),
    ],
)
def test_bad_mlp_width_or_learning_rate_grid_is_refused(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(out=str(tmp_path / "out"), **changes)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: MLPConfig(lr=float("nan")), "learning rate must be a finite number above 0"),
        (lambda: MLPConfig(lr=0.0), "learning rate must be a finite number above 0"),
        (lambda: surrogate_config_for(tiny_model("llama").config, "mlp", hidden_dim=True), "whole number >= 1"),
        (lambda: surrogate_config_for(tiny_model("llama").config, "linear", hidden_dim=8), "linear surrogate has none"),
    ],
)
def test_the_recipe_and_the_surrogate_shape_check_their_own_settings(make, message):
    """A learning rate is checked by MLPConfig and a width by the surrogate model, for the CLI's grid too."""
    with pytest.raises(ConfigError, match=message):
        make()


def test_cli_takes_a_learning_rate_grid_and_a_width(tmp_path):
    args = build_parser().parse_args(["--out", str(tmp_path), "--lr", "2e-3", "1e-3", "--hidden-dim", "144"])
    config = config_from_args(args)
    assert config.mlp_lr_grid == (2e-3, 1e-3) and config.mlp.lr == 2e-3 and config.mlp_hidden_dim == 144
    single = config_from_args(build_parser().parse_args(["--out", str(tmp_path), "--lr", "1e-3"]))
    assert single.mlp_lr_grid == () and single.mlp.lr == 1e-3 and single.mlp_hidden_dim is None


def test_recommended_threshold_is_none_without_a_report(tmp_path):
    save_surrogate(random_surrogate(tiny_model("llama").config, "linear"), tmp_path / "s")
    assert recommended_threshold(tmp_path / "s") is None
    assert recommended_threshold(tmp_path / "missing") is None


# ------------------------------------------------------------------------------------ shipped surrogates


def shipped(kind: str) -> Path:
    name = f"KVzap-{kind}-{SMOL}"
    if name not in SHIPPED:
        pytest.fail(f"{name} is not shipped in kvzap_eval/surrogates")
    return SHIPPED[name]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_shipped_surrogates_reload_and_score_like_the_trained_model(kind, tmp_path, monkeypatch):
    directory = shipped(kind)
    report = json.loads((directory / "training_report.json").read_text())
    local = load_surrogate(directory)
    assert local.config.n_modules == 30 and local.config.input_dim == 576 and local.config.output_dim == 3
    assert local.config.hidden_dim == (None if kind == "linear" else 144)
    # equal up to float32 summation order (the BLAS kernel, hence the thread count, may differ from the training run)
    np.testing.assert_allclose(np.array(probe_scores(local)), np.array(report["probe"]["scores"]), rtol=1e-5, atol=1e-4)

    # The same files through the hub path (an offline HF cache), as nvidia/KVzap-* checkpoints are loaded.
    commit = "0" * 40
    repo = tmp_path / "hub" / f"models--nvidia--KVzap-{kind}-{SMOL}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (repo / "snapshots" / commit / name).write_bytes((directory / name).read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = load_surrogate(f"nvidia/KVzap-{kind}-{SMOL}")
    x = probe_input(576)[None]
    for layer in (0, 15, 29):
        assert torch.equal(hub(layer, x), local(layer, x))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_shipped_reports_record_held_out_r2_and_a_3x_threshold(kind):
    report = json.loads((shipped(kind) / "training_report.json").read_text())
    # Issue 16's targets: MLP >= 0.67 (met, 0.676); linear >= 0.62 (missed, 0.605: see surrogates/README.md).
    floor = {"linear": 0.60, "mlp": 0.67}[kind]
    assert report["r2"]["overall"] >= floor
    assert len(report["r2"]["per_layer"]) == 30 and len(report["r2"]["per_layer_head"][0]) == 3
    tau = recommended_threshold(shipped(kind))
    assert tau is not None and -12 < tau < 2
    assert abs(report["calibration"]["recommended_ratio"] - 2 / 3) < 0.05


@pytest.mark.slow
def test_shipped_mlp_is_the_default_for_the_embedded_model_and_prunes_near_3x():
    from kvzap_eval.llm.loading import load_causal_lm

    model, tokenizer = load_causal_lm()
    tau = recommended_threshold(shipped("mlp"))
    assert Path(resolve_surrogate_source(model.config, None, "mlp")) == shipped("mlp")
    method = build_method(model, MethodConfig(method="kvzap", threshold=tau))  # surrogate resolved by name
    text = "\n".join(d.text for d in common_licenses()[:1])[:6000]
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with compress(model, method) as session, torch.inference_mode():
        model(ids)
    assert 0.45 < session.stats().achieved_compression_ratio < 0.85
