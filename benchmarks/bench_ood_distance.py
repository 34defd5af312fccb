"""How well the embedding distance to the training images separates non-fundus pictures from fundus photos.

The model spec records the mean and spread of the training embeddings (``ood.embedding_mean/std``). The
pipeline once refused images whose distance exceeded a limit; it never worked well enough to be switched
on, and the model card says so. This script keeps that claim re-runnable: it grades each set's images
WITHOUT the quality gate, computes the root-mean-square z-distance of each embedding, and prints the
distance quantiles per set and the AUC of "distance says not a fundus" for every non-fundus set against all
fundus photos (0.5 = no separation, 1.0 = perfect). Usage::

    python benchmarks/bench_ood_distance.py [--data ../shared/data] [--per-set 60] [--model models/retinagrade-dr.json]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from retinagrade.errors import RetinagradeError
from retinagrade.pipeline import DEFAULT_MODEL, GradingPipeline
from retinagrade.preprocessing.decode import decode_image, read_image_file
from retinagrade.preprocessing.pipeline import batch_tensor, prepare_fundus

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FUNDUS_SETS = ("raw-fundus-samples", "eyepacs-768", "mexico-512", "aptos2019-224")
NON_FUNDUS_SETS = ("non-fundus", "non-fundus-2")


def _images(folder: Path, limit: int) -> list[Path]:
    with (folder / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    # non-fundus/ also holds two real fundus photos (kind "fundus"...): they are not negatives.
    rows = [r for r in rows if "fundus" not in r.get("kind", "")]
    step = max(1, len(rows) // limit)
    return [folder / r["image"] for r in rows[::step][:limit]]


def _distances(pipeline: GradingPipeline, paths: list[Path]) -> np.ndarray:
    ood = pipeline.spec.ood
    mean = np.asarray(ood["embedding_mean"], np.float32)
    std = np.asarray(ood["embedding_std"], np.float32)
    config = pipeline.spec.preprocess
    out: list[float] = []
    for path in paths:
        try:
            decoded = decode_image(read_image_file(path), min_side=config.decode_min_side)
            model_image = prepare_fundus(decoded, config).model_image
        except RetinagradeError:
            continue
        embedding = pipeline.grader.run(batch_tensor([model_image], config)).embedding[0]
        out.append(float(np.sqrt(np.mean(((embedding - mean) / std) ** 2))))
    return np.asarray(out)


def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counted half."""
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--per-set", type=int, default=60)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = parser.parse_args()
    pipeline = GradingPipeline.load(args.model, threads=2)
    if "embedding_mean" not in pipeline.spec.ood:
        raise SystemExit("the model spec records no embedding statistics (ood.embedding_mean/std)")
    found = {
        name: _distances(pipeline, _images(args.data / name, args.per_set)) for name in FUNDUS_SETS + NON_FUNDUS_SETS
    }
    print(f"model {pipeline.spec.name} {pipeline.spec.version}; distance = RMS z-score of the embedding")
    print(f"{'set':<22}{'n':>5}{'p5':>8}{'p50':>8}{'p95':>8}")
    for name, d in found.items():
        if d.size:
            p5, p50, p95 = np.percentile(d, [5, 50, 95])
            print(f"{name:<22}{d.size:>5}{p5:>8.2f}{p50:>8.2f}{p95:>8.2f}")
    fundus = np.concatenate([found[n] for n in FUNDUS_SETS])
    for name in NON_FUNDUS_SETS:
        if found[name].size and fundus.size:
            print(f"AUC {name} vs all fundus sets: {_auc(found[name], fundus):.3f}")


if __name__ == "__main__":
    main()
