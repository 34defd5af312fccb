"""A fresh clone, without ../shared, runs every end-to-end test on the photos of ``tests/fixtures``.

Only the tests that measure the model or the gate on the shared data, train on it, or need a raw camera
photo's measured thresholds or the variety of three sources are marked ``shared_data`` (and skip without
it). The marker is added by ``tests/conftest.py`` to every test whose fixtures reach ``shared_data``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: Tests outside tests/model (the quality bars on real data) that need the shared data itself.
DATA_HUNGRY = {
    # 60 photographs of three sources and the raw camera JPEGs: how often the locator finds the disc.
    "tests/unit/preprocessing/test_fundus.py::test_finds_the_fundus_in_real_photographs",
    # Thresholds measured on one raw 3888 px camera photo against its 512 px copy.
    "tests/unit/preprocessing/test_pipeline.py::test_real_camera_photo_full_size_and_downscaled",
}


@pytest.mark.slow
def test_only_tests_of_the_data_itself_need_the_shared_data() -> None:
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "shared_data", "-p", "no:cacheprovider"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    marked = {line for line in done.stdout.splitlines() if "::" in line}
    outside_model = {node for node in marked if not node.startswith("tests/model/")}
    assert outside_model == DATA_HUNGRY
    # The end-to-end tests that a fresh clone used to skip: the screening page, the PACS round trip, DICOM.
    for folder in ("tests/browser/", "tests/integration/", "tests/api/", "tests/cluster/"):
        assert not [node for node in marked if node.startswith(folder)], folder
