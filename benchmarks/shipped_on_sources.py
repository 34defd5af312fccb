"""The shipped model, unchanged, on every graded source: the row a new recipe's leave-one-source-out table beats.

Uses a training config (for the sources and the feature cache) and the model spec (temperature, decision rule,
operating point). The sources the shipped model trained on (``init_sources`` in the config) and their patients in
other folders are left out: there its numbers would be in-sample.

    python benchmarks/shipped_on_sources.py --config runs/cfg/heads.yaml --model models/retinagrade-dr.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from retinagrade.inference.model_spec import ModelSpec
from retinagrade.training import train as T
from retinagrade.training.report import format_loso_markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="training config with heads_only + init_from")
    parser.add_argument("--model", type=Path, default=Path("models/retinagrade-dr.json"))
    parser.add_argument("--out", type=Path, default=None, help="write shipped_on_sources.{json,md} here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    spec = ModelSpec.load(args.model)
    cfg = T.TrainConfig.from_file(
        args.config, init_from=str(spec.model_path), heads_only=True, views=0, artefact_views=0
    )
    torch.set_num_threads(cfg.threads)
    inputs = T.load_inputs(cfg)
    net = T.initial_net(cfg)
    everything = np.arange(len(inputs.samples))
    preds = T.predict(net, inputs.feed, everything)
    decision = {
        "temperature": spec.temperature,
        "rule": spec.decision.rule,
        "thresholds": list(spec.decision.thresholds),
        "referable_threshold": spec.referable_threshold,
        "qwk_by_rule": {},
        "chosen_on": "the shipped model's own out-of-fold choice",
        "operating_point": {},
    }
    # Sources the shipped model trained on, and their patients elsewhere, would be in-sample: left out.
    seen = set(cfg.init_sources)
    seen_groups = np.array(sorted({s.group for s in inputs.samples if s.source in seen}))
    sources = sorted(set(inputs.sources) - seen)
    report = {"decision": decision, "holdout": sources, "sources": {}}
    for name in sources:
        idx = np.flatnonzero((inputs.sources == name) & ~np.isin(inputs.groups, seen_groups))
        scorer = T._metrics_for if T._is_five_grade(inputs, name) else T._coarse_metrics
        report["sources"][name] = scorer(inputs, idx, preds.take(idx), decision)
    markdown = format_loso_markdown(
        report,
        title=f"{spec.name} {spec.version} on sources it never trained on",
        intro=f"Each row: the model as shipped, on every image of a source it did not train on, less the images of "
        f"patients or photo groups that are also in its training sources ({', '.join(sorted(seen))}). Sensitivity "
        "and specificity at its shipped operating point",
    )
    print(markdown)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "shipped_on_sources.json").write_text(json.dumps(report, indent=2, default=float))
        (args.out / "shipped_on_sources.md").write_text(markdown)
        # Per-image predictions on the unseen images: what the fellow-eye measurement and the site tools read.
        idx = np.flatnonzero(np.isin(inputs.sources, sources) & ~np.isin(inputs.groups, seen_groups))
        T._write_predictions(
            args.out / "shipped_predictions.csv", inputs, idx, preds.take(idx), decision, inputs.sources[idx]
        )


if __name__ == "__main__":
    main()
