"""Fitting KVzap surrogates on collected pairs: ridge per layer (linear) and the MLP recipe, plus the R² metric.

Recipe (kvpress `kvzap/train.py`, KVzap paper section 3):

- Linear: per layer, ridge regression with intercept and alpha = 1.0 (sklearn `Ridge()`), fp32 X -> the H_kv
  targets. Solved in closed form from X^T X and X^T y accumulated in float64 over chunks, so the rows never need to
  be in memory at once; the intercept is not penalised (X and y are centred), exactly as sklearn does.
- MLP: `Linear(D, D/8) -> GELU -> Linear(D/8, H_kv)`, MSE, AdamW (lr 5e-3, weight decay 0.01), 15 epochs, batch
  512, cosine schedule stepped per epoch, gradient-norm clip 1.0, 5% held out for validation. kvpress trains all
  layers jointly as one model; their losses are independent, so here each layer is trained on its own (one layer's
  rows in memory at a time). Three choices differ from kvpress's defaults, each switchable back
  (`MLPConfig(standardize="none", early_stopping=False)` and no `groups` is kvpress's recipe):
  - `standardize="global"`: inputs are centred and divided by one scale per layer (their mean feature std), targets
    are standardised per head; both affine maps are folded into the first and last linear layers afterwards, so
    the checkpoint is a plain MLP on raw hidden states. (Early layers have tiny hidden states, std ~0.02, which the
    raw recipe underfits; per-feature scaling, "feature", amplifies near-constant features and overfits.)
  - `groups`: the 5% validation split holds out whole prompts, not rows, so it measures what the test measures,
    generalisation to unseen text (rows of one prompt are strongly correlated).
  - `early_stopping`: the epoch with the lowest validation MSE is kept.
- Metric: the squared Pearson correlation between teacher and prediction per (layer, KV head) on held-out prompts;
  the paper reports its mean over all layers and heads.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

STANDARDIZE_MODES = ("global", "feature", "none")

# ----------------------------------------------------------------------------------------------------- ridge


class RidgeAccumulator:
    """Sufficient statistics of a multi-output ridge regression with intercept, accumulated chunk by chunk."""

    def __init__(self, n_features: int, n_targets: int) -> None:
        self.n = 0
        self.sx = torch.zeros(n_features, dtype=torch.float64)
        self.sy = torch.zeros(n_targets, dtype=torch.float64)
        self.xx = torch.zeros(n_features, n_features, dtype=torch.float64)
        self.xy = torch.zeros(n_features, n_targets, dtype=torch.float64)

    def add(self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> None:
        """Add rows x (n, D) and targets y (n, H)."""
        x = torch.as_tensor(x).to(torch.float64)
        y = torch.as_tensor(y).to(torch.float64)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x
        self.xy += x.T @ y

    def solve(self, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (H, D), bias (H,)) in float32 minimising ||y - x W^T - b||^2 + alpha ||W||^2."""
        if self.n == 0:
            raise ConfigError("ridge regression got no rows: collect some training prompts first")
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.xx - self.n * torch.outer(mx, mx)
        cxy = self.xy - self.n * torch.outer(mx, my)
        eye = torch.eye(cxx.shape[0], dtype=torch.float64)
        w = torch.linalg.solve(cxx + alpha * eye, cxy)  # (D, H)
        b = my - mx @ w
        return w.T.contiguous().float(), b.float()


def fit_ridge(
    chunks: Iterable[tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor]], alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression with intercept over (x, y) chunks; returns (weight (H, D), bias (H,))."""
    acc: RidgeAccumulator | None = None
    for x, y in chunks:
        if acc is None:
            acc = RidgeAccumulator(x.shape[1], y.shape[1])
        acc.add(x, y)
    if acc is None:
        raise ConfigError("ridge regression got no rows: collect some training prompts first")
    return acc.solve(alpha)


# ------------------------------------------------------------------------------------------------------- mlp


@dataclass(frozen=True)
class MLPConfig:
    """The MLP recipe (kvpress's hyper-parameters; `standardize` and `early_stopping` see the module docstring)."""

    lr: float = 5e-3
    weight_decay: float = 0.01
    epochs: int = 15
    batch_size: int = 512
    clip_norm: float = 1.0
    val_fraction: float = 0.05
    standardize: str = "global"
    early_stopping: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("MLP training needs epochs >= 1 and batch_size >= 1 (recipe: 15, 512)")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"the MLP learning rate must be a finite number above 0, got {self.lr} (e.g. --lr 5e-3)")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.standardize not in STANDARDIZE_MODES:
            raise ConfigError(f"standardize must be one of {', '.join(STANDARDIZE_MODES)}, got {self.standardize!r}")


@dataclass
class MLPHistory:
    """Per-epoch training and validation MSE on the raw targets (validation is NaN without a validation split)."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int | None = None  # the epoch kept by early stopping (1-based)


def make_mlp(input_dim: int, hidden_dim: int, output_dim: int) -> nn.Sequential:
    """The KVzap MLP layout: `Linear -> GELU (exact) -> Linear` (state-dict keys 0.* and 2.*)."""
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim), nn.GELU(approximate="none"), nn.Linear(hidden_dim, output_dim)
    )


def _moments(t: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and scale: the column's std ("feature"), one std for all columns ("global"), or none."""
    if mode == "none":
        return torch.zeros(t.shape[1]), torch.ones(t.shape[1])
    mean = t.mean(0)
    if mode == "feature":
        return mean, t.std(0).clamp_min(1e-6)
    return mean, t.var(0).mean().sqrt().clamp_min(1e-6).expand(t.shape[1]).clone()


@torch.no_grad()
def _fold(mlp: nn.Sequential, x_mean, x_std, y_mean, y_std) -> None:
    """Turn an MLP trained on (x - x_mean) / x_std -> (y - y_mean) / y_std into one on raw x -> raw y."""
    first, last = mlp[0], mlp[2]
    first.weight.div_(x_std)
    first.bias.sub_(first.weight @ x_mean)
    last.weight.mul_(y_std[:, None])
    last.bias.mul_(y_std).add_(y_mean)


def validation_split(
    n_rows: int, fraction: float, gen: torch.Generator, groups: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation rows, training rows): a random `fraction` of the rows, or of the groups (e.g. prompts) if given."""
    if groups is None:
        order = torch.randperm(n_rows, generator=gen)
        n_val = round(fraction * n_rows)
        return order[:n_val], order[n_val:]
    names = np.unique(groups)
    n_val = max(1, round(fraction * len(names))) if fraction > 0 else 0
    chosen = names[torch.randperm(len(names), generator=gen)[:n_val].numpy()]
    is_val = torch.from_numpy(np.isin(groups, chosen))
    return torch.nonzero(is_val)[:, 0], torch.nonzero(~is_val)[:, 0]


def train_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    hidden_dim: int,
    config: MLPConfig | None = None,
    groups: np.ndarray | None = None,
) -> tuple[nn.Sequential, MLPHistory]:
    """Train one layer's MLP on x (N, D) -> y (N, H) by the recipe; returns it (eval mode, float32) and its history.

    `groups` (N,) assigns rows to prompts: the validation split then holds out whole prompts.
    """
    config = config or MLPConfig()
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    gen = torch.Generator().manual_seed(config.seed)
    val, train = validation_split(x.shape[0], config.val_fraction, gen, groups)
    n_val = len(val)
    x_mean, x_std = _moments(x[train], config.standardize)
    y_mean, y_std = _moments(y[train], "none" if config.standardize == "none" else "feature")
    xs, ys = (x - x_mean) / x_std, (y - y_mean) / y_std

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        mlp = make_mlp(x.shape[1], hidden_dim, y.shape[1])
    optimizer = torch.optim.AdamW(mlp.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    history = MLPHistory()
    loss_fn = nn.MSELoss()
    for _ in range(config.epochs):
        mlp.train()
        total, count = 0.0, 0
        for batch in train[torch.randperm(len(train), generator=gen)].split(config.batch_size):
            out = mlp(xs[batch])
            loss = loss_fn(out, ys[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(mlp.parameters(), config.clip_norm)
            optimizer.step()
            total += float((((out.detach() - ys[batch]) * y_std) ** 2).mean(1).sum())
            count += len(batch)
        schedule.step()
        mlp.eval()
        history.train_loss.append(total / count)
        history.val_loss.append(_raw_mse(mlp, xs[val], y[val], y_mean, y_std) if n_val else math.nan)
        if config.early_stopping and n_val and history.val_loss[-1] <= min(history.val_loss):
            best = copy.deepcopy(mlp.state_dict())
            history.best_epoch = len(history.val_loss)
    if config.early_stopping and n_val:
        mlp.load_state_dict(best)
    _fold(mlp, x_mean, x_std, y_mean, y_std)
    return mlp.eval(), history


@torch.no_grad()
def _raw_mse(mlp: nn.Module, xs: torch.Tensor, y: torch.Tensor, y_mean, y_std) -> float:
    return float(((mlp(xs) * y_std + y_mean - y) ** 2).mean())


# ---------------------------------------------------------------------------------------------------- metric


def squared_pearson(y_true: np.ndarray | torch.Tensor, y_pred: np.ndarray | torch.Tensor) -> np.ndarray:
    """Squared Pearson correlation per column of (n, H) arrays (0 where a column is constant)."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    t, p = t - t.mean(0), p - p.mean(0)
    denom = np.sqrt((t * t).sum(0) * (p * p).sum(0))
    r = np.divide((t * p).sum(0), denom, out=np.zeros(t.shape[1]), where=denom > 0)
    return r**2
