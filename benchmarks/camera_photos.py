"""The full-size camera photos the speed benchmarks share: 4288 x 2848 JPEGs (quality 95).

The raw EyePACS samples (2560x1920 to 3888x2592) are upscaled to the 12-megapixel size of a current fundus
camera, as ``bench_service.py`` always did, and copied round-robin until the folder holds ``count`` files. The
floor (``floor.py``), ``bench_grade_cli.py`` and ``bench_service.py`` read the same files, so their figures
can be divided by each other.

    python benchmarks/camera_photos.py [--count 60] [--out FOLDER]   # default FOLDER: $TMPDIR/retinagrade-photos-60
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RAW_SAMPLES = ROOT.parent / "shared" / "data" / "raw-fundus-samples" / "images"
#: A current fundus camera's frame (Nikon D90-based and similar cameras of EyePACS sites).
SIZE = (4288, 2848)


def big_jpeg(sample: Path, size: tuple[int, int] = SIZE) -> bytes:
    """A camera-sized JPEG (quality 95) upscaled from a raw sample."""
    buffer = io.BytesIO()
    Image.open(sample).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def default_folder(count: int) -> Path:
    """Where :func:`camera_photos` keeps ``count`` photos between runs."""
    return Path(tempfile.gettempdir()) / f"retinagrade-photos-{count}"


def camera_photos(count: int = 60, folder: Path | None = None, samples: Path = RAW_SAMPLES) -> list[Path]:
    """``count`` full-size photos in ``folder`` (made once, kept for the next run), sorted by name."""
    folder = folder or default_folder(count)
    sources = sorted(p for p in samples.glob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not sources:
        raise SystemExit(f"no JPEGs in {samples}")
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[Path, bytes] = {}
    paths = []
    for i in range(count):
        source = sources[i % len(sources)]
        path = folder / f"{i:03d}_{source.stem}.jpeg"
        if not path.is_file():
            if source not in made:
                made[source] = big_jpeg(source)
            path.write_bytes(made[source])
        paths.append(path)
    extra = [p for p in folder.glob("*.jpeg") if p not in paths]
    if extra:
        raise SystemExit(f"{folder} holds other JPEGs too ({extra[0].name}...): give an empty or own folder")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None, help="folder (default: $TMPDIR/retinagrade-photos-COUNT)")
    args = parser.parse_args()
    paths = camera_photos(args.count, args.out)
    print(f"{len(paths)} photos of {SIZE[0]}x{SIZE[1]} in {paths[0].parent}")


if __name__ == "__main__":
    main()
