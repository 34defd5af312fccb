"""What to grade: image files, folders, manifest CSVs of paths or URIs, read locally or through pyarrow.fs.

An archive on object storage is named by URI (``s3://bucket/prefix/``, ``gs://...``); pyarrow's filesystems
read those on every worker with the credentials of the node (instance profile, environment), so no worker
needs a mounted copy of the archive. Local paths are kept exactly as the user wrote them (relative or not),
because the path string is half of each result's key and is what the local engine reports as ``image``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

from retinagrade.constants import IMAGE_SUFFIXES
from retinagrade.errors import FileMissingError, FileReadError
from retinagrade.files import collect_images
from retinagrade.preprocessing.decode import read_image_file

#: Column names a manifest CSV may use for the image location; the first one present wins.
MANIFEST_COLUMNS = ("image", "path", "uri", "file")


def is_uri(name: str) -> bool:
    """True for ``scheme://...`` locations (s3, gs, hdfs, file), which are read through pyarrow.fs."""
    return "://" in name


def _has_image_suffix(name: str) -> bool:
    dot = name.rfind(".")
    return dot >= 0 and name[dot:].lower() in IMAGE_SUFFIXES


def _list_uri(uri: str) -> list[str]:
    """A URI as given if it names a file, else the image files under it (recursively), sorted."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(path)
    if info.type != fs.FileType.Directory:
        return [uri]
    scheme = uri.split("://", 1)[0]
    found = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
    return sorted(f"{scheme}://{f.path}" for f in found if f.type == fs.FileType.File and _has_image_suffix(f.path))


def read_manifest(manifest: str) -> list[str]:
    """Image locations listed in a manifest CSV (local path or URI).

    The column is the first of :data:`MANIFEST_COLUMNS` in the header, else the first column. Relative local
    paths are taken relative to the manifest's folder, as a ``labels.csv`` beside its images expects.

    Raises:
        ValueError: the manifest has no rows or no usable column.
    """
    text = read_bytes(manifest).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    if not header:
        raise ValueError(f"manifest {manifest} is empty")
    column = next((c for c in MANIFEST_COLUMNS if c in header), header[0])
    base = None if is_uri(manifest) else Path(manifest).parent
    entries: list[str] = []
    for row in reader:
        value = (row.get(column) or "").strip()
        if not value:
            continue
        if base is not None and not is_uri(value) and not Path(value).is_absolute():
            value = str(base / value)
        entries.append(value)
    if not entries:
        raise ValueError(f"manifest {manifest} lists no images in column {column!r}")
    return entries


def collect_inputs(paths: Iterable[str | Path]) -> list[str]:
    """Every image to grade, in a stable order, each once.

    A folder is searched recursively for image suffixes in the same order as the local engine
    (:func:`retinagrade.files.collect_images`); a ``.csv`` file is a manifest; anything else is an image, even if
    it does not exist yet (it becomes an error row, as with the local engine).
    """
    found: list[str] = []
    for item in paths:
        name = str(item)
        if name.lower().endswith(".csv"):
            found.extend(read_manifest(name))
        elif is_uri(name):
            found.extend(_list_uri(name))
        else:
            found.extend(str(p) for p in collect_images([Path(name)]))
    return list(dict.fromkeys(found))


def read_bytes(location: str) -> bytes:
    """The content of a local file or a URI.

    Raises:
        OSError: the file cannot be read (missing, no permission, network failure); pyarrow raises OSError
            subclasses too.
    """
    if not is_uri(location):
        return Path(location).read_bytes()
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(location)
    with filesystem.open_input_stream(path) as stream:
        return bytes(stream.read())


def read_source(location: str) -> bytes:
    """The bytes of one image to grade, or the error row's reason, with the local engine's error codes.

    A local path is read exactly as the local engine reads it (never blocking on a FIFO, the same codes and
    messages); a URI through pyarrow, its failures given the same codes.

    Raises:
        FileMissingError: no such file or object.
        NotAFileError: a local folder, FIFO, socket or device.
        FileReadError: any other reason it cannot be read (permissions, network, a malformed URI).
    """
    if not is_uri(location):
        return read_image_file(location)
    try:
        return read_bytes(location)
    except FileNotFoundError:
        raise FileMissingError("The object does not exist.") from None
    except (OSError, ValueError) as exc:  # pyarrow reports a malformed URI as ArrowInvalid, a ValueError
        raise FileReadError(f"The object cannot be read: {exc}") from None
