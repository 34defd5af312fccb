"""Export a trained run to ONNX, check it against PyTorch through the same preprocessing, and install it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retinagrade import __version__
from retinagrade.files import sha256_file
from retinagrade.inference.model_spec import OUTPUT_NAMES, ModelSpec, write_gate_checksums
from retinagrade.preprocessing.decode import decode_image
from retinagrade.preprocessing.pipeline import PreprocessConfig, batch_tensor, prepare_fundus
from retinagrade.training.model import FlipAveraged, export_onnx, load_run_model


def parity(net: nn.Module, onnx_path: Path, images: list[bytes], preprocess: PreprocessConfig) -> dict[str, float]:
    """Largest absolute differences between PyTorch and ONNX Runtime outputs on the same prepared inputs."""
    import onnxruntime as ort

    prepared = [
        prepare_fundus(decode_image(b, min_side=preprocess.decode_min_side), preprocess).model_image for b in images
    ]
    batch = batch_tensor(prepared, preprocess)
    with torch.no_grad():
        reference = [t.numpy() for t in net(torch.from_numpy(batch))]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = list(getattr(net, "output_names", OUTPUT_NAMES))
    outputs = session.run(names, {"input": batch})
    return {n: float(np.abs(r - o).max()) for n, r, o in zip(names, reference, outputs, strict=True)}


def export_run(
    run_dir: Path,
    out: Path,
    gate: Path,
    parity_images: list[Path] | None = None,
    with_runs: list[Path] | None = None,
) -> dict[str, Any]:
    """Re-export ``run_dir/final.pt`` to ``out/<name>.onnx`` with its spec and the gate file beside it.

    ``with_runs``: more runs of the same frozen stem; their tails join ``run_dir``'s in one graph whose outputs
    are the tails' means (:class:`~retinagrade.training.model.TailEnsemble`). The spec (decision, calibration)
    is ``run_dir``'s: refit it on the ensemble's held-out logits (:mod:`retinagrade.training.ensemble`).
    """
    net: nn.Module
    if with_runs:
        from retinagrade.training.ensemble import load_ensemble

        net, cfg = load_ensemble([run_dir, *with_runs])
    else:
        net, cfg = load_run_model(run_dir)
    name = cfg["name"]
    spec = json.loads((run_dir / f"{name}.json").read_text())
    if with_runs:
        spec["ensemble"] = {"runs": [str(d) for d in (run_dir, *with_runs)], "combined": "mean of the tails' outputs"}
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / f"{name}.onnx"
    exported: nn.Module = FlipAveraged(net) if cfg.get("flip_tta") else net
    export_onnx(exported, onnx_path, cfg["input_size"])
    preprocess = PreprocessConfig.from_dict(spec["preprocess"])
    images = [p.read_bytes() for p in parity_images or []]
    if not images:
        rng = np.random.default_rng(0)
        import cv2

        for _ in range(2):
            synthetic = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
            cv2.circle(synthetic, (200, 150), 140, (200, 90, 40), -1)
            images.append(cv2.imencode(".png", synthetic)[1].tobytes())
    diffs = parity(exported, onnx_path, images, preprocess)
    if max(diffs.values()) > 1e-3:
        raise RuntimeError(f"ONNX output differs from PyTorch: {diffs}")
    gate_target = out / "gate.json"
    if gate.resolve() != gate_target.resolve():
        shutil.copyfile(gate, gate_target)
        detector = json.loads(gate.read_text()).get("detector")
        if isinstance(detector, dict):  # the gate's own ONNX file travels with it
            shutil.copyfile(gate.parent / detector["file"], out / detector["file"])
    raw = {
        **spec,
        "export": {"parity_max_abs_diff": diffs, "parity_images": len(images)},
        "gate_meta": json.loads(gate_target.read_text()).get("meta", {}),
    }
    typed = dataclasses.replace(
        ModelSpec.from_dict(spec),
        # The installed model is versioned with the release that installs it.
        version=__version__,
        sha256=sha256_file(onnx_path),
        model_file=onnx_path.name,
        gate_file=gate_target.name,
        gate_files={},
        raw=raw,
    )
    (out / f"{name}.json").write_text(json.dumps(typed.to_dict(), indent=2))
    write_gate_checksums(out / f"{name}.json")
    ModelSpec.load(out / f"{name}.json")  # what the service will read must load
    from retinagrade.training.card import write_card

    write_card(out / f"{name}.json", out / "README.md")
    return {
        "onnx": str(onnx_path),
        "sha256": typed.sha256,
        "parity_max_abs_diff": diffs,
        "size_mb": round(onnx_path.stat().st_size / 1e6, 2),
    }


def refresh_spec(
    spec_path: Path, card: Path | None = None, extra: list[Path] | None = None, lead: list[Path] | None = None
) -> ModelSpec:
    """Rewrite an installed model's spec through :class:`ModelSpec` (same model file, same checksum).

    Fills what older training code left empty: the operating point's held-out sensitivity and specificity
    (from the recorded out-of-fold metrics; older specs read the wrong key and wrote null), and the declared
    output names and CAM channels. Re-renders the card when ``card`` is given.
    """
    spec = ModelSpec.load(spec_path)
    raw = json.loads(json.dumps(spec.raw))
    metrics = raw.get("metrics", {})
    cv = metrics.get("cv") or (metrics if "all" in metrics else {})
    held_out = cv.get("all", {}).get("referable", {})
    referable = raw.setdefault("referable", {})
    for name in ("sensitivity", "specificity"):
        value = (held_out.get(name) or {}).get("value")
        if referable.get(f"{name}_out_of_fold") is None and value is not None:
            referable[f"{name}_out_of_fold"] = value
            referable[f"{name}_held_out"] = value
    typed = dataclasses.replace(spec, raw=raw)
    spec_path.write_text(json.dumps(typed.to_dict(), indent=2))
    if card is not None:
        from retinagrade.training.card import write_card

        write_card(spec_path, card, extra, lead)
    return ModelSpec.load(spec_path)
