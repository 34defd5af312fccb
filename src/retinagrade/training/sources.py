"""Prepare the fetched training sources: copy exactly the named photos and write labels ``read_labels`` reads.

``../shared/data/sources/README.md`` names three public repositories and, within them, exactly which photos may
be used for training. :func:`prepare_source` takes a checkout of one of them (at the named commit, checked when
the checkout has its ``.git``), copies the named photos into ``<out>/<source>/images/`` and writes
``<out>/<source>/labels.csv`` in the ``coarse-dr`` or ``plain`` layout of :mod:`retinagrade.training.data`, plus
``provenance.json`` (repository, commit, counts, every photo left out and why). Nothing here is needed to
serve, test or train on ``../shared/data`` alone: a training config lists the prepared label files as
``optional_labels``.

Sources:

* ``mexico-dme``: the Mexican photos that are *not* in ``../shared/data/mexico-512`` (matched by name and by
  md5), each with its DME label; the DR label is ``0`` / ``NPDR`` / ``PDR`` as in mexico-512 and ``unknown``
  (no DR supervision) for ``-``. Split groups join patients that share an md5-identical photo and reuse
  mexico-512's ``split_group`` for its patients, so a mexico-512 hold-out also holds out their other photos.
* ``odir-400``: ODIR-5K photos; grades 0-2 exact, ``dr_unspecified`` is the grade range 1-4 (``dr_coarse``
  ``DR``), and ``dr_keyword_absent`` rows (another disease, DR status not stated) are left out: they carry no
  DR or DME supervision, and calling them grade 0 would teach the model that a cataract or glaucoma eye has no
  DR when the reading centre only named its most salient disease.
* ``eyepacs-400``: EyePACS photos with their Kaggle grades, grouped ``eyepacs:<patient>`` like the other
  EyePACS folders (the same patients are in the 256 px folders).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class DataSourceError(ValueError):
    """A fetched source cannot be prepared: another commit, a missing label file or folder, an unknown name.

    A training-time (CLI) error, never an HTTP one, so it stays outside the service's error hierarchy; it carries
    a stable code all the same.
    """

    code = "data_source_invalid"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ExternalSource:
    """A fetched source: where its photos come from and where its labels are.

    Attributes:
        repository: GitHub ``owner/name``.
        commit: the commit ``../shared/data/sources/README.md`` names (a prefix of the full hash).
        labels_file: the label CSV in ``../shared/data/sources`` that lists the usable photos, or None when
            the repository's own label file is used.
    """

    name: str
    repository: str
    commit: str
    labels_file: str | None
    what: str


EXTERNAL_SOURCES: dict[str, ExternalSource] = {
    s.name: s
    for s in (
        ExternalSource(
            "mexico-dme",
            "Traslational-Visual-Health-Laboratory/OCT-AND-EYE-FUNDUS-DATASET",
            "0cb190a",
            None,
            "Mexican fundus photos not in mexico-512, with DME labels (DR mostly unknown)",
        ),
        ExternalSource(
            "odir-400",
            "aliiakbarkhan/eye-disease-detection-DL",
            "370818d",
            "odir-400-labels.csv",
            "ODIR-5K photos (Chinese hospitals), 400 px, natural colour",
        ),
        ExternalSource(
            "eyepacs-400",
            "aliiakbarkhan/eye-disease-detection-DL",
            "370818d",
            "eyepacs-400-labels.csv",
            "EyePACS (Kaggle 2015) photos, 400 px, natural colour",
        ),
    )
}

#: A photo whose brightest channel stays at or below this (99th percentile, of 255) holds no usable fundus.
ALMOST_BLACK_LEVEL = 12

_MEXICO_NAME = re.compile(r"^(?P<patient>\d+)_(?P<eye>OD|OI)_[fo]_(?P<shot>\d+)$", re.IGNORECASE)
_MEXICO_DR = {"0": ("0", "noDR"), "NPDR": ("", "NPDR"), "PDR": ("4", "PDR"), "-": ("", "unknown"), "": ("", "unknown")}


@dataclass
class PrepareReport:
    """What :func:`prepare_source` wrote and what it left out (reason -> count, with a few examples)."""

    source: str
    repository: str
    commit: str | None
    commit_checked: bool
    images: int = 0
    groups: int = 0
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def drop(self, reason: str, name: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        examples = self.dropped_examples.setdefault(reason, [])
        if len(examples) < 5:
            examples.append(name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkout_commit(repo: Path, expected: str) -> tuple[str | None, bool]:
    """(HEAD commit, checked) of a checkout; refuses a checkout at another commit.

    A copy without ``.git`` cannot be checked: (None, False), and the caller says so. The photos' md5 sums
    (where the label files give them) still guard what is copied.
    """
    if not (repo / ".git").exists():
        return None, False
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise DataSourceError(f"{repo}: cannot read the checkout's commit ({type(exc).__name__})") from exc
    if not head.startswith(expected):
        raise DataSourceError(f"{repo} is at commit {head[:12]}, the sources README names {expected}")
    return head, True


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataSourceError(f"label file {path} not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in csv.DictReader(fh)]


def _write_folder(staging: Path, target: Path) -> None:
    """Replace ``target`` by the fully written ``staging`` folder, so a stopped run never leaves half a source."""
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def _write_labels(path: Path, columns: list[str], rows: Iterable[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def almost_black(path: Path) -> bool:
    """Whether the photo is (nearly) black: a failed exposure with no fundus to learn from."""
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", (256, 256))
        rgb = np.asarray(img.convert("RGB"))
    return float(np.percentile(rgb.max(axis=2), 99)) <= ALMOST_BLACK_LEVEL


def _counts(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


# --------------------------------------------------------------------------------------------------------
# Mexico
# --------------------------------------------------------------------------------------------------------


class _Groups:
    """Union-find over patient ids: patients that share an identical photo become one split group."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _mexico_rows(repo: Path, report: PrepareReport) -> list[tuple[dict[str, str], re.Match[str], Path]]:
    """The rows of ``EYE FUNDUS.csv`` with a fundus-photo name, a photo in the checkout and labels understood."""
    photos = {p.stem: p for p in (repo / "EYE FUNDUS").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")}
    parsed = []
    for row in _read_csv(repo / "EYE FUNDUS.csv"):
        name = row.get("Name", "")
        match = _MEXICO_NAME.match(name)
        if match is None:
            report.drop("name not <patient>_<OD|OI>_f_<shot>", name)
        elif name not in photos:
            report.drop("listed in EYE FUNDUS.csv but missing from the checkout", name)
        elif row.get("DR", "").upper() not in _MEXICO_DR or row.get("DME") not in ("0", "1"):
            report.drop("DR or DME label not understood", name)
        else:
            parsed.append((row, match, photos[name]))
    return parsed


def _mexico_groups(
    patient_of: dict[str, str], md5: dict[str, str], shared_group: dict[str, str], report: PrepareReport
) -> dict[str, str]:
    """Split group per photo name: patients sharing an md5-identical photo are joined, and a group holding
    mexico-512 photos takes their ``split_group`` (so a mexico-512 hold-out also holds its patients' other photos).
    """
    groups = _Groups()
    by_md5: dict[str, list[str]] = defaultdict(list)
    for name, patient in patient_of.items():
        groups.find(patient)
        by_md5[md5[name]].append(name)
        if name in shared_group:
            groups.union(patient, shared_group[name])
    for names in by_md5.values():
        for other in names[1:]:
            groups.union(patient_of[names[0]], patient_of[other])
    component_shared: dict[str, set[str]] = defaultdict(set)
    for name, group in shared_group.items():
        if name in patient_of:
            component_shared[groups.find(patient_of[name])].add(group)
    for joined in component_shared.values():
        if len(joined) > 1:
            report.notes.append(f"mexico-512 split groups {sorted(joined)} share photos with one another: joined")
    result = {}
    for name, patient in patient_of.items():
        component = groups.find(patient)
        shared = component_shared.get(component)
        result[name] = min(shared) if shared else component
    return result


def _prepare_mexico(repo: Path, staging: Path, report: PrepareReport, mexico_512: Path) -> list[dict[str, str]]:
    parsed = _mexico_rows(repo, report)
    shared_group = {Path(r["image"]).stem: r["split_group"] or r["patient"] for r in _read_csv(mexico_512)}
    md5 = {row["Name"]: md5_file(path) for row, _, path in parsed}
    patient_of = {row["Name"]: f"M{match['patient']}" for row, match, _ in parsed}
    group_of = _mexico_groups(patient_of, md5, shared_group, report)
    shared_md5 = {md5[n] for n in shared_group if n in md5}
    missing_shared = sorted(set(shared_group) - set(md5))
    if missing_shared:
        report.notes.append(f"{len(missing_shared)} mexico-512 photos not found in the checkout: {missing_shared[:5]}")
    out_rows: list[dict[str, str]] = []
    kept_md5: dict[str, dict[str, str]] = {}
    for row, match, path in sorted(parsed, key=lambda item: item[0]["Name"]):
        name = row["Name"]
        reason = (
            "already in mexico-512"
            if name in shared_group
            else "md5-identical to a mexico-512 photo"
            if md5[name] in shared_md5
            else "md5-identical to a photo already kept"
            if md5[name] in kept_md5
            else f"almost black (99th percentile of the brightest channel <= {ALMOST_BLACK_LEVEL})"
            if almost_black(path)
            else None
        )
        if reason is not None:
            kept = kept_md5.get(md5[name])
            if kept is not None and kept["dme"] != row["DME"]:
                report.notes.append(f"{name} is md5-identical to {Path(kept['image']).stem} with another DME label")
            report.drop(reason, name)
            continue
        grade, coarse = _MEXICO_DR[row["DR"].upper()]
        out = {
            "image": f"images/{path.name}",
            "grade": grade,
            "dr_coarse": coarse,
            "dme": row["DME"],
            "patient": patient_of[name],
            "eye": "right" if match["eye"].upper() == "OD" else "left",
            "split_group": group_of[name],
            "md5": md5[name],
            "origin": path.relative_to(repo).as_posix(),
        }
        kept_md5[md5[name]] = out
        shutil.copyfile(path, staging / out["image"])
        out_rows.append(out)
    report.labels = {
        "dme": _counts(r["dme"] for r in out_rows),
        "dr_coarse": _counts(r["dr_coarse"] for r in out_rows),
    }
    return out_rows


# --------------------------------------------------------------------------------------------------------
# ODIR and EyePACS at 400 px (same repository, label files in ../shared/data/sources)
# --------------------------------------------------------------------------------------------------------


def _copy_listed(
    repo: Path, staging: Path, report: PrepareReport, rows: list[dict[str, str]]
) -> list[tuple[dict[str, str], str]]:
    """Copy each listed photo whose md5 matches; (row, image path in the prepared folder) of those copied."""
    copied: list[tuple[dict[str, str], str]] = []
    seen: set[str] = set()
    for row in rows:
        source = repo / row["image"]
        relative = Path(row["image"])
        # ``dataset/<class>/<file>``: keep the class folder, so equal file names in two folders stay distinct.
        target = Path("images", *relative.parts[1:]) if len(relative.parts) > 2 else Path("images", relative.name)
        if not source.is_file():
            report.drop("listed but missing from the checkout", row["image"])
            continue
        digest = md5_file(source)
        if row.get("md5") and digest != row["md5"]:
            report.drop("md5 differs from the label file", row["image"])
            continue
        if digest in seen:
            report.drop("md5-identical to a photo already kept", row["image"])
            continue
        seen.add(digest)
        (staging / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, staging / target)
        copied.append((row, target.as_posix()))
    return copied


def _prepare_odir(repo: Path, staging: Path, report: PrepareReport, labels: Path) -> list[dict[str, str]]:
    rows = []
    for row in _read_csv(labels):
        if row.get("dr_keyword_absent") == "1":
            report.drop("dr_keyword_absent: another disease, DR status not stated", row["image"])
        elif not row.get("grade") and row.get("dr_unspecified") != "1":
            report.drop("no grade and not dr_unspecified", row["image"])
        else:
            rows.append(row)
    out_rows = []
    for row, image in _copy_listed(repo, staging, report, rows):
        grade = row["grade"]
        out_rows.append(
            {
                "image": image,
                "grade": grade,
                "dr_coarse": "DR" if not grade else "noDR" if grade == "0" else "NPDR",
                "dme": "",
                "patient": row["patient"],
                "eye": row.get("eye", ""),
                "split_group": row["patient"],
                "md5": row["md5"],
                "origin": row["image"],
            }
        )
    report.labels = {
        "grade": _counts(r["grade"] or "1-4 (dr_unspecified)" for r in out_rows),
        "dr_coarse": _counts(r["dr_coarse"] for r in out_rows),
    }
    return out_rows


def _prepare_eyepacs(repo: Path, staging: Path, report: PrepareReport, labels: Path) -> list[dict[str, str]]:
    rows = []
    for row in _read_csv(labels):
        if row.get("grade", "") not in {"0", "1", "2", "3", "4"} or not row.get("patient"):
            report.drop("grade not 0-4 or no patient", row.get("image", ""))
        else:
            rows.append(row)
    out_rows = [
        {
            "image": image,
            "grade": row["grade"],
            "patient": row["patient"],
            "eye": row.get("eye", ""),
            "md5": row["md5"],
            "origin": row["image"],
        }
        for row, image in _copy_listed(repo, staging, report, rows)
    ]
    report.labels = {"grade": _counts(r["grade"] for r in out_rows)}
    return out_rows


_COARSE_COLUMNS = ["image", "grade", "dr_coarse", "dme", "patient", "eye", "split_group", "md5", "origin"]
_PLAIN_COLUMNS = ["image", "grade", "patient", "eye", "md5", "origin"]


def prepare_source(
    name: str,
    repo: Path,
    out: Path,
    labels: Path | None = None,
    mexico_512: Path | None = None,
) -> PrepareReport:
    """Prepare source ``name`` from the checkout ``repo`` into ``out/<name>`` (replacing an earlier one).

    Args:
        labels: the label CSV of ``odir-400`` / ``eyepacs-400`` (default ``../shared/data/sources/<file>``).
        mexico_512: ``mexico-512/labels.csv`` (default ``../shared/data/mexico-512/labels.csv``); its photos are
            left out of ``mexico-dme`` and its split groups reused.

    Raises:
        DataSourceError: unknown source, checkout at another commit, or a label file or folder missing.
    """
    if name not in EXTERNAL_SOURCES:
        raise DataSourceError(f"unknown source {name!r}; known: {', '.join(EXTERNAL_SOURCES)}")
    source = EXTERNAL_SOURCES[name]
    if not repo.is_dir():
        raise DataSourceError(f"checkout {repo} is not a folder")
    commit, checked = checkout_commit(repo, source.commit)
    report = PrepareReport(name, source.repository, commit, checked)
    if not checked:
        report.notes.append(f"{repo} has no .git: its commit could not be checked (expected {source.commit})")
    shared_sources = Path("../shared/data/sources")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".{name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "images").mkdir(parents=True)
    try:
        if name == "mexico-dme":
            if not (repo / "EYE FUNDUS.csv").is_file():
                raise DataSourceError(f"{repo} has no 'EYE FUNDUS.csv': not a checkout of {source.repository}")
            reference = mexico_512 or Path("../shared/data/mexico-512/labels.csv")
            rows = _prepare_mexico(repo, staging, report, reference)
            columns = _COARSE_COLUMNS
        else:
            assert source.labels_file is not None
            label_file = labels or shared_sources / source.labels_file
            prepare = _prepare_odir if name == "odir-400" else _prepare_eyepacs
            rows = prepare(repo, staging, report, label_file)
            columns = _COARSE_COLUMNS if name == "odir-400" else _PLAIN_COLUMNS
        if not rows:
            raise DataSourceError(f"no photo of {name} could be prepared from {repo}: {report.dropped}")
        _write_labels(staging / "labels.csv", columns, rows)
        report.images = len(rows)
        report.groups = len({r.get("split_group") or r["patient"] for r in rows})
        (staging / "provenance.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        _write_folder(staging, out / name)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("%s: %d images, %d groups, dropped %s", name, report.images, report.groups, report.dropped)
    return report
