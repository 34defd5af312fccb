"""The shipped model's answers on real photos, pinned: a refactor must not change what users get.

The golden file was written by the code as it stood before the consolidation of issue 9 and holds, for raw
camera photos, APTOS images of every grade and two non-fundus pictures, the columns of ``retinagrade grade``'s
CSV that carry a result (status, grade, referable, p0..p4, quality) as the CSV prints them (4 decimals).

A new model changes these numbers on purpose. Regenerate the file, review the diff, and commit it::

    RETINAGRADE_REGENERATE_GOLDEN=1 PYTHONPATH=src python -m pytest tests/model/test_golden.py
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retinagrade.cli import app
from retinagrade.inference.model_spec import ModelSpec
from retinagrade.pipeline import DEFAULT_MODEL

GOLDEN = Path(__file__).parent / "golden" / "shipped_model.json"
COLUMNS = ("status", "grade", "referable", "referral_reason", "p0", "p1", "p2", "p3", "p4", "quality", "p_dme", "dme")
IMAGES = (
    *(f"raw-fundus-samples/images/{n}" for n in ("116_right.jpeg", "16_right.jpeg", "373_left.jpeg")),
    *(f"raw-fundus-samples/images/{n}" for n in ("605_left.jpeg", "6834_left.jpeg", "9575_left.jpeg")),
    # Two APTOS images of each grade (none from a group with conflicting grades).
    *(
        f"aptos2019-224/images/{n}.jpg"
        for n in (
            "005b95c28852",
            "00cc2b75cddd",
            "00cb6555d108",
            "0124dffecf29",
            "000c1434d8d7",
            "00a8624548a9",
            "042470a92154",
            "05cd0178ccfe",
            "02685f13cefd",
            "02dda30d3acf",
        )
    ),
    "non-fundus/images/chelsea.png",
    "non-fundus/images/retina.jpg",
)


def _grade_with_cli(shared_data: Path, out: Path) -> dict[str, dict[str, str]]:
    result = CliRunner().invoke(
        app,
        ["grade", *(str(shared_data / name) for name in IMAGES), "-o", str(out), "--model", str(DEFAULT_MODEL), "-q"],
    )
    assert result.exit_code == 0, result.output
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {str(Path(r["image"]).relative_to(shared_data)): {c: r[c] for c in COLUMNS} for r in rows}


@pytest.mark.shared_data
def test_shipped_model_gives_the_pinned_answers(shared_data: Path, tmp_path: Path) -> None:
    got = _grade_with_cli(shared_data, tmp_path / "results.csv")
    sha256 = ModelSpec.load(DEFAULT_MODEL).sha256
    if os.environ.get("RETINAGRADE_REGENERATE_GOLDEN"):
        GOLDEN.write_text(json.dumps({"model_sha256": sha256, "rows": got}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["model_sha256"] == sha256, (
        "the shipped model changed; regenerate the golden file (see this module's docstring) and review the diff"
    )
    assert list(got) == list(golden["rows"]), "the images or their order changed"
    for image, expected in golden["rows"].items():
        assert got[image] == expected, image
