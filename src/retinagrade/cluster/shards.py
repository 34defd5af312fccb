"""The output folder of a cluster run: atomic Parquet shards, resume, the merged table and the summary.

Layout::

    DIR/shards/part-<run>-<seq>.parquet   results as they complete, one immutable file per flush
    DIR/results.parquet                   the merged table: one row per image, the newest result
    DIR/results.csv                       the same rows with the local engine's CSV columns (when asked)
    DIR/summary.json                      counts by status and grade, errors by code, this run's numbers

A shard is written under a temporary name and renamed into place, so a run killed at any moment leaves
whole shards or none: rows of a shard that was not renamed were never recorded and are graded again, rows of
a renamed shard are never graded again. That is what makes the output exactly-once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from retinagrade.cluster.records import RECORD_SCHEMA, RETRYABLE_ERROR_CODES, from_row, rows_table

SHARD_GLOB = "part-*.parquet"
TEMP_PREFIX = ".tmp-"


class OutputBusyError(RuntimeError):
    """Another run holds the output folder."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(target: Path, write: Any) -> None:
    """Call ``write(temp_path)``, flush it to disk, then rename it onto ``target`` in one step."""
    temp = target.with_name(f"{TEMP_PREFIX}{target.name}")
    write(temp)
    with temp.open("rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(temp, target)
    _fsync_dir(target.parent)


def new_run_id() -> str:
    """Sortable by start time (UTC), unique across hosts: shards of a later run sort after earlier ones."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


class OutputFolder:
    """One output folder; see the module docstring for its layout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shards = root / "shards"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one run; a second run on the same folder is refused, not interleaved.

        The lock is an advisory ``flock`` that the kernel drops when the process dies, so a killed run never
        leaves a stale lock behind.
        """
        self.shards.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputBusyError(f"another run is writing to {self.root}") from None
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def shard_paths(self) -> list[Path]:
        """Finished shards, oldest first (run ids sort by start time, sequence numbers within a run)."""
        return sorted(self.shards.glob(SHARD_GLOB)) if self.shards.is_dir() else []

    def remove_temporaries(self) -> int:
        """Delete half-written files a killed run left; they were never part of the results."""
        removed = 0
        for folder in (self.root, self.shards):
            for leftover in folder.glob(f"{TEMP_PREFIX}*") if folder.is_dir() else ():
                leftover.unlink()
                removed += 1
        return removed

    def done_keys(self) -> set[str]:
        """Keys already recorded and final: a resumed run skips them (read failures are retried)."""
        done: set[str] = set()
        for path in self.shard_paths():
            table = pq.read_table(path, columns=["key", "error_code"])
            retry = set(RETRYABLE_ERROR_CODES)
            for key, code in zip(table.column("key").to_pylist(), table.column("error_code").to_pylist(), strict=True):
                if code not in retry:
                    done.add(key)
        return done

    def writer(self, run_id: str) -> ShardWriter:
        return ShardWriter(self.shards, run_id)

    def read_all(self) -> pa.Table:
        """Every shard's rows concatenated, oldest first."""
        tables = [pq.read_table(path, schema=RECORD_SCHEMA) for path in self.shard_paths()]
        return pa.concat_tables(tables) if tables else RECORD_SCHEMA.empty_table()

    def merge(self, order: Sequence[str] = ()) -> pa.Table:
        """One row per image: its newest result (a rewritten file's, a read failure's retry).

        Rows follow ``order`` (the run's input order, as the local engine writes them); images not in it
        (graded by earlier runs on other inputs) come after, sorted by name.
        """
        table = self.read_all()
        newest: dict[str, int] = {}
        final: set[str] = set()
        codes = table.column("error_code").to_pylist()
        for index, image in enumerate(table.column("image").to_pylist()):
            retryable = codes[index] in RETRYABLE_ERROR_CODES
            # A read failure never hides an earlier result for the same image: it says nothing about it.
            if not (retryable and image in final):
                newest[image] = index
            if not retryable:
                final.add(image)
        position = {image: i for i, image in enumerate(order)}
        rest = len(position)
        ranked = sorted(newest, key=lambda image: (position.get(image, rest), image))
        return table.take(pa.array([newest[image] for image in ranked], type=pa.int64()))

    def write_results(self, table: pa.Table, *, write_csv: bool) -> list[Path]:
        """Write the merged table (Parquet, and CSV when asked) atomically; return the paths written."""
        written = [self.root / "results.parquet"]
        _atomic_write(written[0], lambda temp: pq.write_table(table, temp))
        if write_csv:
            written.append(self.root / "results.csv")
            _atomic_write(written[1], lambda temp: write_csv_rows(table.to_pylist(), temp))
        return written

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.root / "summary.json"
        _atomic_write(path, lambda temp: temp.write_text(json.dumps(summary, indent=2) + "\n"))
        return path


def write_csv_rows(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """The local engine's CSV, by its own writer, from the table's rows."""
    from retinagrade.report import open_writer

    writer = open_writer(path, "csv", overwrite=True)
    try:
        for row in rows:
            writer.write(from_row(row))
    finally:
        writer.close()


class ShardWriter:
    """Buffers records of one run and writes them as numbered, atomically renamed Parquet shards."""

    def __init__(self, folder: Path, run_id: str) -> None:
        self.folder = folder
        self.run_id = run_id
        self.sequence = 0
        self.rows_written = 0
        self._buffer: list[dict[str, Any]] = []

    def add(self, records: Sequence[Mapping[str, Any]]) -> None:
        self._buffer.extend(dict(r) for r in records)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def flush(self) -> Path | None:
        """Write the buffered records as the next shard; ``None`` when there is nothing to write."""
        if not self._buffer:
            return None
        table = rows_table(self._buffer)
        target = self.folder / f"part-{self.run_id}-{self.sequence:06d}.parquet"
        _atomic_write(target, lambda temp: pq.write_table(table, temp))
        self.sequence += 1
        self.rows_written += table.num_rows
        self._buffer = []
        return target


def summarize(table: pa.Table) -> dict[str, Any]:
    """Counts over the merged table: by status, by grade, referable, and errors by code."""
    statuses = Counter(table.column("status").to_pylist())
    grades = Counter(g for g in table.column("grade").to_pylist() if g is not None)
    codes = Counter(c for c in table.column("error_code").to_pylist() if c)
    return {
        "images": table.num_rows,
        "by_status": dict(sorted(statuses.items())),
        "by_grade": {str(g): n for g, n in sorted(grades.items())},
        "referable": sum(bool(r) for r in table.column("referable").to_pylist()),
        "errors_by_code": dict(sorted(codes.items())),
    }
