"""Does adding EyePACS help APTOS? Re-runs the shipped run's folds with training restricted to APTOS images.

Uses the run's resolved config and feature cache (same folds, same recipe), trains on the APTOS images of the
training folds only, predicts the APTOS images of each held-out fold, and prints referable AUC and QWK (most
probable grade) beside the combined run's out-of-fold numbers on the same images. About 25 minutes on 2 cores.
(`retinagrade train --source-ablation` does this for every source inside a training run.)

    python benchmarks/source_ablation_aptos.py [--run runs/final]
"""

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch

from retinagrade.training import train as T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/final"))
    parser.add_argument("--source", default="aptos2019-224")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = T.TrainConfig(**json.loads((args.run / "train_config.json").read_text()))
    torch.set_num_threads(cfg.threads)
    inputs = T.load_inputs(cfg)
    samples, grades, sources = inputs.samples, inputs.grades, inputs.sources
    folds = T.make_folds(samples, cfg.folds, cfg.seed)
    only = sources == args.source
    logits = np.zeros((len(samples), 5), np.float32)
    for k in range(cfg.folds):
        net = T.fit(cfg, inputs, np.flatnonzero((folds != k) & only), seed=cfg.seed + 1000 + k)
        held_out = np.flatnonzero((folds == k) & only)
        logits[held_out] = T.predict(net, inputs.feed, held_out).logits
    with (args.run / "oof_predictions.csv").open() as fh:
        oof = {row["image"]: row for row in csv.DictReader(fh)}
    combined = np.array(
        [
            [float(oof[str(s.path)][f"logit{j}"]) for j in range(5)]
            for s, keep in zip(samples, only, strict=True)
            if keep
        ]
    )
    n = int(only.sum())
    result = {
        f"{args.source}_only_cv": T._headline(grades[only], T.Predictions(logits[only], np.zeros(n), np.zeros((n, 1)))),
        "combined_cv": T._headline(grades[only], T.Predictions(combined, np.zeros(n), np.zeros((n, 1)))),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
