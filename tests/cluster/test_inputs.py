"""Inputs of the cluster engine: folders as the local engine walks them, manifests, URIs via pyarrow.fs."""

from __future__ import annotations

from pathlib import Path

import pytest

from retinagrade.cluster.inputs import collect_inputs, read_bytes, read_manifest, read_source
from retinagrade.errors import FileMissingError, FileReadError, NotAFileError
from retinagrade.files import collect_images


def test_a_folder_is_listed_exactly_as_the_local_engine_lists_it(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    for name in ("b/2.jpg", "1.PNG", "a-c.jpeg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert collect_inputs([tmp_path]) == [str(p) for p in collect_images([tmp_path])]
    assert len(collect_inputs([tmp_path])) == 3


def test_a_manifest_lists_paths_relative_to_itself_and_uris_as_given(tmp_path: Path) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text("patient,path\np1,eyes/l.jpg\np1,/abs/r.jpg\np2,s3://bucket/x.jpg\np3,\n")
    assert read_manifest(str(manifest)) == [str(tmp_path / "eyes/l.jpg"), "/abs/r.jpg", "s3://bucket/x.jpg"]
    # Listed twice (a manifest and the file itself): graded once.
    assert collect_inputs([manifest, tmp_path / "eyes/l.jpg"]) == read_manifest(str(manifest))


def test_an_empty_manifest_is_refused_with_a_reason(tmp_path: Path) -> None:
    manifest = tmp_path / "list.csv"
    manifest.write_text("image\n")
    with pytest.raises(ValueError, match="lists no images"):
        read_manifest(str(manifest))


def test_uris_are_read_and_walked_through_pyarrow_filesystems(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="needs pyarrow (installed with the [cluster] extra)")
    (tmp_path / "d").mkdir()
    (tmp_path / "d/eye.jpg").write_bytes(b"jpeg bytes")
    (tmp_path / "d/readme.md").write_text("not an image")
    uri = f"file://{tmp_path}/d"
    assert collect_inputs([uri]) == [f"file://{tmp_path}/d/eye.jpg"]
    assert read_bytes(f"file://{tmp_path}/d/eye.jpg") == b"jpeg bytes"
    with pytest.raises(OSError):
        read_bytes(f"file://{tmp_path}/d/missing.jpg")


def test_unreadable_sources_get_the_local_engines_error_codes(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="needs pyarrow (installed with the [cluster] extra)")
    with pytest.raises(FileMissingError):
        read_source(str(tmp_path / "missing.jpg"))
    with pytest.raises(NotAFileError):
        read_source(str(tmp_path))
    with pytest.raises(FileMissingError):
        read_source(f"file://{tmp_path}/missing.jpg")
    with pytest.raises(FileReadError) as refused:
        read_source("nosuchscheme://bucket/x.jpg")
    assert refused.value.code == "unreadable_file"
