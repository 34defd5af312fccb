"""Median milliseconds to decode raw camera photos as JPEG files and as DICOM OP instances in each syntax.

The camera JPEGs are wrapped as OP instances (encapsulated JPEG baseline, the camera's bytes) and re-encoded
in the other syntaxes from their decoded pixels. Every variant is decoded with the shipped model's settings
(``decode_min_side`` from the spec), interleaved round by round so that drift of a shared machine hits all
alike. Needs the ``[dicom]`` extra. Usage::

    python benchmarks/bench_dicom_decode.py [--data ../shared/data/raw-fundus-samples] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

from pydicom import uid

from retinagrade.inference.model_spec import ModelSpec
from retinagrade.interop.photo import PhotoIdentity, pixels_to_dicom, to_bytes, wrap_jpeg
from retinagrade.pipeline import DEFAULT_MODEL
from retinagrade.preprocessing.decode import decode_image

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw-fundus-samples"
SYNTAXES = {
    "DICOM explicit LE": uid.ExplicitVRLittleEndian,
    "DICOM RLE": uid.RLELossless,
    "DICOM JPEG-LS lossless": uid.JPEGLSLossless,
    "DICOM JPEG 2000 lossless": uid.JPEG2000Lossless,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=3, help="How many photos (encoding them all is slow).")
    args = parser.parse_args()
    min_side = ModelSpec.load(DEFAULT_MODEL, verify_checksum=False).preprocess.decode_min_side
    files = sorted((args.data / "images").glob("*.jpeg"))[: args.images]
    variants: dict[str, list[bytes]] = defaultdict(list)
    for path in files:
        jpeg = path.read_bytes()
        identity = PhotoIdentity("BENCH")
        variants["JPEG file"].append(jpeg)
        variants["DICOM JPEG baseline (camera's JPEG)"].append(to_bytes(wrap_jpeg(jpeg, identity)))
        rgb = decode_image(jpeg).rgb
        for name, syntax in SYNTAXES.items():
            variants[name].append(to_bytes(pixels_to_dicom(rgb, identity, syntax)))
    timings: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.rounds):
        for name, blobs in variants.items():
            for data in blobs:
                start = time.perf_counter()
                decode_image(data, min_side=min_side)
                timings[name].append((time.perf_counter() - start) * 1000.0)
    sizes = ", ".join(
        f"{decode_image(b).original_size[0]}x{decode_image(b).original_size[1]}" for b in variants["JPEG file"]
    )
    print(f"{len(files)} photos ({sizes}), {args.rounds} rounds, decode_min_side={min_side}")
    for name, values in timings.items():
        mb = statistics.mean(len(b) for b in variants[name]) / 1e6
        print(f"  {name:40s} median {statistics.median(values):7.1f} ms   mean size {mb:5.1f} MB")


if __name__ == "__main__":
    main()
