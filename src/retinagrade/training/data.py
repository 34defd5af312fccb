"""Read graded fundus datasets in the layouts people have, and split them without leakage.

A label file's layout is detected from its CSV header by walking :data:`LAYOUTS` in order; supporting a new
dataset means writing one reader function and adding one :class:`LabelLayout` row. Known layouts:

* ``coarse-dr`` (e.g. ``mexico-512``, and the prepared ``mexico-dme`` and ``odir-400``):
  ``image,grade,dr_coarse,split_group``; ``grade`` is exact where given; when it is empty ``dr_coarse`` says what
  is known: ``NPDR`` is the grade range 1-3, ``DR`` (DR of unknown stage) 1-4 and ``unknown`` 0-4, which carries
  no DR supervision at all (trained with a partial-label loss, excluded from referable metrics).
* ``plain`` (retinagrade): ``image,grade`` (+ optional ``patient``, ``duplicate_group``, ``conflicting_grades``);
  ``image`` is a path relative to the CSV's folder.

Any layout may carry a ``dme`` column (diabetic macular oedema, 0/1; empty = unknown): :attr:`Sample.dme`.
* ``eyepacs-kaggle``: ``trainLabels.csv`` with ``image,level``; ``image`` is a stem such as ``10_left`` looked
  up in the images folder with any image suffix; the patient is the part before ``_left``/``_right``.
* ``aptos-kaggle``: APTOS 2019 ``train.csv`` with ``id_code,diagnosis``; images are ``<id_code>.png``/``.jpg``.

Groups (the unit a split never cuts) are namespaced by *dataset family*, the source name up to its first ``-``
(``eyepacs-768``, ``eyepacs-eyeq-256`` and ``eyepacs-256-graded`` are all family ``eyepacs``): the same EyePACS
patient, and sometimes the same photo at two resolutions, lives in several folders, and must fall on one side.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retinagrade.constants import NUM_GRADES

#: Grade stored for a sample whose exact grade is unknown (see :attr:`Sample.grade_range`).
UNKNOWN_GRADE = -1


@dataclass(frozen=True)
class Sample:
    """One graded image.

    Attributes:
        path: the image file.
        grade: ICDR grade 0-4, or :data:`UNKNOWN_GRADE` when only ``grade_range`` is known.
        group: images sharing a group (same patient, duplicate photos) never straddle a split.
        source: dataset name (folder), for per-set metrics and leave-one-source-out.
        grade_range: inclusive (low, high) grades the label allows; ``(g, g)`` for an exact grade.
        dme: diabetic macular oedema (True/False), or None where the source does not say.
    """

    path: Path
    grade: int
    group: str
    source: str
    grade_range: tuple[int, int] | None = None
    dme: bool | None = None

    @property
    def grade_bounds(self) -> tuple[int, int]:
        """(low, high) allowed grades; equal for an exactly graded image."""
        if self.grade_range is not None:
            return self.grade_range
        return (self.grade, self.grade)

    @property
    def exact(self) -> bool:
        lo, hi = self.grade_bounds
        return lo == hi


def family(source: str) -> str:
    """Dataset family of a source name: folders of one dataset at other resolutions share it."""
    return source.split("-", 1)[0]


def _find_image(folder: Path, stem: str) -> Path:
    for suffix in (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp", ".webp"):
        candidate = folder / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no image named {stem}.* in {folder}")


def _image_folder(root: Path, images_dir: Path | None) -> Path:
    if images_dir is not None:
        return images_dir
    for name in ("images", "train_images", "train"):
        if (root / name).is_dir():
            return root / name
    return root


Reader = Callable[[list[dict[str, str]], Path, str, "Path | None"], list[Sample]]


@dataclass(frozen=True)
class LabelLayout:
    """One label-file layout: the header columns that identify it and the function that reads its rows."""

    name: str
    columns: frozenset[str]
    read: Reader


def _dme(row: dict[str, str]) -> bool | None:
    value = (row.get("dme") or "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{row.get('image')}: dme must be 0, 1 or empty, got {value!r}")
    return None if value == "" else value == "1"


#: Grade range of a coarse label whose exact grade is empty (``dr_coarse``, upper-cased).
COARSE_RANGES = {"NPDR": (1, 3), "DR": (1, NUM_GRADES - 1), "UNKNOWN": (0, NUM_GRADES - 1)}


def _read_coarse(rows: list[dict[str, str]], root: Path, source: str, images_dir: Path | None) -> list[Sample]:
    base = images_dir if images_dir is not None else root
    ns = family(source)
    samples = []
    for row in rows:
        group = f"{ns}:{row.get('split_group') or row.get('patient') or row['image']}"
        coarse = row["dr_coarse"].strip().upper()
        dme = _dme(row)
        if row["grade"].strip():
            grade = int(row["grade"])
            samples.append(Sample(base / row["image"], grade, group, source, dme=dme))
        elif coarse in COARSE_RANGES:
            bounds = COARSE_RANGES[coarse]
            samples.append(Sample(base / row["image"], UNKNOWN_GRADE, group, source, grade_range=bounds, dme=dme))
        else:
            raise ValueError(
                f"{row['image']}: empty grade with dr_coarse {row['dr_coarse']!r} "
                f"(only {', '.join(COARSE_RANGES)} may be)"
            )
    return samples


def _read_plain(rows: list[dict[str, str]], root: Path, source: str, images_dir: Path | None) -> list[Sample]:
    base = images_dir if images_dir is not None else root
    ns = family(source)
    samples = []
    for row in rows:
        patient = row.get("patient")
        group = f"{ns}:{patient}" if patient else f"{source}:{row.get('duplicate_group') or row['image']}"
        samples.append(Sample(base / row["image"], int(row["grade"]), group, source, dme=_dme(row)))
    return _resolve_duplicates(samples, rows)


def _read_eyepacs_kaggle(rows: list[dict[str, str]], root: Path, source: str, images_dir: Path | None) -> list[Sample]:
    folder = _image_folder(root, images_dir)
    ns = family(source)
    return [
        Sample(_find_image(folder, row["image"]), int(row["level"]), f"{ns}:{row['image'].rsplit('_', 1)[0]}", source)
        for row in rows
    ]


def _read_aptos_kaggle(rows: list[dict[str, str]], root: Path, source: str, images_dir: Path | None) -> list[Sample]:
    folder = _image_folder(root, images_dir)
    return [
        Sample(_find_image(folder, row["id_code"]), int(row["diagnosis"]), f"{source}:{row['id_code']}", source)
        for row in rows
    ]


#: Detected in order: the first layout whose columns are all in the header wins.
LAYOUTS: tuple[LabelLayout, ...] = (
    LabelLayout("coarse-dr", frozenset({"image", "grade", "dr_coarse"}), _read_coarse),
    LabelLayout("plain", frozenset({"image", "grade"}), _read_plain),
    LabelLayout("eyepacs-kaggle", frozenset({"image", "level"}), _read_eyepacs_kaggle),
    LabelLayout("aptos-kaggle", frozenset({"id_code", "diagnosis"}), _read_aptos_kaggle),
)


def read_labels(csv_path: str | Path, images_dir: str | Path | None = None, source: str | None = None) -> list[Sample]:
    """Read a label file in any layout of :data:`LAYOUTS`.

    Args:
        csv_path: the label CSV.
        images_dir: where the images are; defaults to the CSV's folder (plain layouts) or its ``images``,
            ``train_images`` or ``train`` sub-folder (EyePACS, APTOS layouts).
        source: name used in reports and leave-one-source-out; defaults to the CSV's folder name.
    """
    csv_path = Path(csv_path)
    root = csv_path.parent
    source = source or root.name
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    columns = set(rows[0])
    layout = next((lay for lay in LAYOUTS if lay.columns <= columns), None)
    if layout is None:
        expected = " or ".join(",".join(sorted(lay.columns)) for lay in LAYOUTS)
        raise ValueError(f"{csv_path}: unknown label layout {sorted(columns)}; expected {expected}")
    samples = layout.read(rows, root, source, Path(images_dir) if images_dir is not None else None)
    bad = [s for s in samples if not all(0 <= g < NUM_GRADES for g in s.grade_bounds)]
    if bad:
        raise ValueError(f"{csv_path}: grade outside 0-{NUM_GRADES - 1} for {bad[0].path.name}")
    return samples


def read_sources(label_files: Sequence[str | Path]) -> list[Sample]:
    """All samples of several label files, in the order given (the order caches are keyed by)."""
    samples: list[Sample] = []
    seen: set[str] = set()
    for path in label_files:
        part = read_labels(path)
        names = {s.source for s in part}
        if names & seen:
            raise ValueError(f"{path}: source {sorted(names & seen)} is already read; sources must be distinct")
        seen |= names
        samples.extend(part)
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
    for sample, row in zip(samples, rows, strict=True):
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
        keep.append(Sample(sample.path, counts[0][0], sample.group, sample.source, dme=sample.dme))
    return keep


def stratum(samples: Sequence[Sample]) -> np.ndarray:
    """Stratification label per sample: the grade, or ``NUM_GRADES + low`` for a coarse (range) label."""
    return np.array([s.grade if s.exact else NUM_GRADES + s.grade_bounds[0] for s in samples])


def make_folds(samples: list[Sample], n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index per sample: stratified by grade, grouped so that a patient or duplicate group stays together."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = np.array([s.group for s in samples])
    folds = np.full(len(samples), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, test_idx) in enumerate(splitter.split(np.zeros(len(samples)), stratum(samples), groups)):
        folds[test_idx] = k
    return folds


def leave_source_out(samples: Sequence[Sample], source: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: test is every image of ``source``; train excludes it and every image of a group
    that appears in it (the same patient or photo in another folder of the same family).
    """
    sources = np.array([s.source for s in samples])
    if source not in set(sources):
        raise ValueError(f"no images from source {source!r}; sources are {sorted(set(sources))}")
    test = np.flatnonzero(sources == source)
    held_groups = {samples[int(i)].group for i in test}
    train = np.array([i for i, s in enumerate(samples) if s.source != source and s.group not in held_groups], int)
    return train, test
