"""The Ray engine against a local Ray cluster on 127.0.0.1: same results as the local engine, exactly-once
output when killed and restarted, resume.

One cluster for the module (Ray takes seconds to start on two shared cores); skipped with a stated reason
when Ray is not installed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retinagrade.cli import app
from retinagrade.report import CSV_COLUMNS

RAY_REASON = "needs Ray Data (the [cluster] extra: pip install 'retinagrade[cluster]')"
REPO = Path(__file__).resolve().parents[2]
LocalResults = tuple[str, list[dict], Path]

pytestmark = [pytest.mark.cluster]

# What tests/cluster/conftest.py sets for this process (loopback only, no usage report), for the subprocess.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str | None]:
    """An S3 endpoint on 127.0.0.1 (moto's server), or None without moto ([deploy] extra).

    Started before the Ray cluster, with the AWS variables set in the environment, so that the cluster's
    workers inherit them and read ``s3://`` URIs from it through pyarrow, as they would from AWS.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    aws = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in aws.items():
            patch.setenv(name, value)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="module")
def ray_address(s3_endpoint: str | None) -> Iterator[str]:
    """A two-CPU Ray cluster started by this test module on 127.0.0.1, stopped after it."""
    ray = pytest.importorskip("ray", reason=RAY_REASON)
    pytest.importorskip("ray.data", reason=RAY_REASON)
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = str(context.address_info["gcs_address"])
    try:
        assert address.startswith("127.0.0.1:"), f"the test cluster must listen on loopback only, not {address}"
        yield address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def camera_photos(
    tmp_path_factory: pytest.TempPathFactory, shared_data_if_present: Path | None, fundus_photos: list[Path]
) -> list[Path]:
    """At least 25 distinct photos of real fundi: EyePACS's 768 px copies, or in a fresh clone the right and
    left eye of ``tests/fixtures`` re-encoded at 13 sizes each."""
    if shared_data_if_present is not None:
        return sorted((shared_data_if_present / "eyepacs-768/images").glob("*.jpg"))
    import cv2

    folder = tmp_path_factory.mktemp("camera-photos")
    made = []
    for side in range(512, 304, -16):
        for photo in fundus_photos[:2]:
            image = cv2.resize(cv2.imread(str(photo)), (side, side), interpolation=cv2.INTER_AREA)
            made.append(folder / f"{photo.stem}-{side}.jpg")
            cv2.imwrite(str(made[-1]), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return made


@pytest.fixture(scope="module")
def photos(
    tmp_path_factory: pytest.TempPathFactory,
    shared_data_if_present: Path | None,
    camera_photos: list[Path],
    right_eye_photo: Path,
    dark_fundus_photo: Path,
    not_fundus_photo: Path,
) -> Path:
    """Camera photos (of three sources where ../shared/data is present), a graded and an ungradable raw
    camera JPEG, non-fundus images and three broken files, in nested folders."""
    folder = tmp_path_factory.mktemp("archive") / "photos"
    picks = {
        "eyepacs": camera_photos[:20],
        "raw": [right_eye_photo, dark_fundus_photo],
        "other": [not_fundus_photo],
    }
    shared = shared_data_if_present
    if shared is not None:
        picks["aptos"] = sorted((shared / "aptos2019-224/images").iterdir())[:6]
        picks["mexico"] = sorted((shared / "mexico-512/images").iterdir())[:5]
        picks["other"].append(sorted((shared / "non-fundus-2/images").iterdir())[0])
    for sub, files in picks.items():
        (folder / sub).mkdir(parents=True)
        for src in files:
            shutil.copyfile(src, folder / sub / src.name)
    broken = folder / "broken"
    broken.mkdir()
    good = picks["eyepacs"][0].read_bytes()
    (broken / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "fake.jpg").write_bytes(b"%PDF-1.4\n% not an image\n")
    return folder


@pytest.fixture(scope="module")
def local_results(photos: Path, tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> LocalResults:
    """The local engine's CSV text, JSON rows and Parquet file for the photos and one missing file."""
    out = tmp_path_factory.mktemp("local")
    runner = CliRunner()
    for name in ("local.csv", "local.json", "local.parquet"):
        inputs = [str(photos), str(photos / "missing.jpg")]
        result = runner.invoke(app, ["grade", *inputs, "-o", str(out / name), "--model", str(model_path), "-q"])
        assert result.exit_code == 1, result.output  # the broken files
    return (out / "local.csv").read_text(), json.loads((out / "local.json").read_text()), out / "local.parquet"


def ray_options(model_path: Path, **changes: object):  # type: ignore[no-untyped-def]
    from retinagrade.cluster.engine import ClusterOptions

    settings: dict[str, object] = {"model": model_path, "workers": 1, "block_size": 8, "write_csv": True}
    settings.update(changes)
    return ClusterOptions(**settings)  # type: ignore[arg-type]


def shard_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for path in sorted((out / "shards").glob("part-*.parquet")) for row in pq.read_table(path).to_pylist()]


def test_ray_engine_gives_the_local_engines_results(
    ray_address: str, photos: Path, local_results: LocalResults, tmp_path: Path, model_path: Path
) -> None:
    from retinagrade.cluster.engine import grade_archive

    local_csv, local_rows, _ = local_results
    report = grade_archive([photos, photos / "missing.jpg"], tmp_path / "out", ray_options(model_path, shard_rows=8))

    ray_csv = (tmp_path / "out/results.csv").read_text()
    assert tuple(ray_csv.splitlines()[0].split(",")) == CSV_COLUMNS
    assert ray_csv == local_csv  # same rows, same order, same grades, statuses and probabilities to 4 places

    import pyarrow.parquet as pq

    merged = pq.read_table(tmp_path / "out/results.parquet").to_pylist()
    codes = {r["image"]: r["error_code"] for r in merged if r["status"] == "error"}
    assert codes == {r["image"]: r["error_code"] for r in local_rows if r["status"] == "error"}
    assert sorted(codes.values()) == ["corrupt_image", "empty_file", "file_not_found", "unsupported_format"]
    assert {r["status"] for r in merged} == {"graded", "ungradable", "not_fundus", "error"}

    # The local engine's Parquet output (the writer registry's) holds the same rows; only an error row's key
    # differs (the local record of a file that did not decode carries no content hash).
    local_table = pq.read_table(local_results[2]).to_pylist()
    assert [{**r, "key": None} for r in local_table] == [{**r, "key": None} for r in merged]
    assert [r["key"] for r in local_table if r["sha256"]] == [r["key"] for r in merged if r["sha256"]]

    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary == report.summary
    assert summary["by_status"] == dict(sorted(Counter(r["status"] for r in local_rows).items()))
    expected_codes = {"corrupt_image": 1, "empty_file": 1, "file_not_found": 1, "unsupported_format": 1}
    assert summary["errors_by_code"] == expected_codes
    assert sum(summary["by_grade"].values()) == summary["by_status"]["graded"]
    assert summary["this_run"]["graded"] == len(local_rows) == summary["images"]
    assert summary["this_run"]["shards_written"] >= 2


def test_killed_run_restarts_without_a_duplicate_or_a_missing_row(
    ray_address: str, photos: Path, local_results: LocalResults, tmp_path: Path, model_path: Path
) -> None:
    from retinagrade.cluster.engine import grade_archive

    # The photos alone: a missing file is a read failure, retried by every run (tested above and in test_shards).
    local_csv = "".join(line for line in local_results[0].splitlines(True) if "missing.jpg" not in line)
    local_rows = [r for r in local_results[1] if not r["image"].endswith("missing.jpg")]
    out = tmp_path / "out"
    path = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": path}
    command = [sys.executable, "-m", "retinagrade.cli", "grade", str(photos), "--engine", "ray", "-q"]
    command += ["--address", ray_address, "--output", str(out), "--model", str(model_path)]
    command += ["--shard-rows", "2", "--block-size", "2"]  # a shard every two images: killed with most to do
    log = tmp_path / "run.log"  # a file, not a pipe: a full pipe would stall the run
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        try:
            while not list((out / "shards").glob("part-*.parquet")):
                assert proc.poll() is None, f"the run ended before writing a shard:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no shard within 180 s"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    before = shard_rows(out)
    assert 0 < len(before) < len(local_rows), "the run must be killed mid-way for this test to mean anything"
    assert not (out / "results.parquet").exists()

    report = grade_archive([photos], out, ray_options(model_path))

    assert report.summary["this_run"]["graded"] == len(local_rows) - len(before)
    rows = shard_rows(out)
    assert len(rows) == len(local_rows)  # every image recorded once across both runs' shards
    assert Counter(r["key"] for r in rows).most_common(1)[0][1] == 1
    assert sorted(r["image"] for r in rows) == sorted(r["image"] for r in local_rows)
    assert (out / "results.csv").read_text() == local_csv
    assert not [p for p in out.rglob(".tmp-*")]


def test_a_finished_run_grades_only_what_is_new_or_changed(
    ray_address: str, camera_photos: list[Path], tmp_path: Path, model_path: Path
) -> None:
    from retinagrade.cluster.engine import grade_archive

    folder = tmp_path / "photos"
    folder.mkdir()
    images = camera_photos
    for src in images[:3]:
        shutil.copyfile(src, folder / src.name)
    out = tmp_path / "out"
    first = grade_archive([folder], out, ray_options(model_path))
    assert first.summary["this_run"]["graded"] == 3

    again = grade_archive([folder], out, ray_options(model_path))
    assert again.summary["this_run"]["graded"] == 0 and again.summary["this_run"]["already_done"] == 3

    shutil.copyfile(images[3], folder / images[0].name)  # rewritten in place: new content, new key
    shutil.copyfile(images[4], folder / images[4].name)  # new file
    (folder / "broken.jpg").write_bytes(b"")
    changed = grade_archive([folder], out, ray_options(model_path))
    assert changed.summary["this_run"]["graded"] == 3
    assert changed.summary["images"] == 5 and changed.summary["errors_by_code"] == {"empty_file": 1}

    with (out / "results.csv").open(newline="") as fh:
        merged = {Path(r["image"]).name: r for r in csv.DictReader(fh)}
    local = CliRunner().invoke(
        app, ["grade", str(folder / images[0].name), "-o", str(tmp_path / "one.json"), "--model", str(model_path)]
    )
    assert local.exit_code == 0, local.output
    rewritten = json.loads((tmp_path / "one.json").read_text())[0]
    assert merged[images[0].name]["p0"] == str(round(rewritten["p0"], 4))  # the new content's, not the old one


def test_an_archive_on_s3_is_graded_like_the_same_files_on_disk(
    s3_endpoint: str | None, ray_address: str, camera_photos: list[Path], tmp_path: Path, model_path: Path
) -> None:
    if s3_endpoint is None:
        pytest.skip("needs moto's S3 server (the [deploy] extra) to serve an s3:// archive on 127.0.0.1")
    import boto3

    from retinagrade.cluster.engine import grade_archive

    folder = tmp_path / "photos"
    folder.mkdir()
    for src in camera_photos[20:25]:
        shutil.copyfile(src, folder / src.name)
    (folder / "broken.jpg").write_bytes(b"%PDF-1.4")
    client = boto3.client("s3")
    client.create_bucket(Bucket="archive")
    for path in folder.iterdir():
        client.upload_file(str(path), "archive", f"clinic/{path.name}")
    client.put_object(Bucket="archive", Key="clinic/notes.txt", Body=b"not an image")

    args = ["grade", str(folder), "-o", str(tmp_path / "local.csv"), "--model", str(model_path)]
    local = CliRunner().invoke(app, args)
    assert local.exit_code == 1, local.output
    report = grade_archive(["s3://archive/clinic/"], tmp_path / "out", ray_options(model_path))

    def by_name(csv_path: Path) -> dict[str, dict[str, str]]:
        with csv_path.open(newline="") as fh:
            return {Path(r.pop("image")).name: r for r in csv.DictReader(fh)}

    remote = by_name(tmp_path / "out/results.csv")
    assert remote == by_name(tmp_path / "local.csv")
    assert set(remote) == {p.name for p in folder.iterdir()}  # notes.txt is not an image
    assert report.summary["errors_by_code"] == {"unsupported_format": 1}
