"""An append-only audit trail: one row per graded image, in SQLite (WAL mode), surviving restarts.

Rows hold no image bytes and no patient identifiers: the image is named by its sha256. Triggers refuse
UPDATE and DELETE, so the table can only grow. Writes happen on one dedicated thread, off the event loop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS grading_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    request_id TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    status TEXT NOT NULL,
    grade INTEGER,
    referable INTEGER,
    result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS grading_audit_request ON grading_audit (request_id);
CREATE TRIGGER IF NOT EXISTS grading_audit_no_update BEFORE UPDATE ON grading_audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
CREATE TRIGGER IF NOT EXISTS grading_audit_no_delete BEFORE DELETE ON grading_audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
"""


@dataclass(frozen=True)
class AuditRecord:
    time: str
    request_id: str
    image_sha256: str
    model_name: str
    model_version: str
    model_sha256: str
    status: str
    grade: int | None
    referable: bool | None
    result: dict[str, Any]


class AuditStore:
    """The SQLite audit store. Use from one thread at a time (the service gives it its own thread)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def append(self, records: list[AuditRecord]) -> None:
        rows = [
            (
                r.time,
                r.request_id,
                r.image_sha256,
                r.model_name,
                r.model_version,
                r.model_sha256,
                r.status,
                r.grade,
                None if r.referable is None else int(r.referable),
                json.dumps(r.result),
            )
            for r in records
        ]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO grading_audit (time, request_id, image_sha256, model_name, model_version, "
                    "model_sha256, status, grade, referable, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def records(self, request_id: str | None = None) -> list[dict[str, Any]]:
        """Read records back (oldest first), for tests and audits."""
        query = "SELECT * FROM grading_audit"
        args: tuple[str, ...] = ()
        if request_id is not None:
            query += " WHERE request_id = ?"
            args = (request_id,)
        with self._lock:
            cursor = self._db.execute(query + " ORDER BY id", args)
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()
