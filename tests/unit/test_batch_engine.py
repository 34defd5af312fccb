"""The one batch engine (``GradingPipeline.grade_items`` / ``grade_paths``): ordered, bounded, never loses a file."""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
from PIL import Image

from retinagrade.errors import CorruptImageError, EmptyImageError, RetinagradeError
from retinagrade.pipeline import DEFAULT_BATCH_SIZE, GradeResult, GradingPipeline, PreparedRequest


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture
def photos(synthetic_fundus: Callable[..., np.ndarray]) -> list[bytes]:
    return [_jpeg(synthetic_fundus(480, 360, 240, 180, 150 + 5 * i, seed=i)) for i in range(3)]


def test_items_come_back_in_order_with_errors_in_place(grading_pipeline: GradingPipeline, photos: list[bytes]) -> None:
    given = EmptyImageError("given")
    items: list[tuple[str, bytes | RetinagradeError]] = [
        ("a", photos[0]),
        ("bad", b"not an image"),
        ("b", photos[1]),
        ("given", given),
        ("c", photos[2]),
    ]
    out = list(grading_pipeline.grade_items(items, workers=2))
    assert [k for k, _ in out] == ["a", "bad", "b", "given", "c"]
    outcomes = dict(out)
    assert isinstance(outcomes["bad"], RetinagradeError) and outcomes["bad"].code == "unsupported_format"
    assert outcomes["given"] is given
    for key, data in (("a", photos[0]), ("b", photos[1]), ("c", photos[2])):
        alone = grading_pipeline.grade(data)
        result = outcomes[key]
        assert isinstance(result, GradeResult) and result.status == alone.status
        if alone.decision is not None:
            assert result.decision is not None
            assert result.decision.probabilities == pytest.approx(alone.decision.probabilities, abs=1e-6)


def test_memory_stays_bounded_however_many_images_come(grading_pipeline: GradingPipeline, photos: list[bytes]) -> None:
    pulled = itertools.count()

    def endless() -> Iterator[tuple[int, bytes]]:
        for i in itertools.count():
            next(pulled)
            yield i, photos[i % len(photos)]

    results = grading_pipeline.grade_items(endless(), workers=2)
    first = list(itertools.islice(results, 3))
    results.close()  # type: ignore[attr-defined]
    assert [k for k, _ in first] == [0, 1, 2]
    # One batch at the model and the next in preparation: never the whole (endless) input.
    assert next(pulled) <= 3 * DEFAULT_BATCH_SIZE


def test_file_problems_become_rows_with_codes(
    grading_pipeline: GradingPipeline, tmp_path: Path, photos: list[bytes]
) -> None:
    (tmp_path / "good.jpg").write_bytes(photos[0])
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    names = ["good.jpg", "pipe.jpg", "dir.jpg", "broken.jpg", "absent.jpg"]
    out = list(grading_pipeline.grade_paths([tmp_path / n for n in names], workers=2))
    assert [p.name for p, _ in out] == names
    codes = [o.code if isinstance(o, RetinagradeError) else o.status for _, o in out]
    assert codes[0] in ("graded", "ungradable", "not_fundus")
    assert codes[1:] == ["not_a_file", "not_a_file", "file_not_found", "file_not_found"]


def test_decoder_metadata_reaches_the_result(grading_pipeline: GradingPipeline, photos: list[bytes]) -> None:
    request = grading_pipeline.prepare(photos[0])
    tags = {"ImageLaterality": "R", "PatientID": "P-1"}
    request = dataclasses.replace(request, decoded=dataclasses.replace(request.decoded, metadata=tags))
    result = grading_pipeline.finish(request, grading_pipeline.infer([request])[0])
    assert dict(result.metadata) == tags


def test_grade_batch_uses_the_engine(grading_pipeline: GradingPipeline, photos: list[bytes]) -> None:
    results = grading_pipeline.grade_batch([photos[0], b"", photos[1]])
    assert isinstance(results[1], RetinagradeError) and results[1].code == "empty_file"
    assert all(isinstance(r, GradeResult) for r in (results[0], results[2]))


def test_worker_processes_answer_as_threads_do_in_order(grading_pipeline: GradingPipeline, photos: list[bytes]) -> None:
    given = EmptyImageError("given")
    items: list[tuple[str, bytes | RetinagradeError]] = [
        ("a", photos[0]),
        ("bad", b"not an image"),
        ("b", photos[1]),
        ("given", given),
        ("c", photos[2]),
        ("a again", photos[0]),
    ]
    in_threads = list(grading_pipeline.grade_items(items, workers=2))
    in_processes = list(grading_pipeline.grade_items(items, workers=2, processes=True))
    assert [k for k, _ in in_processes] == [k for k, _ in items]
    for (_, expected), (key, got) in zip(in_threads, in_processes, strict=True):
        if isinstance(expected, RetinagradeError):
            assert isinstance(got, RetinagradeError) and got.code == expected.code, key
            continue
        assert isinstance(got, GradeResult), key
        # The same bits: the model's outputs for an image do not depend on the batch it ran in.
        assert (got.status, got.decision, got.quality, got.sha256) == (
            expected.status,
            expected.decision,
            expected.quality,
            expected.sha256,
        ), key
        assert isinstance(got.metadata, MappingProxyType)
    assert dict(in_processes)["given"] is given


def test_worker_processes_grade_the_images_not_this_process(
    grading_pipeline: GradingPipeline, photos: list[bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare = GradingPipeline.prepare

    def noting_the_process(self: GradingPipeline, data: bytes) -> PreparedRequest:
        (tmp_path / str(os.getpid())).touch()
        return prepare(self, data)

    monkeypatch.setattr(GradingPipeline, "prepare", noting_the_process)
    out = list(grading_pipeline.grade_items(enumerate(photos * 3), workers=2, processes=True))
    assert len(out) == 9 and all(isinstance(o, GradeResult) for _, o in out)
    graded_in = {int(p.name) for p in tmp_path.iterdir()}
    assert graded_in and os.getpid() not in graded_in and len(graded_in) <= 2


def test_an_error_from_a_worker_keeps_what_the_file_said(
    grading_pipeline: GradingPipeline, photos: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare = GradingPipeline.prepare

    def failing_tagged(self: GradingPipeline, data: bytes) -> PreparedRequest:
        if data == b"tagged":
            error = CorruptImageError("pixels damaged")
            error.metadata = MappingProxyType({"PatientID": "P-7"})  # as the DICOM decoder attaches it
            raise error
        return prepare(self, data)

    monkeypatch.setattr(GradingPipeline, "prepare", failing_tagged)
    out = dict(grading_pipeline.grade_items([("ok", photos[0]), ("tagged", b"tagged")], workers=2, processes=True))
    error = out["tagged"]
    assert isinstance(error, CorruptImageError) and error.message == "pixels damaged"
    assert isinstance(error.metadata, MappingProxyType) and dict(error.metadata) == {"PatientID": "P-7"}
    assert isinstance(out["ok"], GradeResult)


def test_a_worker_that_dies_stops_the_run_loudly(
    grading_pipeline: GradingPipeline, photos: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    prepare = GradingPipeline.prepare

    def dying(self: GradingPipeline, data: bytes) -> PreparedRequest:
        if data == b"die":
            os._exit(70)  # as the kernel's out-of-memory killer would end it
        return prepare(self, data)

    monkeypatch.setattr(GradingPipeline, "prepare", dying)
    with pytest.raises(BrokenProcessPool):
        list(grading_pipeline.grade_items([("ok", photos[0]), ("die", b"die")], workers=2, processes=True))


def test_worker_processes_take_only_a_few_images_ahead(grading_pipeline: GradingPipeline, photos: list[bytes]) -> None:
    pulled = itertools.count()

    def endless() -> Iterator[tuple[int, bytes]]:
        for i in itertools.count():
            next(pulled)
            yield i, photos[i % len(photos)]

    results = grading_pipeline.grade_items(endless(), workers=2, processes=True)
    first = list(itertools.islice(results, 3))
    results.close()  # type: ignore[attr-defined]
    assert [k for k, _ in first] == [0, 1, 2]
    assert next(pulled) <= 4 * 2 + 3
