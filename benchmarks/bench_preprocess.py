"""CPU milliseconds per image for each stage of grading, beside the floor's stages, on full-size camera JPEGs.

Every stage of ``GradingPipeline.prepare`` / ``infer`` / ``finish`` is run and timed in turn for each photo, and
so are the floor's (``floor.py``: a Pillow-draft decode with a plain resize, then the model), interleaved, so
that drift of a shared machine hits them alike. Times are CPU time of this process (``time.process_time``),
one image at a time on one ONNX Runtime and one OpenCV thread: what one worker process of ``retinagrade grade``
spends. Prints the median of each stage, its share of the product's total, and both totals.

    python benchmarks/bench_preprocess.py [--photos 60] [--rounds 3] [--model SPEC]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from camera_photos import camera_photos
from PIL import Image

from retinagrade.inference.grader import ModelOutputs
from retinagrade.pipeline import GradingPipeline, PreparedRequest
from retinagrade.preprocessing.decode import decode_image, read_image_file
from retinagrade.preprocessing.fundus import crop_to_fundus, enhance_local_contrast, locate_fundus
from retinagrade.preprocessing.pipeline import PreparedImage, batch_tensor
from retinagrade.preprocessing.quality import assess_quality
from retinagrade.report import to_record


class _Stopwatch:
    """Appends the CPU milliseconds since the previous lap to the named stage."""

    def __init__(self) -> None:
        self.timings: dict[str, list[float]] = defaultdict(list)
        self._last = time.process_time()

    def start(self) -> None:
        self._last = time.process_time()

    def lap(self, stage: str) -> None:
        now = time.process_time()
        self.timings[stage].append((now - self._last) * 1000.0)
        self._last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=60, help="full-size photos (camera_photos.py)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None, help="model spec (default: the shipped model)")
    args = parser.parse_args()
    cv2.setNumThreads(1)  # as in a worker process of `retinagrade grade`
    paths = camera_photos(args.photos)
    pipeline = GradingPipeline.load(args.model, threads=1)
    config = pipeline.spec.preprocess
    size = config.input_size
    mean, std = np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32)
    for path in paths[:2]:  # first-use costs (libraries' lazy set-up) are start-up, not per image
        pipeline.finish(pipeline.prepare(path.read_bytes()), None)
    watch = _Stopwatch()
    for _ in range(args.rounds):
        for path in paths:
            watch.start()
            data = read_image_file(path)
            watch.lap("read the file")
            sha = hashlib.sha256(data).hexdigest()
            watch.lap("sha256 of the bytes")
            decoded = decode_image(data, max_pixels=pipeline.max_pixels, min_side=config.decode_min_side)
            watch.lap("decode (Pillow draft)")
            geometry = locate_fundus(decoded.rgb)
            watch.lap("locate the field of view")
            crop = crop_to_fundus(decoded.rgb, geometry, size)
            watch.lap("crop and resize")
            contrast = {"sigma_fraction": config.contrast_sigma, "weight": config.contrast_weight}
            image = enhance_local_contrast(crop, **contrast, mask_margin=config.mask_margin)
            watch.lap("contrast normalisation")
            prepared = PreparedImage(geometry, crop, image)
            quality = assess_quality(decoded, prepared, pipeline.gate, pipeline.detector)
            watch.lap("gate: detector + quality features")
            batch = batch_tensor([image], config)
            watch.lap("to the model's tensor")
            outputs = pipeline.grader.run(batch)
            watch.lap("model (incl. CAM)")
            mine = ModelOutputs(outputs.logits[0], outputs.regression[0:1], outputs.cam[0], outputs.embedding[0])
            needed = quality.is_fundus and quality.gradable
            to_record(path, pipeline.finish(PreparedRequest(decoded, prepared, quality, sha), mine if needed else None))
            watch.lap("decision + record")
            # The floor, same photo, same model session.
            with Image.open(path) as img:
                width, height = img.size
                factor = max(1, min(width, height) // max(config.decode_min_side, 1))
                if factor >= 2:
                    img.draft("RGB", (width // factor, height // factor))
                rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            watch.lap("FLOOR read + decode + resize")
            x = (np.asarray(rgb, np.float32) - mean) / std
            floor_batch = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
            watch.lap("FLOOR normalise")
            pipeline.grader.session.run(["logits"], {pipeline.grader.session.get_inputs()[0].name: floor_batch})
            watch.lap("FLOOR model")
    medians = {stage: statistics.median(values) for stage, values in watch.timings.items()}
    product = sum(v for k, v in medians.items() if not k.startswith("FLOOR"))
    floor = sum(v for k, v in medians.items() if k.startswith("FLOOR"))
    print(f"{len(paths)} photos 4288x2848, {args.rounds} rounds; CPU ms per image (median), one thread")
    for stage, value in medians.items():
        share = "" if stage.startswith("FLOOR") else f"{100 * value / product:5.1f}%"
        print(f"  {stage:36s} {value:7.2f} ms  {share}")
    print(f"  {'product total':36s} {product:7.2f} ms")
    print(f"  {'floor total':36s} {floor:7.2f} ms: per image, the product at {floor / product:.0%} of the floor")


if __name__ == "__main__":
    main()
