"""The ONNX Runtime session of the grading network: how it uses the machine's cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from retinagrade.inference.grader import OnnxGrader
from retinagrade.inference.model_spec import ModelSpec


@pytest.mark.parametrize("threads", [1, 2])
def test_idle_model_threads_sleep_instead_of_spinning(model_path: Path, threads: int) -> None:
    # Spinning threads take the cores from the threads decoding the next images (20-40 ms of CPU an image).
    grader = OnnxGrader(ModelSpec.load(model_path), threads=threads)
    options = grader.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == grader.threads == threads
