"""The preprocessing stages composed: decoded image -> located, cropped, normalised model input."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from retinagrade.preprocessing.decode import DecodedImage
from retinagrade.preprocessing.fundus import (
    FundusCrop,
    FundusGeometry,
    crop_to_fundus,
    enhance_local_contrast,
    locate_fundus,
    to_tensor,
)


@dataclass(frozen=True)
class PreprocessConfig:
    """Every preprocessing parameter; saved in the model spec so training and serving cannot drift apart.

    Attributes:
        input_size: side of the square model input, in pixels.
        decode_min_side: a JPEG may be decoded at reduced scale while its shorter side stays this long.
        contrast_sigma: Gaussian sigma of the local-average subtraction, as a fraction of ``input_size``.
        contrast_weight: gain applied to ``image - local average``.
        mask_margin: rim of the disc (fraction of its radius) set to neutral grey, where the rim glare lives.
        mean, std: per-channel normalisation of the uint8 model input.
    """

    input_size: int = 224
    decode_min_side: int = 448
    contrast_sigma: float = 1.0 / 30.0
    contrast_weight: float = 4.0
    mask_margin: float = 0.03
    mean: tuple[float, float, float] = (128.0, 128.0, 128.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)


@dataclass(frozen=True)
class PreparedImage:
    """What preprocessing hands to the quality gate and the model.

    Attributes:
        geometry: where the field of view was found in the decoded image.
        crop: the square crop of the field of view (raw colours) with its disc mask.
        model_image: S x S x 3 uint8 after local-contrast normalisation; :func:`batch_tensor` makes the batch.
    """

    geometry: FundusGeometry
    crop: FundusCrop
    model_image: np.ndarray


def prepare_fundus(decoded: DecodedImage, config: PreprocessConfig) -> PreparedImage:
    """Locate the fundus, crop it to a square of ``config.input_size`` and normalise its contrast."""
    geometry = locate_fundus(decoded.rgb)
    crop = crop_to_fundus(decoded.rgb, geometry, config.input_size)
    model_image = enhance_local_contrast(
        crop,
        sigma_fraction=config.contrast_sigma,
        weight=config.contrast_weight,
        mask_margin=config.mask_margin,
    )
    return PreparedImage(geometry=geometry, crop=crop, model_image=model_image)


def batch_tensor(images: list[np.ndarray], config: PreprocessConfig) -> np.ndarray:
    """N x 3 x S x S float32 model input from prepared uint8 images."""
    return to_tensor(images, config.mean, config.std)
