"""What a run pays for before its first image: ``retinagrade grade`` imports nothing it does not use.

Each test starts a fresh interpreter (this one has imported everything the suite needed) and asks which
modules a start-up loaded.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SRC = Path(__file__).resolve().parents[2] / "src"


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_importing_the_package_reads_no_distribution_metadata() -> None:
    # importlib.metadata and the email package under it cost every start tens of milliseconds.
    assert "importlib.metadata" not in _modules_after("import retinagrade")
    from importlib.metadata import PackageNotFoundError, version

    import retinagrade

    try:
        installed = version("retinagrade")
    except PackageNotFoundError:
        installed = "0+unknown"
    assert retinagrade.__version__ == installed


@pytest.fixture
def photo(tmp_path: Path, synthetic_fundus: Callable[..., np.ndarray]) -> Path:
    path = tmp_path / "eye.jpg"
    buf = io.BytesIO()
    Image.fromarray(synthetic_fundus(320, 240, 160, 120, 110)).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return path


def test_a_quiet_grade_loads_no_progress_bar(photo: Path, model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    args = ["grade", str(photo), "-q", "-o", str(out), "--model", str(model_path)]
    run = f"from retinagrade.cli import app\ntry:\n    app({args!r})\nexcept SystemExit as e:\n    assert not e.code"
    modules = _modules_after(run)
    assert out.read_text().count("\n") == 2  # the header and the photo's row: it really graded
    assert "rich.progress" not in modules
