"""Measure every image of the data folders once, through the serving path, and cache the result.

Per image: the quality features (``decode_image(min_side=decode_min_side)`` -> ``prepare_fundus`` ->
:func:`compute_quality_features`, exactly what serving computes) and the detector backbone's features of
several *views*: the image as sent, plus honest augmentations. A fundus view stays a fundus photo (rescales,
JPEG re-compression, crops that keep the disc, exposure, flips); a negative view stays a negative (crops,
rescales, colour casts towards fundus orange, a round black field stop, flips). A fundus photo is never
relabelled as a negative. EyePACS-768 camera photos are also measured as APTOS-like 224 px derivatives, the
resolution the gradability score is calibrated on.

Features are cached as ``.npz`` per folder under a git-ignored cache folder, keyed by a hash of the code that
determines them and of the detector file, so a refit of the heads costs seconds.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from retinagrade.preprocessing.decode import DecodedImage, decode_image
from retinagrade.preprocessing.pipeline import PreprocessConfig, prepare_fundus
from retinagrade.preprocessing.quality_detector import DetectorBackbone, detector_thumbnail
from retinagrade.preprocessing.quality_features import FEATURE_NAMES, compute_quality_features

#: Fundus folders (positives) and how a user would send them; ``group`` joins folders that share patients.
FUNDUS_SETS: dict[str, str] = {
    "aptos2019-224": "APTOS",
    "eyepacs-eyeq-256": "EyePACS (equalised)",
    "eyepacs-256-graded": "EyePACS (equalised)",
    "eyepacs-768": "EyePACS (camera)",
    "raw-fundus-samples": "EyePACS (camera)",
    "mexico-512": "Mexico",
}
NEGATIVE_SETS: tuple[str, ...] = ("non-fundus-2", "non-fundus")
EYEQ_SET = "eyepacs-eyeq-256"
CAMERA_SET = "eyepacs-768"
#: ``non-fundus`` (scikit-image samples) has no ``kind``/``source`` columns of the same vocabulary: mapped by
#: file name onto the kinds of ``non-fundus-2``. ``retina.jpg`` is a real colour fundus photo (a positive);
#: ``microaneurysms.png`` is a tiny grayscale crop of one (neither: not a colour photo, not a negative kind).
SKIMAGE_KINDS: dict[str, str] = {
    "astronaut": "portrait",
    "brick": "texture",
    "camera": "portrait",
    "cell": "microscopy",
    "chelsea": "animal",
    "coffee": "round_object",
    "coins": "scene",
    "color": "chart",
    "grass": "texture",
    "hubble_deep_field": "astronomy",
    "ihc": "histology",
    "logo": "document",
    "moon": "astronomy",
    "motorcycle_left": "scene",
    "page": "document",
    "rocket": "scene",
    "retina": "fundus",
    "microaneurysms": "excluded",
}
#: Thumbnail side of the detector (pixels) and the number of augmented views per image.
DETECTOR_SIDE = 128
FUNDUS_AUG_VIEWS = 1
NEGATIVE_AUG_VIEWS = 8
SEED = 0


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image of a data folder."""

    dataset: str
    image: str
    label: int  # 1 fundus photo, 0 not a fundus photo, -1 excluded from the detector
    kind: str
    source: str
    quality: str
    patient: str


def read_records(data_root: Path, dataset: str) -> list[ImageRecord]:
    """The folder's ``labels.csv`` as records with a detector label, a kind and a source."""
    with (data_root / dataset / "labels.csv").open(newline="", encoding="utf-8") as fh:
        rows = [{k: (v or "").strip() for k, v in row.items()} for row in csv.DictReader(fh)]
    out = []
    for row in rows:
        image = row["image"]
        if dataset in FUNDUS_SETS:
            label, kind, source = 1, "fundus", dataset
        elif dataset == "non-fundus":
            kind = SKIMAGE_KINDS.get(Path(image).stem, "scene")
            label = {"fundus": 1, "excluded": -1}.get(kind, 0)
            source = "skimage-retina" if label == 1 else "pypi:scikit-image"
        else:
            label, kind, source = 0, row["kind"], row["source"]
        patient = row.get("patient") or row.get("split_group") or row.get("duplicate_group") or image
        out.append(ImageRecord(dataset, image, label, kind, source, row.get("quality", ""), f"{dataset}:{patient}"))
    return out


# --------------------------------------------------------------------------------------------------------
# Augmented views
# --------------------------------------------------------------------------------------------------------


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
    if decoded is None:
        return rgb
    return np.asarray(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB))


def _rescale(rgb: np.ndarray, longest: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = longest / max(h, w)
    if s >= 1.0:
        return rgb
    return cv2.resize(rgb, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA)


def _crop(rgb: np.ndarray, fy: float, fx: float, oy: float, ox: float) -> np.ndarray:
    """A crop of ``fy x fx`` of the frame, its centre moved by ``oy, ox`` of the free margin."""
    h, w = rgb.shape[:2]
    ch, cw = max(8, round(h * fy)), max(8, round(w * fx))
    y0 = round((h - ch) * (0.5 + 0.5 * oy))
    x0 = round((w - cw) * (0.5 + 0.5 * ox))
    return rgb[y0 : y0 + ch, x0 : x0 + cw]


def fundus_view(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fundus photo as another user could send it: still a fundus photo."""
    out = rgb
    if rng.random() < 0.5:  # crops that keep the disc: a tighter frame, the disc cut at the edges
        f = rng.uniform(0.8, 0.97)
        out = _crop(out, f * rng.uniform(0.9, 1.0), f, rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3))
    if rng.random() < 0.5:
        out = _rescale(out, rng.uniform(160, 480))
    if rng.random() < 0.3:  # exposure
        gamma = rng.uniform(0.7, 1.4)
        out = (255.0 * (out.astype(np.float32) / 255.0) ** gamma).astype(np.uint8)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.7:
        out = _jpeg(np.ascontiguousarray(out), int(rng.integers(40, 92)))
    return np.ascontiguousarray(out)


def negative_view(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A negative made harder: crops, rescales, fundus-like colour casts, a round black field stop."""
    out = rgb
    if rng.random() < 0.5:
        out = _crop(out, rng.uniform(0.4, 0.9), rng.uniform(0.4, 0.9), rng.uniform(-1, 1), rng.uniform(-1, 1))
    if rng.random() < 0.6:
        if rng.random() < 0.6:  # towards the orange-red of a retina
            gains = np.array([rng.uniform(1.0, 1.4), rng.uniform(0.45, 0.85), rng.uniform(0.15, 0.55)])
        else:
            gains = rng.uniform(0.6, 1.4, 3)
        out = np.clip(out.astype(np.float32) * gains[None, None, :], 0, 255).astype(np.uint8)
    if rng.random() < 0.4:  # a circular field of view on black, as a fundus camera (or a microscope) shows
        h, w = out.shape[:2]
        mask = np.zeros((h, w), np.uint8)
        r = rng.uniform(0.42, 0.5) * min(h, w)
        cv2.ellipse(mask, (w // 2, h // 2), (round(r * rng.uniform(1.0, 1.15)), round(r)), 0, 0, 360, 1, -1)
        out = out * mask[:, :, None]
    if rng.random() < 0.4:
        out = _rescale(out, rng.uniform(96, 400))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = _jpeg(np.ascontiguousarray(out), int(rng.integers(40, 92)))
    return np.ascontiguousarray(out)


def aptos_like(decoded: DecodedImage) -> bytes:
    """A camera photo as the APTOS derivative was made: the whole frame squashed to 224 x 224, JPEG q95."""
    small = cv2.resize(decoded.rgb, (224, 224), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return bytes(buf.tobytes())


# --------------------------------------------------------------------------------------------------------
# One image, in a worker process
# --------------------------------------------------------------------------------------------------------

_BACKBONE: DetectorBackbone | None = None


def _backbone(path: str) -> DetectorBackbone:
    global _BACKBONE
    if _BACKBONE is None:
        _BACKBONE = DetectorBackbone(path, threads=1)
    return _BACKBONE


def _quality(data: bytes, config: PreprocessConfig) -> tuple[DecodedImage, list[float]]:
    decoded = decode_image(data, min_side=config.decode_min_side)
    features = compute_quality_features(decoded, prepare_fundus(decoded, config))
    return decoded, [features[name] for name in FEATURE_NAMES]


def measure_one(job: tuple[str, int, int, str, dict[str, Any], bool]) -> dict[str, Any]:
    """Quality features and detector features of one image and its views (a picklable worker job)."""
    path, label, seed, detector_path, config_dict, small_copy = job
    config = PreprocessConfig.from_dict(config_dict)
    data = Path(path).read_bytes()
    decoded, quality = _quality(data, config)
    out: dict[str, Any] = {"quality": quality}
    if small_copy:
        out["quality_224"] = _quality(aptos_like(decoded), config)[1]
    rng = np.random.default_rng(seed)
    views = [decoded.rgb]
    make: Callable[[np.ndarray, np.random.Generator], np.ndarray] = fundus_view if label == 1 else negative_view
    n_aug = FUNDUS_AUG_VIEWS if label == 1 else NEGATIVE_AUG_VIEWS if label == 0 else 0
    views += [make(decoded.rgb, rng) for _ in range(n_aug)]
    thumbs = [detector_thumbnail(v, DETECTOR_SIDE) for v in views]
    out["detector"] = _backbone(detector_path).features(thumbs)
    return out


# --------------------------------------------------------------------------------------------------------
# A folder, cached
# --------------------------------------------------------------------------------------------------------


@dataclass
class MeasuredSet:
    """Everything measured on one folder."""

    records: list[ImageRecord]
    quality: np.ndarray  # N x len(FEATURE_NAMES)
    quality_224: np.ndarray  # M x len(FEATURE_NAMES), rows of ``small_index``
    small_index: np.ndarray  # M, indices into records
    view_image: np.ndarray  # V, index into records of each detector view
    view_aug: np.ndarray  # V, 0 = the image as sent, k = k-th augmented view
    detector: np.ndarray  # V x D backbone features


def code_key(config: PreprocessConfig, detector_file: Path) -> str:
    """Hash of the preprocessing config, the feature code, this module and the detector file."""
    from retinagrade.preprocessing import decode, fundus, pipeline, quality_detector, quality_features

    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for module in (decode, fundus, pipeline, quality_features, quality_detector):
        digest.update(Path(str(module.__file__)).read_bytes())
    digest.update(Path(__file__).read_bytes())
    digest.update(detector_file.read_bytes())
    return digest.hexdigest()[:16]


def measure_set(
    data_root: Path,
    dataset: str,
    detector_file: Path,
    config: PreprocessConfig,
    cache_dir: Path | None,
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
) -> MeasuredSet:
    """Measure (or load from the cache) every image of ``dataset``."""
    records = read_records(data_root, dataset)
    key = code_key(config, detector_file)
    cache_file = cache_dir / f"{dataset}-{key}.npz" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        with np.load(cache_file) as z:
            if list(z["images"]) == [r.image for r in records]:
                return MeasuredSet(
                    records,
                    z["quality"],
                    z["quality_224"],
                    z["small_index"],
                    z["view_image"],
                    z["view_aug"],
                    z["detector"],
                )
    base = int(hashlib.sha256(dataset.encode()).hexdigest()[:8], 16)
    jobs = [
        (
            str(data_root / dataset / r.image),
            r.label,
            SEED + base + i,
            str(detector_file),
            config.to_dict(),
            dataset == CAMERA_SET,
        )
        for i, r in enumerate(records)
    ]
    if progress is not None:
        progress(f"measuring {dataset}: {len(jobs)} images")
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(measure_one, jobs, chunksize=16))
    else:
        results = [measure_one(job) for job in jobs]
    small = [i for i, r in enumerate(results) if "quality_224" in r]
    view_image = np.concatenate([np.full(len(r["detector"]), i) for i, r in enumerate(results)])
    view_aug = np.concatenate([np.arange(len(r["detector"])) for r in results])
    measured = MeasuredSet(
        records,
        np.asarray([r["quality"] for r in results], np.float64),
        np.asarray([results[i]["quality_224"] for i in small], np.float64).reshape(len(small), len(FEATURE_NAMES)),
        np.asarray(small, np.int64),
        view_image.astype(np.int64),
        view_aug.astype(np.int64),
        np.concatenate([r["detector"] for r in results]).astype(np.float32),
    )
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            cache_file,
            images=np.asarray([r.image for r in records]),
            quality=measured.quality,
            quality_224=measured.quality_224,
            small_index=measured.small_index,
            view_image=measured.view_image,
            view_aug=measured.view_aug,
            detector=measured.detector,
        )
    return measured


def measure_all(
    data_root: Path,
    detector_file: Path,
    config: PreprocessConfig,
    cache_dir: Path | None,
    sets: Sequence[str] | None = None,
    workers: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict[str, MeasuredSet]:
    """Every folder that exists under ``data_root`` (a missing one is left out, never faked)."""
    names = sets if sets is not None else (*FUNDUS_SETS, *NEGATIVE_SETS)
    return {
        name: measure_set(data_root, name, detector_file, config, cache_dir, workers, progress)
        for name in names
        if (data_root / name / "labels.csv").is_file()
    }


# --------------------------------------------------------------------------------------------------------
# The detector backbone file
# --------------------------------------------------------------------------------------------------------

#: Stages (0-based ``blocks`` indices) whose globally pooled outputs form the detector features, then the
#: pooled 1x1 head convolution: texture-level and object-level evidence together.
POOLED_STAGES: tuple[int, ...] = (3, 4, 5, 6)


def export_detector_backbone(path: Path, side: int = DETECTOR_SIDE) -> None:
    """Write the frozen ImageNet EfficientNet-Lite0 feature extractor to ONNX (needs the [train] extra)."""
    import torch
    from torch import nn

    from retinagrade.training.model import create_backbone

    backbone = create_backbone("tf_efficientnet_lite0", pretrained=True).eval()

    class PooledFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_stem, self.bn1, self.blocks = backbone.conv_stem, backbone.bn1, backbone.blocks
            self.conv_head, self.bn2 = backbone.conv_head, backbone.bn2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.bn1(self.conv_stem(x))
            pooled = []
            for i, block in enumerate(self.blocks):
                x = block(x)
                if i in POOLED_STAGES:
                    pooled.append(x.mean(dim=(2, 3)))
            pooled.append(self.bn2(self.conv_head(x)).mean(dim=(2, 3)))
            return torch.cat(pooled, dim=1)

    module = PooledFeatures().eval()
    dummy = torch.zeros(1, 3, side, side)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=["input"],
            output_names=["features"],
            dynamic_axes={"input": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
