"""The v3 levers on tiny inputs: contrastive loss, flip TTA in the graph, tail ensembles, held-out averaging."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [train] extra (PyTorch)")
pytest.importorskip("timm", reason="needs the [train] extra (timm)")

from retinagrade.training.ensemble import average_held_out, referable_auc_by_source  # noqa: E402
from retinagrade.training.model import FlipAveraged, TailEnsemble, build_grader, export_onnx  # noqa: E402
from retinagrade.training.train import supervised_contrastive  # noqa: E402


def test_contrastive_loss_pulls_one_grade_together_across_sources_only() -> None:
    grades = torch.tensor([0, 0, 2, 2])
    sources = torch.tensor([0, 1, 0, 1])
    aligned = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    crossed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    assert supervised_contrastive(aligned, grades, sources, 0.1) < supervised_contrastive(crossed, grades, sources, 0.1)
    # same grade within one source is no positive pair; a grade range (-1) is never one either
    one_source = supervised_contrastive(aligned, grades, torch.zeros(4, dtype=torch.long), 0.1)
    ranges = supervised_contrastive(aligned, torch.tensor([-1, -1, 2, 3]), sources, 0.1)
    assert float(one_source) == 0.0 and float(ranges) == 0.0
    embedding = aligned.clone().requires_grad_(True)
    supervised_contrastive(embedding, grades, sources, 0.1).backward()
    assert embedding.grad is not None and torch.isfinite(embedding.grad).all()


def _check_cam(outputs: tuple[torch.Tensor, ...]) -> None:
    logits, regression, cam, _, dme = outputs
    means = cam.mean(dim=(2, 3))
    assert torch.allclose(means[:, :5], logits, atol=1e-4)
    assert torch.allclose(means[:, 5], regression[:, 0], atol=1e-4)
    assert torch.allclose(means[:, 6], dme[:, 0], atol=1e-4)


def test_flip_tta_averages_the_photo_and_its_mirror_and_keeps_the_cam_contract(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_grader("tf_efficientnet_lite0", frozen_stages=5, pretrained=False, dme=True).eval()
    tta = FlipAveraged(net).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, plain, mirrored = tta(x), net(x), net(torch.flip(x, dims=[3]))
        symmetric = torch.cat([x[..., :32], torch.flip(x[..., :32], dims=[3])], dim=3)
        same = [torch.allclose(a, b, atol=1e-5) for a, b in zip(tta(symmetric), net(symmetric), strict=True)]
    assert torch.allclose(out[0], (plain[0] + mirrored[0]) / 2, atol=1e-5)
    assert torch.allclose(out[4], (plain[4] + mirrored[4]) / 2, atol=1e-5)
    assert torch.allclose(out[2], (plain[2] + torch.flip(mirrored[2], dims=[3])) / 2, atol=1e-5)
    # a mirror-symmetric photo gets the plain answer (not the plain CAM: TF "same" padding is not symmetric)
    assert same[:2] + same[3:] == [True] * 4
    _check_cam(out)
    import onnxruntime as ort

    export_onnx(tta, tmp_path / "tta.onnx", 64)
    session = ort.InferenceSession(str(tmp_path / "tta.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(net.output_names)
    onnx_logits = session.run(["logits"], {"input": x.numpy()})[0]
    np.testing.assert_allclose(onnx_logits, out[0].numpy(), atol=1e-4)


def test_tail_ensemble_runs_the_stem_once_and_averages_the_tails(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = build_grader("tf_efficientnet_lite0", frozen_stages=5, pretrained=False, dme=True).eval()
    b = build_grader("tf_efficientnet_lite0", frozen_stages=5, pretrained=False, dme=True).eval()
    ensemble = TailEnsemble(a.stem, [a.tail, b.tail]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = ensemble(x)
        features = a.stem(x)
        expected = [(p + q) / 2 for p, q in zip(a.tail(features), b.tail(features), strict=True)]
    assert all(torch.allclose(o, e, atol=1e-5) for o, e in zip(out, expected, strict=True))
    _check_cam(out)
    export_onnx(ensemble, tmp_path / "ensemble.onnx", 64)
    import onnx

    graph = onnx.load(str(tmp_path / "ensemble.onnx")).graph
    assert [o.name for o in graph.output] == list(a.output_names)
    plain = build_grader("tf_efficientnet_lite0", frozen_stages=5, pretrained=False).eval()
    with pytest.raises(ValueError, match="same outputs"):
        TailEnsemble(a.stem, [a.tail, plain.tail])


def _held_out(path: Path, held: list[bool], logits: np.ndarray, images: list[str]) -> Path:
    n = len(held)
    np.savez(
        path,
        logits=logits.astype(np.float32),
        regression=np.zeros(n, np.float32),
        logit_dme=logits[:, 0].astype(np.float32),
        held=np.array(held),
        image=np.array(images),
        source=np.array(["eyepacs-768"] * 2 + ["mexico-512"] * 2),
        group=np.array(["g1", "g2", "g3", "g4"]),
        grade_low=np.array([0, 3, 0, 4]),
        grade_high=np.array([0, 3, 0, 4]),
    )
    return path


def test_held_out_logits_of_runs_average_over_the_runs_that_held_each_image(tmp_path: Path) -> None:
    images = ["a", "b", "c", "d"]
    one = np.tile(np.array([[1.0, 0, 0, 0, 0]]), (4, 1))
    two = np.tile(np.array([[3.0, 0, 0, 0, 0]]), (4, 1))
    # run 1 held out both sources, run 2 only eyepacs-768 (e.g. another seed of one LOSO fit)
    r1 = _held_out(tmp_path / "r1.npz", [True] * 4, one, images)
    r2 = _held_out(tmp_path / "r2.npz", [True, True, False, False], two, images)
    mean = average_held_out([r1, r2])
    np.testing.assert_allclose(mean["logits"][:, 0], [2.0, 2.0, 1.0, 1.0])
    np.testing.assert_allclose(mean["logit_dme"], [2.0, 2.0, 1.0, 1.0])
    assert mean["n_models"].tolist() == [2, 2, 1, 1] and mean["held"].all()
    scores = referable_auc_by_source(mean)
    assert set(scores) == {"eyepacs-768", "mexico-512"} and scores["eyepacs-768"]["n"] == 2
    other = _held_out(tmp_path / "r3.npz", [True] * 4, one, ["a", "b", "c", "x"])
    with pytest.raises(ValueError, match="other images"):
        average_held_out([r1, other])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_lite1_and_lite2_load_imagenet_weights_and_keep_the_contract_at_384(arch: str) -> None:
    net = build_grader(arch, frozen_stages=5, pretrained=True, dme=True).eval()
    with torch.no_grad():
        outputs = net(torch.randn(1, 3, 384, 384))
    assert outputs[2].shape[-2:] == (12, 12)  # stride 32
    _check_cam(outputs)


def test_flip_tta_predicts_from_the_cached_mirror_view_never_drawn_in_training() -> None:
    from retinagrade.training.cache import ViewStack
    from retinagrade.training.train import Feed, TrainConfig

    views = [np.full((3, 2), v, np.float16) for v in range(4)]  # clean, 2 standard, mirrored
    feed = Feed(TrainConfig(flip_tta=True), np.zeros((3, 1, 1, 3), np.uint8), ViewStack(views), None, np.arange(3))
    rng = np.random.default_rng(0)
    idx = np.arange(3)
    assert float(feed.batch(idx, rng, train=False).max()) == 0.0
    assert float(feed.batch(idx, rng, train=False, flipped=True).min()) == 3.0
    drawn = {float(v) for _ in range(20) for v in feed.batch(idx, rng, train=True)[:, 0]}
    assert drawn <= {0.0, 1.0, 2.0}
    plain = Feed(TrainConfig(), np.zeros((3, 1, 1, 3), np.uint8), ViewStack(views[:3]))
    with pytest.raises(ValueError, match="needs flip_tta"):
        plain.batch(idx, rng, train=False, flipped=True)


def test_any_config_field_can_be_set_from_the_command_line_and_unknown_ones_are_refused(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from retinagrade.cli import app
    from retinagrade.cli.training import _config_settings

    assert _config_settings(["flip_tta=true", "contrastive_weight=0.1", "loso=[a, b]"]) == {
        "flip_tta": True,
        "contrastive_weight": 0.1,
        "loso": ["a", "b"],
    }
    result = CliRunner().invoke(app, ["train", "--labels", str(tmp_path / "x.csv"), "--set", "fliptta=true"])
    assert result.exit_code == 2 and "fliptta" in result.output


def test_one_held_out_source_or_one_dme_fold_per_process_runs_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from retinagrade import cli
    from retinagrade.training import train

    seen: list[train.TrainConfig] = []
    monkeypatch.setattr(train, "run", lambda cfg: seen.append(cfg) or {})
    config = tmp_path / "c.yaml"
    config.write_text("labels: [x.csv]\nloso: [a, b]\ndme_weight: 0.5\ndme_folds: 5\nfolds: 0\n")
    runner = CliRunner()
    assert runner.invoke(cli.app, ["train", "--config", str(config), "--loso", "a", "--no-final"]).exit_code == 0
    assert runner.invoke(cli.app, ["train", "--config", str(config), "--dme-fold", "3"]).exit_code == 0
    assert runner.invoke(cli.app, ["train", "--config", str(config)]).exit_code == 0
    held_out, fold, everything = seen
    assert (held_out.loso, held_out.dme_folds, held_out.train_final) == (["a"], 0, False)
    assert (fold.loso, fold.dme_folds, fold.run_dme_folds, fold.train_final) == ([], 5, [3], False)
    assert (everything.loso, everything.dme_folds, everything.train_final) == (["a", "b"], 5, True)
