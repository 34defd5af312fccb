"""The ImageNet weight mapping and the network's outputs (needs the [train] extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra (PyTorch)")
pytest.importorskip("timm", reason="needs the [train] extra (timm)")

from retinagrade.training.model import build_grader, create_backbone  # noqa: E402


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_imagenet_weights_map_onto_timm_and_recognise_a_cat(arch: str) -> None:
    from PIL import Image
    from skimage import data

    size = 224 if arch.endswith("0") else 260
    model = create_backbone(arch).eval()
    cat = np.asarray(Image.fromarray(data.chelsea()).resize((size, size), Image.BILINEAR), dtype=np.float32)
    x = torch.from_numpy((cat - 127.0) / 128.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    # ImageNet classes 281-285 are domestic cats; 285 is "Egyptian cat"
    assert int(probs.argmax()) in range(281, 286)
    assert float(probs[281:286].sum()) > 0.5


def test_mapping_refuses_a_mismatched_state_dict(tmp_path: Path) -> None:
    bad = {"a": torch.zeros(3)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError):
        create_backbone("tf_efficientnet_lite0", weights=tmp_path / "bad.pth")


def test_cam_mean_equals_outputs_and_stem_is_split() -> None:
    net = build_grader("tf_efficientnet_lite0", frozen_stages=6, pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits, regression, cam, embedding = net(x)
    assert logits.shape == (2, 5) and regression.shape == (2, 1) and cam.shape == (2, 6, 7, 7)
    assert embedding.shape == (2, net.tail.num_features)
    assert torch.allclose(cam.mean(dim=(2, 3))[:, :5], logits, atol=1e-4)
    assert torch.allclose(cam.mean(dim=(2, 3))[:, 5:], regression, atol=1e-4)
    assert len(net.stem.blocks) == 6 and len(net.tail.blocks) == 1


@pytest.mark.parametrize(("arch", "frozen"), [("tf_efficientnet_lite0", 5), ("resnet18", 2), ("mobilenetv2_100", 3)])
def test_backbone_contract(arch: str, frozen: int) -> None:
    """Every registered family: named outputs, CAM channels whose spatial mean is the output, and a stem/tail
    split that composes to exactly the backbone's own feature extractor (random weights, tiny input)."""
    from retinagrade.inference.model_spec import CAM_CHANNELS

    # Same seed, same timm constructor: the grader's backbone and the reference start from identical weights.
    torch.manual_seed(0)
    net = build_grader(arch, frozen_stages=frozen, pretrained=False).eval()
    torch.manual_seed(0)
    reference = create_backbone(arch, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, regression, cam, embedding = net(x)
        fmap = net.tail.feature_map(net.stem(x))
        expected = reference.forward_features(x)
    assert logits.shape == (2, 5) and regression.shape == (2, 1)
    assert cam.shape[:2] == (2, len(CAM_CHANNELS)) and embedding.shape == (2, net.tail.num_features)
    assert torch.allclose(cam.mean(dim=(2, 3))[:, :5], logits, atol=1e-4)
    assert torch.allclose(cam.mean(dim=(2, 3))[:, CAM_CHANNELS.index("regression")], regression[:, 0], atol=1e-4)
    assert torch.allclose(fmap, expected, atol=1e-5)
    assert torch.allclose(embedding, expected.mean(dim=(2, 3)), atol=1e-5)


def test_unknown_backbone_is_refused_with_the_registered_names() -> None:
    with pytest.raises(ValueError, match=r"registered: .*tf_efficientnet_lite0"):
        build_grader("not_a_net", frozen_stages=1, pretrained=False)
