"""Which files a run grades: the paths given, and the image entries found in folders, in a stable order;
and a file's content hash, which the model, gate and detector files are checked against.

Shared by the CLI and the cluster engine, so that both list a folder identically (the same rows in the same
order, the same path strings in the ``image`` column).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from retinagrade.constants import IMAGE_SUFFIXES


def _is_dicom_file(path: Path) -> bool:
    """A regular file starting with the DICOM preamble (PACS exports often have no suffix at all)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False  # never open a FIFO or device just to look at it
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _walk(folder: Path) -> Iterator[Path]:
    """Every entry under ``folder`` whose name has an image suffix, whatever it is, in a stable order.

    Not only regular files: a broken link, a link loop, a FIFO or a folder named ``x.jpg`` is yielded too, so
    that it gets an error row instead of vanishing from the report. Links to folders are not followed (a loop
    of links can then never trap the walk). Files without a suffix are taken when they are DICOM.
    """
    found: list[Path] = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        found.extend(Path(root, name) for name in (*files, *dirs) if Path(name).suffix.lower() in IMAGE_SUFFIXES)
        found.extend(Path(root, name) for name in files if not Path(name).suffix and _is_dicom_file(Path(root, name)))
    yield from sorted(found)


def collect_images(paths: Iterable[Path]) -> list[Path]:
    """Files as given (whatever they are: reading decides), and image entries found recursively in folders."""
    found: list[Path] = []
    for path in paths:
        try:
            is_folder = stat.S_ISDIR(os.stat(path).st_mode)
        except OSError:
            is_folder = False  # missing, a broken link or a loop: its row will say so
        found.extend(_walk(path) if is_folder else [path])
    return found


def sha256_file(path: Path) -> str:
    """The file's sha256, hex, read a megabyte at a time."""
    import hashlib  # OpenSSL's bindings, 3 ms that listing files (the CLI's start) does not need

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
