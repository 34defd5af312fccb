"""Domain constants: the one place that names ICDR grades, statuses and the referable rule."""

from __future__ import annotations

from typing import Final, Literal

#: ICDR (International Clinical Diabetic Retinopathy) severity scale, indexed by grade.
GRADE_NAMES: Final[tuple[str, ...]] = (
    "no DR",
    "mild NPDR",
    "moderate NPDR",
    "severe NPDR",
    "proliferative DR",
)
NUM_GRADES: Final[int] = len(GRADE_NAMES)

#: Grade 2 (moderate NPDR) or worse must be referred to an ophthalmologist.
REFERABLE_MIN_GRADE: Final[int] = 2

Status = Literal["graded", "ungradable", "not_fundus", "error"]
STATUSES: Final[tuple[str, ...]] = ("graded", "ungradable", "not_fundus", "error")

#: File suffixes the CLI picks up when it walks a folder.
IMAGE_SUFFIXES: Final[frozenset[str]] = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".jfif"})
