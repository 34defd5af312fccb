"""Grade an archive on a Ray cluster with Ray Data: read -> key -> skip what is done -> prepare -> model -> shards.

The stages are the local engine's own (:meth:`GradingPipeline.prepare`, ``infer``, ``finish`` and
:func:`retinagrade.report.to_record`), placed where a cluster runs them best:

* **read, key and prepare** run as parallel Ray tasks, one block of paths each: the bytes are read (local
  file or any pyarrow filesystem URI), hashed, skipped when their key is already in the output folder, and
  decoded, cropped and gated. What travels on to the model is the prepared request without the decoded
  full-size picture (a fifth of the bytes).
* **the model** runs in a pool of Ray actors, each holding one :class:`GradingPipeline` (one ONNX Runtime
  session) loaded once, fed batches of prepared images.
* **the driver** streams the finished records into atomically written Parquet shards
  (:mod:`retinagrade.cluster.shards`), then merges them into one table and a summary.

A file that cannot be read or graded becomes a row with ``status=error`` and an ``error_code``; it never
fails a task or the run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa

from retinagrade.cluster import RAY_MISSING
from retinagrade.cluster.inputs import collect_inputs, read_source
from retinagrade.cluster.records import item_key, rows_table, to_row
from retinagrade.cluster.shards import OutputFolder, new_run_id, summarize
from retinagrade.errors import ModelError, PreparationFailedError, RetinagradeError
from retinagrade.preprocessing.decode import DEFAULT_MAX_PIXELS
from retinagrade.report import to_record

if TYPE_CHECKING:
    from retinagrade.pipeline import GradingPipeline, PreparedRequest

logger = logging.getLogger(__name__)

#: What the prepare tasks hand to the model actors: one row per image still to grade.
PREPARED_SCHEMA = pa.schema(
    [
        pa.field("image", pa.string(), nullable=False),
        pa.field("sha256", pa.string()),
        # A pickled PreparedRequest (slimmed) or the RetinagradeError that stopped the image.
        pa.field("payload", pa.binary(), nullable=False),
    ]
)

#: Memory Ray reserves for one prepare task: a camera JPEG at the 64 MP limit decodes to 192 MB of RGB, and
#: locating and cropping the fundus needs a few copies of a reduced version (benchmarks/bench_ray.py
#: measures the peak on 768 px photos). The two requests also differ on purpose, so that Ray Data never
#: fuses the prepare tasks into the actors, which would run decoding and the model one after the other.
PREPARE_TASK_MEMORY = 512 * 1024**2
#: Memory Ray reserves for one model actor: its ONNX Runtime session, its arena and the batches queued to it
#: (the peak is measured by benchmarks/bench_ray.py and reported in docs/cluster.md).
ACTOR_MEMORY = 1024**3


@dataclass(frozen=True)
class ClusterOptions:
    """How to run on the cluster.

    Attributes:
        model: model spec or ONNX path, the same path on every node; ``None`` is the shipped model.
        address: Ray cluster to join (``auto``, ``HOST:PORT``, ``ray://...``); ``None`` joins ``$RAY_ADDRESS``
            or starts a private single-node cluster for this run.
        workers: model actors (each one ONNX Runtime session).
        threads: ONNX Runtime threads per actor.
        cpus_per_worker: CPUs Ray reserves for each actor; the rest of the cluster runs prepare tasks.
            Defaults to ``threads``.
        batch_size: images per model call.
        block_size: images per prepare task (a bigger block costs less scheduling, a smaller one loses
            less when a node dies).
        shard_rows: records per shard; a killed run loses at most the records not yet in a shard.
        shard_seconds: write a shard at least this often, however few records arrived.
        write_csv: also write ``results.csv`` with the local engine's columns.
        max_pixels: decoded-size limit, as for the local engine.
        num_cpus: CPUs of the private cluster started when no address is given (default: all).
        operating_point: the model's named operating point to refer at (``None``: its default).
    """

    model: Path | None = None
    address: str | None = None
    workers: int = 1
    threads: int = 1
    cpus_per_worker: float | None = None
    batch_size: int = 8
    block_size: int = 32
    shard_rows: int = 1000
    shard_seconds: float = 60.0
    write_csv: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    num_cpus: int | None = None
    operating_point: str | None = None


@dataclass(frozen=True)
class RunReport:
    """What one call of :func:`grade_archive` did, and where the results are."""

    summary: dict[str, Any]
    results: list[Path]
    summary_path: Path


# -- worker side ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _worker_pipeline(
    model: str | None, threads: int, max_pixels: int, expected_sha256: str, operating_point: str | None = None
) -> GradingPipeline:
    """The pipeline of this worker process, loaded once however many tasks the process runs."""
    from retinagrade.pipeline import GradingPipeline

    pipeline = GradingPipeline.load(model, threads=threads, max_pixels=max_pixels, operating_point=operating_point)
    if pipeline.spec.sha256 != expected_sha256:
        # Nodes with different model files would silently mix two models' grades in one table.
        raise ModelError(
            f"this node's model {pipeline.spec.name} has sha256 {pipeline.spec.sha256[:12]}..., "
            f"the run was started with {expected_sha256[:12]}..."
        )
    return pipeline


@functools.lru_cache(maxsize=1)
def _done_keys(ref: Any) -> frozenset[str]:
    import ray

    keys: frozenset[str] = ray.get(ref)
    return keys


def _for_transport(request: PreparedRequest) -> PreparedRequest:
    """The request without what ``finish`` never reads when no explanation is asked for.

    The decoded picture and the raw-colour crop are most of its bytes; the model needs ``model_image``, and
    ``finish`` needs the quality verdict, the original size and the metadata.
    """
    empty = np.zeros((0, 0, 3), np.uint8)
    # A plain dict: the read-only mapping proxy the decoder hands out cannot be pickled.
    decoded = dataclasses.replace(request.decoded, rgb=empty, metadata=dict(request.decoded.metadata))
    crop = dataclasses.replace(request.prepared.crop, image=empty, mask=np.zeros((0, 0), bool))
    prepared = dataclasses.replace(request.prepared, crop=crop)
    return dataclasses.replace(request, decoded=decoded, prepared=prepared)


def prepare_block(batch: pa.Table, *, model: str | None, max_pixels: int, model_sha256: str, done: Any) -> pa.Table:
    """Read, key, skip and prepare one block of images (a Ray task).

    Args:
        batch: an ``image`` column of locations.
        model, max_pixels, model_sha256: which pipeline to prepare for (see :func:`_worker_pipeline`).
        done: the object ref of the keys already recorded.
    """
    pipeline = _worker_pipeline(model, 1, max_pixels, model_sha256)
    skip = _done_keys(done)
    images: list[str] = []
    hashes: list[str | None] = []
    payloads: list[bytes] = []
    for image in batch.column("image").to_pylist():
        outcome: object
        sha256: str | None = None
        try:
            data = read_source(image)
        except RetinagradeError as exc:
            outcome = exc
        else:
            sha256 = hashlib.sha256(data).hexdigest()
            if item_key(image, sha256) in skip:
                continue
            try:
                outcome = _for_transport(pipeline.prepare(data))
            except RetinagradeError as exc:
                outcome = exc
            except Exception:
                # One image that trips an unforeseen failure must not fail the task and with it the run.
                logger.exception("preparing %s failed", image)
                outcome = PreparationFailedError("preparing this image failed unexpectedly (see the worker log)")
        images.append(image)
        hashes.append(sha256)
        payloads.append(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))
    return pa.Table.from_pydict({"image": images, "sha256": hashes, "payload": payloads}, schema=PREPARED_SCHEMA)


class GradeActor:
    """A model replica: one :class:`GradingPipeline` per actor, loaded once, grading batches."""

    def __init__(
        self, model: str | None, threads: int, max_pixels: int, model_sha256: str, operating_point: str | None = None
    ) -> None:
        self.pipeline = _worker_pipeline(model, threads, max_pixels, model_sha256, operating_point)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from retinagrade.pipeline import PreparedRequest

        images = batch.column("image").to_pylist()
        hashes = batch.column("sha256").to_pylist()
        items = [pickle.loads(p) for p in batch.column("payload").to_pylist()]
        outputs = iter(self.pipeline.infer([i for i in items if isinstance(i, PreparedRequest)]))
        rows = []
        for image, sha256, item in zip(images, hashes, items, strict=True):
            outcome = self.pipeline.finish(item, next(outputs)) if isinstance(item, PreparedRequest) else item
            rows.append(to_row(to_record(image, outcome), item_key(image, sha256)))
        return rows_table(rows)


# -- driver side ------------------------------------------------------------------------------------------


def _connect(options: ClusterOptions) -> bool:
    """Join (or start) a cluster; True when this call started it and must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=options.num_cpus, **kwargs)
    return True


def _check_resources(options: ClusterOptions, actor_cpus: float) -> None:
    """Refuse a pool of actors that would leave no CPU for the prepare tasks (the run would wait forever)."""
    import ray

    # ray.cluster_resources carries no annotations; its documented return type is this.
    resources = cast(Callable[[], dict[str, float]], ray.cluster_resources)()
    cpus = float(resources.get("CPU", 0.0))
    needed = options.workers * actor_cpus + 1.0
    if cpus < needed:
        message = (
            f"{options.workers} worker(s) x {actor_cpus:g} CPU plus 1 CPU for preparing images need {needed:g} CPUs; "
            f"the cluster has {cpus:g} now"
        )
        if options.address:
            # An autoscaling cluster grows when the pool asks; a fixed one would hang, so say it.
            logger.warning("%s: waiting for the autoscaler", message)
        else:
            raise ValueError(message + " (lower --workers or --cpus-per-worker)")


def build_dataset(images: Sequence[str], done: frozenset[str], model_sha256: str, options: ClusterOptions) -> Any:
    """The lazy Ray Data pipeline from locations to records (nothing runs until it is iterated)."""
    import ray
    import ray.data

    model = str(options.model.resolve()) if options.model is not None else None
    actor_cpus = options.cpus_per_worker if options.cpus_per_worker is not None else float(options.threads)
    _check_resources(options, actor_cpus)
    blocks = max(1, math.ceil(len(images) / options.block_size))
    done_ref = ray.put(done)
    dataset = ray.data.from_items([{"image": image} for image in images], override_num_blocks=blocks)
    # The object ref travels inside the function (a partial), where Ray leaves it unresolved: each worker
    # process fetches the keys once (see _done_keys) instead of receiving a copy with every task.
    prepare = functools.partial(
        prepare_block, model=model, max_pixels=options.max_pixels, model_sha256=model_sha256, done=done_ref
    )
    prepared = dataset.map_batches(
        prepare, batch_size=None, batch_format="pyarrow", num_cpus=1, memory=PREPARE_TASK_MEMORY
    )
    return prepared.map_batches(
        GradeActor,
        batch_size=options.batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={
            "model": model,
            "threads": options.threads,
            "max_pixels": options.max_pixels,
            "model_sha256": model_sha256,
            "operating_point": options.operating_point,
        },
        compute=ray.data.ActorPoolStrategy(size=options.workers),
        num_cpus=actor_cpus,
        memory=ACTOR_MEMORY,
    )


def grade_archive(
    paths: Sequence[str | Path],
    output: Path,
    options: ClusterOptions,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> RunReport:
    """Grade everything under ``paths`` that ``output`` does not hold yet; merge and summarise.

    Args:
        paths: files, folders, manifest CSVs and URIs, as :func:`~retinagrade.cluster.inputs.collect_inputs`.
        output: the output folder (created); a later call with the same folder resumes.
        options: cluster and batching settings.
        on_progress: called with (records written this run, images listed) after each batch.

    Raises:
        ValueError: nothing to grade, a manifest without images, or a pool larger than a local cluster.
        ImportError: Ray is not installed.
        OutputBusyError: another run holds ``output``.
        ModelError: the model cannot be loaded, or a node's model differs from the driver's.
    """
    # Read by Ray when it is imported or starts a cluster: no usage report leaves a screening programme's
    # machines, and a private single-node cluster (no address) keeps its ports on loopback.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not (options.address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(RAY_MISSING) from exc
    from retinagrade.inference.model_spec import ModelSpec
    from retinagrade.pipeline import DEFAULT_MODEL

    images = collect_inputs(paths)
    if not images:
        raise ValueError("No image files found.")
    spec = ModelSpec.load(options.model or DEFAULT_MODEL)
    folder = OutputFolder(output)
    start = time.perf_counter()
    with folder.lock():
        folder.remove_temporaries()
        done = frozenset(folder.done_keys())
        started_here = _connect(options)
        writer = folder.writer(new_run_id())
        try:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            dataset = build_dataset(images, done, spec.sha256, options)
            last_flush = time.monotonic()
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                writer.add(batch.to_pylist())
                if writer.pending >= options.shard_rows or time.monotonic() - last_flush >= options.shard_seconds:
                    writer.flush()
                    last_flush = time.monotonic()
                if on_progress is not None:
                    on_progress(writer.rows_written + writer.pending, len(images))
            writer.flush()
        finally:
            if started_here:
                ray.shutdown()
        merged = folder.merge(images)
        results = folder.write_results(merged, write_csv=options.write_csv)
        elapsed = time.perf_counter() - start
        summary = summarize(merged)
        summary["model"] = {"name": spec.name, "version": spec.version, "sha256": spec.sha256}
        summary["this_run"] = {
            "run_id": writer.run_id,
            "images_listed": len(images),
            "already_done": len(images) - writer.rows_written,
            "graded": writer.rows_written,
            "shards_written": writer.sequence,
            "seconds": round(elapsed, 2),
            "workers": options.workers,
        }
        summary_path = folder.write_summary(summary)
    return RunReport(summary=summary, results=results, summary_path=summary_path)
