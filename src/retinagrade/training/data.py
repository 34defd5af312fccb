"""Read graded fundus datasets in the layouts people have, and split them without leakage.

Accepted label files (detected from the CSV header):

* retinagrade / plain: ``image,grade`` (+ optional ``patient``, ``duplicate_group``, ``conflicting_grades``);
  ``image`` is a path relative to the CSV's folder.
* EyePACS Kaggle ``trainLabels.csv``: ``image,level``; ``image`` is a file stem such as ``10_left`` looked up
  in the images folder with any image suffix; the patient is the part before ``_left``/``_right``.
* APTOS 2019 ``train.csv``: ``id_code,diagnosis``; images are ``<id_code>.png`` (or ``.jpg``).
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retinagrade.constants import NUM_GRADES


@dataclass(frozen=True)
class Sample:
    """One graded image.

    Attributes:
        path: the image file.
        grade: ICDR grade 0-4.
        group: images sharing a group (same patient, duplicate photos) never straddle a split.
        source: dataset name, for per-set metrics.
    """

    path: Path
    grade: int
    group: str
    source: str


def _find_image(folder: Path, stem: str) -> Path:
    for suffix in (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp", ".webp"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no image named {stem}.* in {folder}")


def read_labels(csv_path: str | Path, images_dir: str | Path | None = None, source: str | None = None) -> list[Sample]:
    """Read a label file in any supported layout.

    Args:
        csv_path: the label CSV.
        images_dir: where the images are; defaults to the CSV's folder (plain layout) or its ``images``,
            ``train_images`` or ``train`` sub-folder (EyePACS, APTOS layouts).
        source: name used in reports; defaults to the CSV's folder name.
    """
    csv_path = Path(csv_path)
    root = csv_path.parent
    source = source or root.name
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    columns = set(rows[0])

    def default_dir() -> Path:
        if images_dir is not None:
            return Path(images_dir)
        for name in ("images", "train_images", "train"):
            if (root / name).is_dir():
                return root / name
        return root

    samples: list[Sample] = []
    if {"image", "grade"} <= columns:
        base = Path(images_dir) if images_dir is not None else root
        for row in rows:
            group = row.get("patient") or row.get("duplicate_group") or ""
            samples.append(Sample(base / row["image"], int(row["grade"]), f"{source}:{group or row['image']}", source))
        samples = _resolve_duplicates(samples, rows)
    elif {"image", "level"} <= columns:
        folder = default_dir()
        for row in rows:
            patient = row["image"].rsplit("_", 1)[0]
            samples.append(Sample(_find_image(folder, row["image"]), int(row["level"]), f"{source}:{patient}", source))
    elif {"id_code", "diagnosis"} <= columns:
        folder = default_dir()
        for row in rows:
            samples.append(
                Sample(_find_image(folder, row["id_code"]), int(row["diagnosis"]), f"{source}:{row['id_code']}", source)
            )
    else:
        raise ValueError(
            f"{csv_path}: unknown label layout {sorted(columns)}; expected image,grade or image,level "
            "or id_code,diagnosis"
        )
    bad = [s for s in samples if not 0 <= s.grade < NUM_GRADES]
    if bad:
        raise ValueError(f"{csv_path}: grade outside 0-{NUM_GRADES - 1} for {bad[0].path.name}")
    return samples


def _resolve_duplicates(samples: list[Sample], rows: list[dict[str, str]]) -> list[Sample]:
    """Keep one image per duplicate group, with the group's majority grade; drop groups whose grades tie.

    Byte-identical or near-identical photos would otherwise count twice in training and in metrics, and a
    tie (one copy graded 0, the other 2) is label noise that no model can fit.
    """
    if "duplicate_group" not in rows[0]:
        return samples
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row.get("duplicate_group"):
            by_group[row["duplicate_group"]].append(i)
    keep: list[Sample] = []
    seen: set[str] = set()
    for i, (sample, row) in enumerate(zip(samples, rows, strict=True)):
        group = row.get("duplicate_group")
        if not group:
            keep.append(sample)
            continue
        if group in seen:
            continue
        seen.add(group)
        counts = Counter(samples[j].grade for j in by_group[group]).most_common()
        if len(counts) > 1 and counts[0][1] == counts[1][1]:
            continue
        first = by_group[group][0]
        assert first == i
        keep.append(Sample(sample.path, counts[0][0], sample.group, sample.source))
    return keep


def make_folds(samples: list[Sample], n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index per sample: stratified by grade, grouped so that a patient or duplicate group stays together."""
    from sklearn.model_selection import StratifiedGroupKFold

    grades = np.array([s.grade for s in samples])
    groups = np.array([s.group for s in samples])
    folds = np.full(len(samples), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, test_idx) in enumerate(splitter.split(np.zeros(len(samples)), grades, groups)):
        folds[test_idx] = k
    return folds
