"""DICOM input: real fundus photos stored in every accepted transfer syntax decode to the same pixels, camera
JPEGs wrapped as OP instances decode exactly as the JPEG file does, and bad DICOM input is a clear 4xx."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom", reason="needs the [dicom] extra (pydicom)")

from pydicom import uid  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import apply_color_lut, convert_color_space  # noqa: E402

from retinagrade.errors import InputError  # noqa: E402
from retinagrade.interop.photo import PhotoIdentity, pixels_to_dicom, to_bytes, wrap_jpeg  # noqa: E402
from retinagrade.preprocessing.decode import decode_image, is_dicom  # noqa: E402
from retinagrade.preprocessing.dicom import decode_dicom  # noqa: E402

DCMTK_REASON = "needs DCMTK's dcmcjpeg (Debian package dcmtk) to encode JPEG lossless / extended fixtures"


@pytest.fixture(scope="module")
def photo(left_eye_photo: Path) -> np.ndarray:
    """A real fundus photo as RGB, a few hundred pixels across (a camera JPEG is read at reduced scale)."""
    return decode_image(left_eye_photo.read_bytes(), min_side=640).rgb


def _identity(**kwargs: object) -> PhotoIdentity:
    values: dict[str, object] = {"patient_id": "PAT-0001", "laterality": "L"}
    values.update(kwargs)
    return PhotoIdentity(**values)  # type: ignore[arg-type]


def _code(data: bytes, **kwargs: int) -> tuple[str, int]:
    with pytest.raises(InputError) as caught:
        decode_image(data, **kwargs)  # type: ignore[arg-type]
    return caught.value.code, caught.value.http_status


def test_camera_jpeg_in_op_decodes_exactly_like_the_jpeg_file(camera_jpeg: bytes) -> None:
    data = to_bytes(wrap_jpeg(camera_jpeg, _identity(laterality="R")))
    assert is_dicom(data)
    for min_side in (None, 640):
        from_jpeg = decode_image(camera_jpeg, min_side=min_side)
        from_dicom = decode_image(data, min_side=min_side)
        assert from_dicom.format == "DICOM"
        assert from_dicom.original_size == from_jpeg.original_size
        assert np.array_equal(from_dicom.rgb, from_jpeg.rgb)
    # The reduced-scale DCT decode was used (the model needs ~640 px, the camera wrote 3888 px).
    assert decode_image(data, min_side=640).rgb.shape[1] < from_jpeg.original_size[0]


def test_identifiers_travel_as_metadata(camera_jpeg: bytes) -> None:
    ds = wrap_jpeg(camera_jpeg, _identity(laterality="R"))
    decoded = decode_dicom(to_bytes(ds))
    assert decoded.metadata == {
        "PatientID": "PAT-0001",
        "StudyInstanceUID": ds.StudyInstanceUID,
        "SeriesInstanceUID": ds.SeriesInstanceUID,
        "SOPInstanceUID": ds.SOPInstanceUID,
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.5.1",
        "Modality": "OP",
        "ImageLaterality": "R",
    }
    # Laterality given only at series level (Laterality) is used too; "U" (unpaired) means unknown.
    ds.ImageLaterality = "U"
    assert "ImageLaterality" not in decode_dicom(to_bytes(ds)).metadata
    ds.Laterality = "L"
    assert decode_dicom(to_bytes(ds)).metadata["ImageLaterality"] == "L"


LOSSLESS = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.RLELossless,
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
]


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda s: uid.UID(s).keyword)
def test_lossless_syntaxes_give_back_the_photo(photo: np.ndarray, syntax: str, bits: int) -> None:
    ds = pixels_to_dicom(photo, _identity(), syntax, bits=bits)  # type: ignore[arg-type]
    assert ds.file_meta.TransferSyntaxUID == syntax
    decoded = decode_image(to_bytes(ds))
    # 16-bit samples (v * 257) scale back to exactly v: BitsStored sets the range.
    assert np.array_equal(decoded.rgb, photo)
    assert decoded.original_size == (photo.shape[1], photo.shape[0])


@pytest.mark.parametrize(
    ("syntax", "options"),
    [(uid.JPEGLSNearLossless, {"jls_error": 3}), (uid.JPEG2000, {"j2k_cr": [20]})],
    ids=["JPEGLSNearLossless", "JPEG2000"],
)
def test_lossy_syntaxes_stay_close(photo: np.ndarray, syntax: str, options: dict[str, object]) -> None:
    ds = pixels_to_dicom(photo, _identity())
    ds.compress(syntax, photo, generate_instance_uid=False, **options)  # type: ignore[arg-type]
    decoded = decode_image(to_bytes(ds))
    assert decoded.rgb.shape == photo.shape
    assert np.abs(decoded.rgb.astype(int) - photo).mean() < 3.0


def test_planar_configuration_and_ybr(photo: np.ndarray) -> None:
    planar = pixels_to_dicom(photo, _identity(), planar=True)
    assert planar.PlanarConfiguration == 1
    assert np.array_equal(decode_image(to_bytes(planar)).rgb, photo)

    ybr = pixels_to_dicom(photo, _identity())
    ybr.PixelData = convert_color_space(photo, "RGB", "YBR_FULL").tobytes()
    ybr.PhotometricInterpretation = "YBR_FULL"
    assert np.abs(decode_image(to_bytes(ybr)).rgb.astype(int) - photo).max() <= 2


def test_monochrome_photo_is_grey_rgb(photo: np.ndarray) -> None:
    ds = pixels_to_dicom(photo, _identity())
    grey = photo[:, :, 1].copy()
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    del ds.PlanarConfiguration
    ds.PixelData = grey.tobytes()
    rgb = decode_image(to_bytes(ds)).rgb
    assert np.array_equal(rgb[:, :, 0], grey) and np.array_equal(rgb[:, :, 2], grey)
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert np.array_equal(decode_image(to_bytes(ds)).rgb[:, :, 1], 255 - grey)


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason=DCMTK_REASON)
@pytest.mark.parametrize(
    ("flags", "syntax", "tolerance"),
    [
        (["+e1"], uid.JPEGLosslessSV1, 0.0),
        (["+el"], uid.JPEGLossless, 0.0),
        (["+ee", "+q", "95"], uid.JPEGExtended12Bit, 3.0),
        (["+eb", "+cr", "+q", "95"], uid.JPEGBaseline8Bit, 3.0),  # RGB without colour transform: pydicom path
    ],
    ids=["JPEGLosslessSV1", "JPEGLossless", "JPEGExtended", "JPEGBaselineRGB"],
)
def test_dcmtk_encoded_jpeg_syntaxes(
    photo: np.ndarray, tmp_path: Path, flags: list[str], syntax: str, tolerance: float
) -> None:
    source, target = tmp_path / "in.dcm", tmp_path / "out.dcm"
    source.write_bytes(to_bytes(pixels_to_dicom(photo, _identity())))
    subprocess.run(["dcmcjpeg", *flags, str(source), str(target)], check=True, capture_output=True, timeout=120)
    data = target.read_bytes()
    assert pydicom.dcmread(target).file_meta.TransferSyntaxUID == syntax
    decoded = decode_image(data)
    assert decoded.rgb.shape == photo.shape
    assert np.abs(decoded.rgb.astype(int) - photo).mean() <= tolerance


def test_secondary_capture_and_vl_photographic_are_accepted(synthetic_fundus) -> None:
    rgb = synthetic_fundus(64, 48, 32, 24, 20)
    for sop_class in ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.77.1.4"):
        ds = pixels_to_dicom(rgb, _identity())
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        assert np.array_equal(decode_image(to_bytes(ds)).rgb, rgb)


# -- bad input: each a 4xx with a stable code -------------------------------------------------------------


def test_no_pixel_data(synthetic_fundus) -> None:
    ds = pixels_to_dicom(synthetic_fundus(64, 48, 32, 24, 20), _identity())
    del ds.PixelData
    assert _code(to_bytes(ds)) == ("dicom_no_pixel_data", 422)


def test_unsupported_transfer_syntax(synthetic_fundus) -> None:
    ds = pixels_to_dicom(synthetic_fundus(64, 48, 32, 24, 20), _identity())
    ds.file_meta.TransferSyntaxUID = uid.MPEG4HP41  # a video stream, not a photo
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])
    assert _code(to_bytes(ds)) == ("dicom_unsupported_transfer_syntax", 415)


def test_ct_image_is_refused() -> None:
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # type: ignore[arg-type]
    code, status = _code(data)
    assert (code, status) == ("dicom_not_photograph", 422)


def test_structured_report_is_refused() -> None:
    data = Path(get_testdata_file("test-SR.dcm")).read_bytes()  # type: ignore[arg-type]
    assert _code(data)[1] == 422


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95, 0.999])
@pytest.mark.parametrize("syntax", [uid.ExplicitVRLittleEndian, uid.RLELossless, "camera-jpeg"])
def test_truncated_file(synthetic_fundus, fraction: float, syntax: str) -> None:
    rgb = synthetic_fundus(200, 150, 100, 75, 70)
    if syntax == "camera-jpeg":
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
        ds = wrap_jpeg(buffer.getvalue(), _identity())
    else:
        ds = pixels_to_dicom(rgb, _identity(), syntax)
    data = to_bytes(ds)
    decode_image(data)  # whole, it decodes
    assert _code(data[: int(len(data) * fraction)]) == ("corrupt_image", 400)


def test_multiframe_is_refused_like_any_file_of_several_pictures(synthetic_fundus) -> None:
    rgb = synthetic_fundus(64, 48, 32, 24, 20)
    ds = pixels_to_dicom(rgb, _identity())
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([rgb, rgb]).tobytes()
    assert _code(to_bytes(ds)) == ("multi_frame_not_supported", 422)
    with pytest.raises(InputError) as caught:
        decode_image(to_bytes(ds))
    assert caught.value.metadata["PatientID"] == "PAT-0001"  # whose photo it is travels with the error


def test_pixel_limit_is_checked_before_decoding(synthetic_fundus) -> None:
    ds = pixels_to_dicom(synthetic_fundus(64, 48, 32, 24, 20), _identity())
    assert _code(to_bytes(ds), max_pixels=1000) == ("image_too_large", 413)


def test_without_pydicom_a_dicom_file_says_how_to_enable_it(synthetic_fundus, monkeypatch) -> None:
    data = to_bytes(pixels_to_dicom(synthetic_fundus(64, 48, 32, 24, 20), _identity()))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` raise ImportError
    monkeypatch.delitem(sys.modules, "retinagrade.preprocessing.dicom")
    with pytest.raises(InputError) as caught:
        decode_image(data)
    assert (caught.value.code, caught.value.http_status) == ("dicom_support_missing", 415)
    assert "retinagrade[dicom]" in caught.value.message


def test_decode_cost_is_estimated_from_the_header(camera_jpeg: bytes, photo: np.ndarray) -> None:
    from retinagrade.preprocessing.dicom import decoded_bytes_dicom

    wrapped = to_bytes(wrap_jpeg(camera_jpeg, _identity()))
    reduced, full = decoded_bytes_dicom(wrapped, min_side=640), decoded_bytes_dicom(wrapped)
    decoded = decode_image(wrapped, min_side=640).rgb
    assert reduced == decoded.shape[0] * decoded.shape[1] * 7  # Pillow's 4-byte pixels + the RGB array
    assert full > 10 * reduced
    eight = decoded_bytes_dicom(to_bytes(pixels_to_dicom(photo, _identity())))
    sixteen = decoded_bytes_dicom(to_bytes(pixels_to_dicom(photo, _identity(), bits=16)))
    assert eight == photo.shape[0] * photo.shape[1] * 6 and sixteen > eight
    assert decoded_bytes_dicom(b"\0" * 128 + b"DICM") == 0  # unreadable: decode_dicom says why


@pytest.mark.parametrize(
    "name",
    [
        "SC_ybr_full_422_uncompressed.dcm",  # YBR_FULL_422, native (chroma subsampled storage)
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL
        "SC_jpeg_no_color_transform.dcm",  # JPEG baseline, RGB without colour transform
        "SC_rgb_rle_16bit.dcm",  # RLE, 16 bits
        "SC_rgb_jls_lossy_line.dcm",  # JPEG-LS near-lossless
        "GDCMJ2K_TextGBR.dcm",  # JPEG 2000, YBR_RCT
        "JPGExtended.dcm",  # JPEG extended, 12-bit monochrome
        "examples_palette.dcm",  # PALETTE COLOR (an ultrasound frame, presented here as a secondary capture)
    ],
)
def test_encoder_variety_from_other_toolkits_matches_pydicom(name: str) -> None:
    """Files written by DCMTK, GDCM and others decode to pydicom's own reference pixels, as 8-bit RGB."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    buffer = io.BytesIO()
    ds.save_as(buffer)
    decoded = decode_image(buffer.getvalue()).rgb
    reference = ds.pixel_array.astype(np.float64)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        reference = apply_color_lut(ds.pixel_array, ds).astype(np.float64) / 257.0
    elif int(ds.BitsStored) > 8:
        reference = reference * 255.0 / (2 ** int(ds.BitsStored) - 1)
    if reference.ndim == 2:
        reference = np.repeat(reference[:, :, None], 3, axis=2)
    assert decoded.shape == reference.shape
    assert np.abs(decoded - reference).mean() < 2.0
