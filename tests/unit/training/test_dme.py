"""The DME head: masked loss, optional label files, the network's outputs, and the patient-grouped DME folds."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra (PyTorch)")
pytest.importorskip("timm", reason="needs the [train] extra (timm)")

from retinagrade.inference.model_spec import CAM_CHANNELS, DME_OUTPUT, OUTPUT_NAMES  # noqa: E402
from retinagrade.training.data import Sample  # noqa: E402
from retinagrade.training.model import build_grader  # noqa: E402
from retinagrade.training.train import Feed, Inputs, TrainConfig, _loss, dme_folds  # noqa: E402


def test_unknown_dr_carries_no_dr_loss_and_dme_counts_only_where_labelled() -> None:
    cfg = TrainConfig(label_smoothing=0.1, regression_weight=0.5, dme_weight=2.0)
    logits = torch.tensor([[2.0, 0.5, 0.1, -1.0, 0.3], [0.0, 3.0, 1.0, 1.0, -2.0]])
    regression = torch.tensor([[0.3], [7.0]])
    low, high = torch.tensor([0, 0]), torch.tensor([0, 4])
    alone = _loss(logits[:1], regression[:1], low[:1], high[:1], cfg)
    # the second image (DR unknown: grades 0-4) adds nothing, not even label smoothing toward uniform
    assert torch.isclose(_loss(logits, regression, low, high, cfg), alone)
    dme_logit = torch.tensor([[1.5], [-3.0]])
    labelled = _loss(logits, regression, low, high, cfg, dme_logit, torch.tensor([float("nan"), 1.0]))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([-3.0]), torch.tensor([1.0]))
    assert torch.isclose(labelled, alone + 2.0 * bce)
    none_known = _loss(logits, regression, low, high, cfg, dme_logit, torch.tensor([float("nan")] * 2))
    assert torch.isclose(none_known, alone)


def test_missing_optional_label_files_are_named_once_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    present = tmp_path / "present.csv"
    present.write_text("image,grade\n")
    cfg = TrainConfig(labels=["a.csv"], optional_labels=[str(present), str(tmp_path / "absent.csv")])
    with caplog.at_level(logging.WARNING):
        files = cfg.label_files()
    assert files == ["a.csv", str(present)]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "absent.csv" in lines[0] and "present.csv" not in lines[0]


@pytest.mark.parametrize(("arch", "frozen"), [("tf_efficientnet_lite0", 5), ("resnet18", 2)])
def test_dme_head_adds_an_output_and_a_cam_channel_whose_mean_is_the_output(arch: str, frozen: int) -> None:
    net = build_grader(arch, frozen_stages=frozen, pretrained=False, dme=True).eval()
    assert net.output_names == (*OUTPUT_NAMES, DME_OUTPUT)
    assert net.cam_channels == (*CAM_CHANNELS, DME_OUTPUT)
    with torch.no_grad():
        _, regression, cam, _, dme = net(torch.randn(2, 3, 64, 64))
    assert dme.shape == (2, 1) and cam.shape[1] == len(CAM_CHANNELS) + 1
    means = cam.mean(dim=(2, 3))
    assert torch.allclose(means[:, CAM_CHANNELS.index("regression")], regression[:, 0], atol=1e-4)
    assert torch.allclose(means[:, -1], dme[:, 0], atol=1e-4)
    # without the head the network is 0.2.0's: four outputs, six channels
    plain = build_grader(arch, frozen_stages=frozen, pretrained=False).eval()
    with torch.no_grad():
        outputs = plain(torch.randn(1, 3, 64, 64))
    assert len(outputs) == 4 and outputs[2].shape[1] == len(CAM_CHANNELS) and plain.output_names == OUTPUT_NAMES


def _inputs(samples: list[Sample]) -> Inputs:
    low = np.array([s.grade_bounds[0] for s in samples])
    high = np.array([s.grade_bounds[1] for s in samples])
    return Inputs(samples, low, high, Feed(TrainConfig(), np.zeros((len(samples), 1, 1, 3), np.uint8), None))


def test_dme_folds_are_patient_grouped_within_the_mexican_photos() -> None:
    samples = []
    for p in range(40):
        source = "mexico-512" if p < 20 else "mexico-dme"
        for shot in range(3):
            dme = None if source == "mexico-dme" and p == 39 else bool(p % 3 == 0)
            samples.append(Sample(Path(f"{p}_{shot}.jpg"), 0, f"mexico:M{p}", source, dme=dme))
    samples += [Sample(Path(f"e{i}.jpg"), 2, f"eyepacs:{i}", "eyepacs-768") for i in range(10)]
    inputs = _inputs(samples)
    folds = dme_folds(inputs, 5, seed=0)
    assert (folds[-10:] == -1).all() and (folds[117:120] == -1).all()  # other sources and unlabelled photos
    member = folds >= 0
    assert sorted(set(folds[member].tolist())) == [0, 1, 2, 3, 4]
    for group in set(inputs.groups[member].tolist()):
        assert len(set(folds[inputs.groups == group].tolist())) == 1
    for k in range(5):  # every fold holds both sources and both labels
        part = folds == k
        assert {"mexico-512", "mexico-dme"} <= set(inputs.sources[part].tolist())
        assert set(inputs.dme[part].tolist()) == {0.0, 1.0}


def test_grade_0_photos_of_the_named_sources_become_dme_negatives_and_nothing_else_changes() -> None:
    from pathlib import Path

    from retinagrade.training.data import Sample
    from retinagrade.training.train import with_dme_negatives

    samples = [
        Sample(Path("a.jpg"), 0, "g:a", "aptos2019-224"),  # no DR: no oedema
        Sample(Path("b.jpg"), 2, "g:b", "aptos2019-224"),  # DR: oedema unknown
        Sample(Path("c.jpg"), 0, "g:c", "odir-400"),  # a source not named
        Sample(Path("d.jpg"), 0, "g:d", "mexico-512", dme=True),  # an explicit label wins
        Sample(Path("e.jpg"), -1, "g:e", "aptos2019-224", grade_range=(0, 4)),  # unknown grade
    ]
    labelled = with_dme_negatives(samples, ["aptos2019-224", "mexico-512"])
    assert [s.dme for s in labelled] == [False, None, None, True, None]
