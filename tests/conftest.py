"""Fixtures shared by every test suite.

``shared_data``
    Path to the development data (``../shared/data`` beside the repository root, or ``$RETINAGRADE_DATA``).
    A test that asks for it is skipped, with the reason :data:`SHARED_DATA_REASON`, when the folder is
    absent, as in a fresh clone. Mark such tests ``@pytest.mark.shared_data`` too, so ``-m "not shared_data"``
    deselects them.

Photographs (``fundus_photos``, ``right_eye_photo``, ``left_eye_photo``, ``dark_fundus_photo``, ...)
    Real photographs for the end-to-end tests (service, screening page, CLI, DICOM, PACS, Ray), each
    chosen for what the shipped quality gate says of it: the raw camera JPEGs of ``../shared/data`` when it
    is present, else the small CC0 photos of ``tests/fixtures`` (README.md there), so that a fresh clone
    runs those tests too. Tests that measure accuracy or train need the shared data itself.

Terminal width
    During the session every process sees ``COLUMNS=``:data:`TERMINAL_COLUMNS`, so Rich, in the tests'
    process and in the CLI subprocesses they start, prints a message that names a temporary path on one
    line, whatever terminal pytest runs in and however deep the checkout lies. pytest's own report keeps
    the terminal's real width.

``synthetic_fundus``
    Factory drawing a fundus-like RGB uint8 image with a known field of view: an orange-red disc on black
    with darker vessel-like lines, optionally stretched, cut by the frame or carrying a camera's rim notch.
    See :func:`draw_synthetic_fundus` for the arguments.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

SHARED_DATA_REASON = "needs ../shared/data (not present in a fresh clone)"


def shared_data_dir() -> Path:
    """Where the shared development data should be: ``$RETINAGRADE_DATA`` or ``<repo>/../shared/data``."""
    override = os.environ.get("RETINAGRADE_DATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; skips the test when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(SHARED_DATA_REASON)
    return path


FIXTURES = Path(__file__).resolve().parent / "fixtures"


@dataclass(frozen=True)
class SamplePhotos:
    """Photographs for the end-to-end tests, by what the shipped quality gate says of each."""

    #: Graded photos of real fundi, a right eye first and a left eye second; file names say the eye.
    graded: tuple[Path, ...]
    #: A real fundus too dark to grade: status ``ungradable``, reason ``too_dark``.
    dark: Path
    #: A photograph of a cat: status ``not_fundus``.
    not_fundus: Path
    #: A full-size camera JPEG (3888 x 2592 or so); None where one must be made from ``graded[0]``.
    camera: Path | None


def sample_photos() -> SamplePhotos:
    """The shared data's raw camera JPEGs when ``../shared/data`` is present, else ``tests/fixtures``."""
    raw = shared_data_dir() / "raw-fundus-samples" / "images"
    cat = shared_data_dir() / "non-fundus" / "images" / "chelsea.png"
    names = ("16_right", "373_left", "116_right", "605_left", "9575_left")
    if raw.is_dir() and cat.is_file():
        graded = tuple(raw / f"{name}.jpeg" for name in names)
        return SamplePhotos(graded, raw / "6834_left.jpeg", cat, camera=graded[0])
    graded = (FIXTURES / "retina_right.jpg", FIXTURES / "retina_left.jpg")
    return SamplePhotos(graded, FIXTURES / "retina_dark_left.jpg", FIXTURES / "chelsea.jpg", camera=None)


@pytest.fixture(scope="session")
def fundus_photos() -> list[Path]:
    """Photos of real fundi that the gate grades, at least two: a right eye, a left eye, then any others."""
    return list(sample_photos().graded)


@pytest.fixture(scope="session")
def right_eye_photo(fundus_photos: list[Path]) -> Path:
    """A graded right eye (``16_right.jpeg`` or ``retina_right.jpg``)."""
    return fundus_photos[0]


@pytest.fixture(scope="session")
def left_eye_photo(fundus_photos: list[Path]) -> Path:
    """A graded left eye (``373_left.jpeg`` or ``retina_left.jpg``)."""
    return fundus_photos[1]


@pytest.fixture(scope="session")
def dark_fundus_photo() -> Path:
    """A real left fundus the gate refuses as too dark (``6834_left.jpeg`` or ``retina_dark_left.jpg``)."""
    return sample_photos().dark


@pytest.fixture(scope="session")
def not_fundus_photo() -> Path:
    """A cat (scikit-image's ``chelsea``): never a fundus."""
    return sample_photos().not_fundus


@pytest.fixture(scope="session")
def camera_jpeg() -> bytes:
    """A full-size camera JPEG of a graded right eye: a raw sample, or the right-eye fixture enlarged into a
    3888 x 2592 frame as EyePACS's cameras write it (what makes the decoder read it at a quarter scale)."""
    photos = sample_photos()
    if photos.camera is not None:
        return photos.camera.read_bytes()
    small = cv2.imread(str(photos.graded[0]), cv2.IMREAD_COLOR)
    height, width, side = 2592, 3888, 2500
    frame = np.zeros((height, width, 3), np.uint8)
    top, left = (height - side) // 2, (width - side) // 2
    frame[top : top + side, left : left + side] = cv2.resize(small, (side, side), interpolation=cv2.INTER_CUBIC)
    ok, encoded = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()


#: The terminal width the tests and their subprocesses see: wider than any message a test reads.
TERMINAL_COLUMNS = 1000
_columns_before: list[str | None] = []


@pytest.hookimpl(trylast=True)  # after the terminal reporter has measured the real terminal
def pytest_configure(config: pytest.Config) -> None:
    """Announce a terminal :data:`TERMINAL_COLUMNS` wide to everything but pytest's own report.

    Rich wraps at $COLUMNS, else at the width of the terminal on stdin, stdout or stderr, else at 80, and
    folds a word longer than a line: a CLI message naming a temporary path would otherwise break at a
    different place on every machine and in every checkout.
    """
    if config.pluginmanager.get_plugin("terminalreporter") is not None:
        writer = config.get_terminal_writer()
        writer.fullwidth = writer.fullwidth  # pinned: pytest's lines stay as wide as the real terminal
    _columns_before.append(os.environ.get("COLUMNS"))
    os.environ["COLUMNS"] = str(TERMINAL_COLUMNS)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Give $COLUMNS back (pytest may run again in this process)."""
    del config  # part of the hook's signature
    if _columns_before:
        before = _columns_before.pop()
        if before is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = before


@pytest.fixture(scope="session")
def shared_data_if_present() -> Path | None:
    """The shared data folder, or None in a fresh clone: for tests that run either way, on more data with it."""
    path = shared_data_dir()
    return path if path.is_dir() else None


def draw_synthetic_fundus(
    width: int,
    height: int,
    cx: float,
    cy: float,
    radius: float,
    *,
    ry: float | None = None,
    brightness: float = 1.0,
    vessels: bool = True,
    notch: str | None = None,
    background: int = 0,
    seed: int = 0,
) -> np.ndarray:
    """Draw a fundus-like photograph with a known field of view.

    The disc is an axis-aligned ellipse (a circle unless ``ry`` is given) centred at (``cx``, ``cy``);
    whatever falls outside ``width`` x ``height`` is simply cut off, as in cameras that crop the disc at the
    top and bottom of the frame. Shapes are drawn in scale-free units, so the same arguments scaled together
    draw the same picture at any resolution.

    Args:
        width, height: image size in pixels.
        cx, cy: disc centre in pixels (may lie anywhere, even outside the frame).
        radius: horizontal radius in pixels.
        ry: vertical radius; defaults to ``radius``.
        brightness: multiplies the disc's colour (0.1 gives a disc of about 25/255, an under-exposed photo).
        vessels: draw darker vessel-like curves branching from the optic disc.
        notch: ``"right"``, ``"top"``... draws a small bright tab just outside the rim on that side, as some
            cameras print.
        background: grey level of the surround (0 for a camera's black).
        seed: seeds the slight mottling of the disc.

    Returns:
        H x W x 3 uint8 RGB.
    """
    ry = radius if ry is None else ry
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u = (xx + 0.5 - cx) / radius
    v = (yy + 0.5 - cy) / ry
    rho2 = u * u + v * v
    inside = rho2 <= 1.0

    # Orange-red fundus, a little darker towards the rim, brighter optic disc to one side of the centre.
    shade = 1.0 - 0.25 * np.clip(rho2, 0, 1)
    od = np.exp(-((u - 0.35) ** 2 + v**2) / (2 * 0.08**2))
    base = np.stack([200 * shade + 55 * od, 90 * shade + 120 * od, 40 * shade + 90 * od], axis=-1)
    if vessels:
        dim = np.ones_like(u)
        for angle in np.linspace(0.3, 2 * np.pi, 7, endpoint=False):
            # Curves leaving the optic disc, bending as they go, about 1.2% of the radius thick.
            ang = angle + 0.6 * np.sqrt(np.hypot(u - 0.35, v))
            dx, dy = np.cos(ang), np.sin(ang)
            distance = np.abs((u - 0.35) * dy - v * dx)
            along = (u - 0.35) * dx + v * dy
            dim = np.minimum(dim, np.where((distance < 0.012) & (along > 0), 0.55, 1.0))
        base *= dim[..., None]
    rng = np.random.default_rng(seed)
    mottle = cv2.resize(rng.normal(1.0, 0.03, (16, 16)).astype(np.float32), (width, height))
    base *= (brightness * mottle)[..., None]

    img = np.where(inside[..., None], base, float(background))
    if notch:
        # A bright square tab just outside the rim, 6% of the radius across.
        direction = {"right": (1, 0), "left": (-1, 0), "top": (0, -1), "bottom": (0, 1)}[notch]
        half = 0.03
        tab_u, tab_v = direction[0] * (1.0 + half), direction[1] * (1.0 + half)
        tab = (np.abs(u - tab_u) <= half) & (np.abs(v - tab_v) <= half)
        img[tab] = (220 * brightness, 220 * brightness, 220 * brightness)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


@pytest.fixture
def synthetic_fundus() -> Callable[..., np.ndarray]:
    """The :func:`draw_synthetic_fundus` factory."""
    return draw_synthetic_fundus


def model_under_test() -> Path:
    """The model the end-to-end tests use: ``$RETINAGRADE_MODEL`` if set, else the shipped model."""
    from retinagrade.pipeline import DEFAULT_MODEL

    return Path(os.environ.get("RETINAGRADE_MODEL") or DEFAULT_MODEL)


@pytest.fixture(scope="session")
def grading_pipeline():  # type: ignore[no-untyped-def]
    """The grading pipeline with the model under test, loaded once per test session."""
    from retinagrade.pipeline import GradingPipeline

    return GradingPipeline.load(model_under_test(), threads=2)


@pytest.fixture(scope="session")
def model_path() -> Path:
    """Path of the model spec under test (see :func:`model_under_test`)."""
    return model_under_test()


#: Tests that take more than a few seconds, by node-id prefix: the training smoke runs, the tests that load
#: ImageNet weights, the deployment checks (containers, Terraform against moto, workflows) and the runs on a
#: local Ray cluster.
SLOW_TESTS = (
    "tests/model/test_train_smoke.py",
    "tests/model/test_export_parity.py::test_onnx_matches_pytorch",
    "tests/unit/training/test_model.py::test_imagenet_weights",
    "tests/deploy/",
    "tests/integration/",  # a real Orthanc and the CLI as subprocesses
    "tests/cluster/test_engine.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers that must not depend on each file remembering them.

    ``shared_data`` goes on every test whose fixtures reach the ``shared_data`` fixture (directly or through
    another fixture), ``train`` on every test of a module that imported PyTorch, ``slow`` on :data:`SLOW_TESTS`;
    so ``pytest -m "not slow and not shared_data"`` is a fast loop that needs no data.
    """
    del config  # part of the hook's signature
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)
        module = getattr(item, "module", None)
        if module is not None and "torch" in vars(module):
            item.add_marker(pytest.mark.train)
        if item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def paired_model(tmp_path: Path) -> Path:
    """A copy of the model under test whose spec has a fellow-eye rule (weight 0.4, threshold 0.35).

    Lets the pairing tests run whatever rule the shipped model was trained with, or none.
    """
    import json
    import shutil

    spec_path = model_under_test()
    folder = tmp_path / "paired-model"
    shutil.copytree(spec_path.parent, folder, ignore=shutil.ignore_patterns("README.md"))
    copy = folder / spec_path.name
    data = json.loads(copy.read_text())
    data["fellow_eye"] = {"weight": 0.4, "referable_threshold": 0.35}
    copy.write_text(json.dumps(data))
    return copy


@pytest.fixture
def pointed_model(tmp_path: Path) -> Path:
    """A copy of the model under test whose spec names two operating points: balanced (default, risk >= 0.5)
    and sensitive (risk >= 0.05), so the tests of point selection hold whatever points the shipped model has."""
    import json
    import shutil

    spec_path = model_under_test()
    folder = tmp_path / "pointed-model"
    shutil.copytree(spec_path.parent, folder, ignore=shutil.ignore_patterns("README.md"))
    copy = folder / spec_path.name
    data = json.loads(copy.read_text())
    data["operating_points"] = {
        "default": "balanced",
        "points": {
            "balanced": {"threshold": 0.5, "description": "test: risk at least one half"},
            "sensitive": {"threshold": 0.05, "description": "test: risk at least 5%"},
        },
    }
    copy.write_text(json.dumps(data))
    return copy


def build_deflate_bomb(inflated_mib: int) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM file whose dataset inflates to ``inflated_mib`` MiB of zeros
    (one private OB element, written by hand) from a few hundred KB: what a decode budget must stop."""
    import io
    import struct
    import zlib

    from pydicom import uid
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = uid.UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")
    meta.MediaStorageSOPInstanceUID = uid.generate_uid()
    meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    body = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    size = inflated_mib * 1024 * 1024
    parts = [body.compress(struct.pack("<HH", 0x0009, 0x1010) + b"OB\x00\x00" + struct.pack("<I", size))]
    zeros = bytes(1024 * 1024)
    parts += [body.compress(zeros) for _ in range(inflated_mib)]
    parts.append(body.flush())
    return head.getvalue() + b"".join(parts)


@pytest.fixture(scope="session")
def deflate_bomb() -> Callable[[int], bytes]:
    """:func:`build_deflate_bomb`, for the DICOM tests (needs pydicom)."""
    pytest.importorskip("pydicom", reason="needs the [dicom] extra (pydicom)")
    return build_deflate_bomb
