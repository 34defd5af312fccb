"""The output folder without Ray: atomic shards, what a resumed run skips, the merge rule, the lock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyarrow", reason="needs pyarrow (installed with the [cluster] extra)")

import pyarrow.parquet as pq

from retinagrade.cluster.records import RECORD_SCHEMA, from_row, item_key, rows_table, to_row
from retinagrade.cluster.shards import OutputBusyError, OutputFolder, summarize
from retinagrade.report import ResultRecord


def record(image: str, sha256: str | None, status: str = "graded", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict.fromkeys(RECORD_SCHEMA.names)
    base.update(image=image, status=status, referable=False, sha256=sha256, key=item_key(image, sha256))
    if status == "graded":
        base.update(grade=fields.pop("grade", 0), p0=1.0, p1=0.0, p2=0.0, p3=0.0, p4=0.0)
    base.update(fields)
    return base


def test_a_shard_appears_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = OutputFolder(tmp_path)
    folder.shards.mkdir(parents=True)
    writer = folder.writer("run1")
    writer.add([record("a.jpg", "1"), record("b.jpg", "2")])
    assert writer.flush() is not None

    # The process dies while writing the second shard: after the bytes, before the rename.
    writer.add([record("c.jpg", "3")])

    def killed(*_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("retinagrade.cluster.shards.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.flush()
    monkeypatch.undo()

    assert [p.name for p in folder.shard_paths()] == ["part-run1-000000.parquet"]
    assert folder.read_all().column("image").to_pylist() == ["a.jpg", "b.jpg"]
    assert folder.remove_temporaries() == 1
    assert list(folder.shards.iterdir()) == folder.shard_paths()


def test_resume_skips_final_results_and_retries_read_failures(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path)
    folder.shards.mkdir(parents=True)
    writer = folder.writer("run1")
    writer.add(
        [
            record("a.jpg", "1"),
            record("bad.jpg", "2", status="error", error_code="corrupt_image"),
            record("gone.jpg", None, status="error", error_code="file_not_found"),
        ]
    )
    writer.flush()
    assert folder.done_keys() == {item_key("a.jpg", "1"), item_key("bad.jpg", "2")}


def test_merge_keeps_the_newest_result_per_image_but_never_a_read_failure_over_a_result(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path)
    folder.shards.mkdir(parents=True)
    first = folder.writer("20260101T000000Z-aaaaaa")
    first.add([record("a.jpg", "1", grade=0), record("b.jpg", "2", grade=1), record("c.jpg", None, status="error")])
    first.flush()
    second = folder.writer("20260102T000000Z-bbbbbb")
    second.add(
        [
            record("a.jpg", "1b", grade=3),  # rewritten file: newer content wins
            record("b.jpg", None, status="error", error_code="unreadable_file"),  # transient: keeps b's result
            record("c.jpg", "3", grade=2),  # read failure retried
            record("z.jpg", "9", grade=4),
        ]
    )
    second.flush()
    merged = folder.merge(["c.jpg", "b.jpg", "a.jpg"])
    rows = merged.to_pylist()
    assert [r["image"] for r in rows] == ["c.jpg", "b.jpg", "a.jpg", "z.jpg"]
    assert [r["grade"] for r in rows] == [2, 1, 3, 4]
    summary = summarize(merged)
    assert summary["images"] == 4 and summary["by_status"] == {"graded": 4}
    assert summary["by_grade"] == {"1": 1, "2": 1, "3": 1, "4": 1}

    written = folder.write_results(merged, write_csv=True)
    assert pq.read_table(written[0]).num_rows == 4
    assert written[1].read_text().splitlines()[1].startswith("c.jpg,graded,2,")


def test_a_second_run_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path)
    with folder.lock(), pytest.raises(OutputBusyError), OutputFolder(tmp_path).lock():
        pass
    with OutputFolder(tmp_path).lock():  # released when the first run ends
        pass


def test_a_record_survives_the_parquet_round_trip() -> None:
    from types import MappingProxyType

    original = ResultRecord(
        image="eye.jpg",
        status="graded",
        urgency="refer",
        action="refer",
        grade=2,
        grade_name="moderate NPDR",
        referable=True,
        confidence=0.91,
        probabilities=(0.01, 0.08, 0.6, 0.2, 0.11),
        p_referable=0.91,
        quality=0.8,
        is_fundus=True,
        gradable=True,
        reasons=("slightly_blurred",),
        sha256="ab" * 32,
        width=3888,
        height=2592,
        site="clinic-a",
        metadata=MappingProxyType({"ImageLaterality": "L", "PatientID": "p1"}),
    )
    refused = ResultRecord(image="x.jpg", status="error", urgency="retake", action="resend_file", error_code="e")
    table = rows_table([to_row(original, "k1"), to_row(refused, "k2")])
    assert table.schema == RECORD_SCHEMA
    assert [from_row(row) for row in table.to_pylist()] == [original, refused]


def test_the_local_engine_can_write_the_same_table_through_the_writer_registry(tmp_path: Path) -> None:
    from retinagrade.report import format_for, open_writer

    assert format_for(tmp_path / "results.parquet") == "parquet"
    records = [
        ResultRecord(image=f"{i}.jpg", status="error", urgency="retake", action="resend_file", error_code="empty_file")
        for i in range(3)
    ]
    writer = open_writer(tmp_path / "results.parquet")
    for r in records:
        writer.write(r)
    writer.close()
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.schema == RECORD_SCHEMA
    assert [from_row(row) for row in table.to_pylist()] == records
