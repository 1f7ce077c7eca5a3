"""R² of shipped surrogates on their own training rows beside the held-out ones: is a surrogate short of data (a
gap between the two) or of capacity (both low)? Squared Pearson per layer, averaged over layers, as the training
report's `r2`.

    python scripts/train_r2.py <collection data dir> [surrogate dir ...] [--rows 30000]

e.g. `python scripts/train_r2.py .work/smollm2-train-v2/data kvzap_eval/surrogates/KVzap-linear-SmolLM2-135M-Instruct
kvzap_eval/surrogates/KVzap-mlp-SmolLM2-135M-Instruct` (the collection `python -m kvzap_eval.train` keeps).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from kvzap_eval.surrogate import load_surrogate
from kvzap_eval.train.collect import CollectedData
from kvzap_eval.train.fit import squared_pearson


def r2(surrogate, data: CollectedData, split: str, rows: int, seed: int = 0) -> float:
    """Mean over layers of the squared Pearson correlation on up to `rows` random rows of `split`."""
    ids = data.rows(split)
    pick = np.sort(np.random.default_rng(seed).choice(len(ids), size=min(rows, len(ids)), replace=False))
    y = data.y(split)[pick]
    values = []
    for layer in range(data.num_layers):
        x = torch.as_tensor(np.asarray(data.x(layer, split, ids[pick]))).float()
        with torch.no_grad():
            values.append(squared_pearson(y[:, layer], surrogate.layers[layer](x).numpy()))
    return float(np.mean(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("surrogates", nargs="+")
    parser.add_argument("--rows", type=int, default=30000)
    args = parser.parse_args()
    data = CollectedData(args.data)
    print("| surrogate | R² on training rows | R² held out |")
    print("|---|---|---|")
    for directory in args.surrogates:
        surrogate = load_surrogate(directory)
        train, test = (r2(surrogate, data, split, args.rows) for split in ("train", "test"))
        print(f"| {directory} | {train:.3f} | {test:.3f} |")


if __name__ == "__main__":
    main()
