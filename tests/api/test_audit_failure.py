"""A failing audit store: grading answers 503 (a result without its audit record is withheld), readiness turns
503 so the load balancer stops sending traffic, and both recover when the store does. Never a 500.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from retinagrade.api.app import create_app
from retinagrade.api.settings import Settings

JPEG = {"Content-Type": "image/jpeg"}
ATTEMPTS = 60


def _grade_until_refused(client: TestClient, image: bytes) -> list[int]:
    statuses = []
    for _ in range(ATTEMPTS):
        response = client.post("/v1/grade", content=image, headers=JPEG)
        statuses.append(response.status_code)
        if response.status_code != 200:
            body = response.json()
            assert body["code"] == "audit_unavailable", body
            assert "grade" not in body and "probabilities" not in body
            assert response.headers["retry-after"]
            break
    return statuses


def _wait_ready(client: TestClient) -> int:
    for _ in range(50):
        status = client.get("/health/ready").status_code
        if status == 200:
            return status
        time.sleep(0.1)
    return status


def test_a_full_database_turns_grading_and_readiness_503(
    make_settings: Callable[..., Settings], synthetic_jpeg: bytes
) -> None:
    with TestClient(create_app(make_settings(audit_check_interval_s=0.2))) as client:
        store = client.app.state.service.audit  # type: ignore[attr-defined]
        with store._lock:  # SQLite's own "database or disk is full" (SQLITE_FULL), at the current size
            pages = store._db.execute("PRAGMA page_count").fetchone()[0]
            store._db.execute(f"PRAGMA max_page_count = {pages}")
        statuses = _grade_until_refused(client, synthetic_jpeg)
        assert statuses[-1] == 503 and 500 not in statuses, statuses
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["code"] == "audit_unavailable"
        with store._lock:
            store._db.execute("PRAGMA max_page_count = 1073741823")
        assert _wait_ready(client) == 200
        assert client.post("/v1/grade", content=synthetic_jpeg, headers=JPEG).status_code == 200


@contextlib.contextmanager
def _small_disk(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root with CAP_SYS_ADMIN): {mounted.stderr!r}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_turns_grading_and_readiness_503(
    make_settings: Callable[..., Settings], synthetic_jpeg: bytes, tmp_path: Path
) -> None:
    with _small_disk(tmp_path / "disk", "4m") as disk:
        settings = make_settings(audit_path=disk / "audit.sqlite3", audit_min_free_bytes=0, audit_check_interval_s=0.2)
        with TestClient(create_app(settings)) as client:
            assert client.post("/v1/grade", content=synthetic_jpeg, headers=JPEG).status_code == 200
            filler = disk / "filler"
            with contextlib.suppress(OSError), filler.open("wb") as handle:
                for _ in range(8 * 1024):  # 4 MiB disk: at most 8 MiB of 1 KiB writes
                    handle.write(b"\x00" * 1024)
                    handle.flush()
            statuses = _grade_until_refused(client, synthetic_jpeg)
            assert statuses[-1] == 503 and 500 not in statuses, statuses
            assert client.get("/health/ready").status_code == 503
            filler.unlink()
            assert _wait_ready(client) == 200


def test_little_free_space_is_not_ready(
    make_settings: Callable[..., Settings], synthetic_jpeg: bytes, tmp_path: Path
) -> None:
    with _small_disk(tmp_path / "disk", "8m") as disk:
        settings = make_settings(
            audit_path=disk / "audit.sqlite3", audit_min_free_bytes=4 * 1024 * 1024, audit_check_interval_s=0.2
        )
        with TestClient(create_app(settings)) as client:
            assert client.get("/health/ready").status_code == 200
            (disk / "filler").write_bytes(b"\x00" * 5 * 1024 * 1024)
            time.sleep(0.25)
            ready = client.get("/health/ready")
            assert ready.status_code == 503 and ready.json()["code"] == "audit_unavailable"
            assert client.post("/v1/grade", content=synthetic_jpeg, headers=JPEG).status_code == 503


def test_an_unusable_audit_path_stops_the_lifespan_with_a_clear_error(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    from retinagrade.api.audit import AuditStoreError

    (tmp_path / "a-file").write_text("")
    app = create_app(make_settings(audit_path=tmp_path / "a-file" / "audit.sqlite3"))
    with pytest.raises(AuditStoreError, match="cannot open the audit store"), TestClient(app):
        pass
