"""Training runs (a couple of steps), resume, DistributedDataParallel, export parity, evaluation."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import load_checkpoint, save_checkpoint
from models.onnx import export_onnx
from tests.conftest import make_model
from training import evaluate, export, train
from training.data import Dataset
from training.export import check_parity

ROOT = Path(__file__).resolve().parents[1]


def train_args(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--cache-dir", str(cache), "--output", str(out), "--batch-size", "32",
            "--eval-images", "20", "--eval-attack-images", "8", "--threads", "1", *extra]


def test_two_step_pgd_run_writes_a_servable_checkpoint(tiny_cifar_tar: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train.main(train_args(tiny_cifar_tar, out, tmp_path / "cache", "--epochs", "1", "--max-steps", "2",
                          "--attack", "pgd", "--steps", "2", "--sigma", "0.1", "--samples", "4"))
    _, manifest = load_checkpoint(out / "checkpoint")
    record = manifest.training
    assert manifest.spec.smoothing.sigma == 0.1 and manifest.spec.smoothing.default_samples == 4
    assert record["config"]["attack"] == "pgd" and record["config"]["steps"] == 2
    assert len(record["data"]["sha256"]) == 64 and record["data"]["train_images"] == 400
    assert record["history"][0]["steps"] == 2 and 0 <= record["history"][0]["test_clean_acc"] <= 1
    assert (out / "state.pt").is_file() and len((out / "log.jsonl").read_text().splitlines()) == 1


def test_fgsm_pni_run(tiny_cifar_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "pni"
    train.main(train_args(tiny_cifar_folder, out, tmp_path / "cache", "--epochs", "1", "--max-steps", "2",
                          "--attack", "fgsm", "--pni", "channel"))
    _, manifest = load_checkpoint(out / "checkpoint")
    assert manifest.spec.noise_layers.type == "pni-w" and manifest.spec.noise_layers.mode == "channel"


def test_resume_continues_from_the_last_epoch(tiny_cifar_tar: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "resume"
    common = train_args(tiny_cifar_tar, out, tmp_path / "cache", "--attack", "fgsm", "--train-images", "200",
                        "--batch-size", "50")
    train.main([*common, "--epochs", "1"])
    train.main([*common, "--epochs", "2"])
    assert "resuming" in capsys.readouterr().out
    _, manifest = load_checkpoint(out / "checkpoint")
    history = manifest.training["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["steps"] == 8  # 4 steps per epoch, continued rather than restarted
    assert manifest.training["complete"]
    # the same command again: nothing to train, said so, and the checkpoint left as it was
    train.main([*common, "--epochs", "2"])
    assert "has already trained 2 epochs (--epochs 2): nothing to do" in capsys.readouterr().out
    _, again = load_checkpoint(out / "checkpoint")
    assert again.weights.sha256 == manifest.weights.sha256 and again.training["history"] == history


@pytest.mark.parametrize("flag", ["--epochs", "--batch-size", "--max-steps"])
def test_counts_below_one_are_refused_before_any_data_loads(flag: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        train.main(["--data", str(tmp_path / "no-data"), "--output", str(tmp_path / "x"), flag, "0"])
    assert refused.value.code == 2
    assert f"argument {flag}: must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_distributed_data_parallel_on_two_cpu_processes(tiny_cifar_tar: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train",
           *train_args(tiny_cifar_tar, out, tmp_path / "cache", "--epochs", "1", "--max-steps", "3",
                       "--attack", "fgsm")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    _, manifest = load_checkpoint(out / "checkpoint")
    assert manifest.training["world_size"] == 2
    assert manifest.training["history"][0]["steps"] == 3


def test_onnx_export_matches_pytorch(tmp_path: Path) -> None:
    model, spec = make_model(sigma=0.25)
    path = export_onnx(model, spec, tmp_path / "m.onnx")
    result = check_parity(model, path, spec.smoothing.sigma, atol=1e-4)
    assert result["max_abs_diff"] < 1e-4 and result["noise_in_graph"] is True
    assert result["provider"] == "CPUExecutionProvider"
    assert not model.training  # exporting must not flip the caller's model into train mode


def test_onnx_export_refuses_pni(tmp_path: Path) -> None:
    model, spec = make_model(pni="layer")
    with pytest.raises(ValueError, match="PNI"):
        export_onnx(model, spec, tmp_path / "m.onnx")


def test_export_cli_on_pni_checkpoint_writes_canary_but_no_onnx(
        tmp_path: Path, tiny_cifar_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, spec = make_model(pni="layer")
    save_checkpoint(tmp_path / "pni", model, spec, name="pni")
    monkeypatch.chdir(tmp_path)  # the canary's decoded-data cache goes under the working directory
    with pytest.raises(SystemExit, match="PNI-W"):
        export.main([str(tmp_path / "pni")])
    export.main([str(tmp_path / "pni"), "--canary", "4", "--data", str(tiny_cifar_folder)])
    assert (tmp_path / "pni" / "canary.safetensors").is_file()
    assert not (tmp_path / "pni" / "model.onnx").exists()


def test_evaluate_writes_table_json_and_plot(tiny_checkpoint: Path, tiny_cifar_tar: Path, tmp_path: Path) -> None:
    out = tiny_checkpoint / "eval" / "knob"  # where the README's model table reads it
    evaluate.main([str(tiny_checkpoint), "--data", str(tiny_cifar_tar), "--cache-dir", str(tmp_path / "c"),
                   "--images", "8", "--samples", "1,2,16", "--sigmas", "0.5,0.25", "--steps", "2", "--eot", "2",
                   "--adaptive-samples", "2", "--output", str(out), "--threads", "1"])
    report = json.loads((out / "eval.json").read_text())
    assert len(report["results"]) == 2 * 5 * 3  # sigmas x (4 attacks + worst) x m
    for row in report["results"]:
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
        assert ("agreement" in row) == (row["attack"] != "worst")
    assert report["data"]["images"] == 8 and report["attack"]["eot_draws"] == 2
    rows = {(r["sigma"], r["attack"], r["samples"]): r for r in report["results"]}
    for sigma in (0.5, 0.25):
        for m in (1, 2, 16):  # the worst case is never above any attack's accuracy on the same images
            worst = rows[(sigma, "worst", m)]["correct"]
            assert worst <= min(rows[(sigma, a, m)]["correct"] for a in ("pgd", "eot", "adaptive"))
    gains = {(g["sigma"], g["attack"], g["samples"]): g for g in report["gain_over_m1"]}
    g = gains[(0.25, "eot", 16)]
    gained = rows[(0.25, "eot", 16)]["correct"] - rows[(0.25, "eot", 1)]["correct"]
    assert g["difference"] == pytest.approx(gained / 8)
    cert = [c for c in report["certified"] if c["sigma"] == 0.25]
    assert {c["samples"] for c in cert} == {1, 2, 16} and {c["radius"] for c in cert} == {0, 0.0625, 0.125, 0.25, 0.5}
    # CERTIFY at alpha 0.001 needs at least 10 unanimous copies: m = 1 and 2 always abstain.
    assert all(c["correct"] == 0 for c in cert if c["samples"] < 10)
    text = (out / "eval.md").read_text()
    assert "| 0.25 | adaptive |" in text and "Repeatability" in text and "Certified accuracy" in text
    header = text.split("**Accuracy")[0]  # it describes the attacks that ran, and only those
    assert "pgd/eot/adaptive: 2 steps" in header and "eot = 2 noise draws" in header and "APGD" not in header
    assert evaluate.to_markdown(report) == text  # eval.json alone renders eval.md again
    clean_only = {**report, "results": [r for r in report["results"] if r["attack"] == "clean"], "gain_over_m1": []}
    assert "steps" not in evaluate.to_markdown(clean_only).split("**Accuracy")[0]
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    # the README's model table is made from this file: the checkpoint's sigma (0.25) row, at m = 16
    from training.model_table import table

    text = table([tiny_checkpoint], None)
    clean16 = 100 * rows[(0.25, "clean", 16)]["accuracy"]
    worst = [100 * rows[(0.25, "worst", m)]["accuracy"] for m in (1, 16)]
    images = json.loads((out / "eval.json").read_text())["data"]["images"]
    # the table's columns are m = 1 / 16 / 64 / 256: "-" where the evaluation did not run that m
    assert f"| `tiny` | 0.25 | {images} | {clean16:.1f} | {worst[0]:.1f} / {worst[1]:.1f} / - / - |" in text


def test_evaluate_answers_with_each_rule_from_the_same_copies(lively_checkpoint: Path, tiny_cifar_tar: Path,
                                                              tmp_path: Path) -> None:
    """--aggregations: every rule reads the same noisy copies of the same adversarial images. So at m = 1 (one
    copy: its argmax is every rule's answer) the rules agree image by image, and the checkpoint's own rule
    (softmax) answers exactly as an evaluation without the flag, same seed. (The model's answers move with
    the noise, so rules that drew copies of their own would differ.)"""
    common = [str(lively_checkpoint), "--data", str(tiny_cifar_tar), "--cache-dir", str(tmp_path / "c"),
              "--images", "40", "--samples", "1,8", "--attacks", "clean,pgd,eot,adaptive-logits", "--steps", "1",
              "--eot", "2", "--adaptive-samples", "2", "--threads", "1"]
    evaluate.main([*common, "--output", str(tmp_path / "one")])
    evaluate.main([*common, "--aggregations", "logits,vote,softmax", "--output", str(tmp_path / "all")])
    one, every = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("one", "all"))
    assert every["aggregations"] == ["logits", "vote", "softmax"] and one["aggregations"] == ["softmax"]
    rows = {(r["aggregation"], r["attack"], r["samples"]): r for r in every["results"]}
    assert len(rows) == len(every["results"]) == 3 * 5 * 2  # rules x (4 attacks + worst) x m
    for attack in ("clean", "pgd", "eot", "adaptive-logits", "worst"):
        assert len({rows[rule, attack, 1]["per_image"] for rule in ("vote", "softmax", "logits")}) == 1, attack
    for r in one["results"]:
        same = rows["softmax", r["attack"], r["samples"]]
        assert (same["per_image"], same.get("agreement")) == (r["per_image"], r.get("agreement")), r["attack"]
    assert len(every["gain_over_m1"]) == 3 * 5 and every["certified"] == one["certified"]
    text = (tmp_path / "all" / "eval.md").read_text()
    assert "| sigma | rule | attack |" in text and "| 0.5 | vote | pgd |" in text
    assert "adaptive-logits = PGD on the mean logits of 2 copies" in text
    assert "(the checkpoint's: softmax)" in text
    assert evaluate.to_markdown(every) == text
    from training.compare import NotComparableError, compare

    with pytest.raises(NotComparableError, match="several aggregation rules"):
        compare(one, every)
    with pytest.raises(SystemExit, match="vote, softmax, logits"):
        evaluate.main([*common, "--aggregations", "median", "--output", str(tmp_path / "bad")])


def test_service_uses_the_checkpoints_own_graph_only_when_it_matches_the_weights(tiny_checkpoint: Path,
                                                                                 tmp_path: Path) -> None:
    from models.onnx import exported_weights
    from service.backends import onnx_graph

    model, manifest = load_checkpoint(tiny_checkpoint)
    cache = tmp_path / "cache"
    # no model.onnx beside the weights: exported once into the cache, checksum recorded
    cached = onnx_graph(model, manifest, tiny_checkpoint, cache)
    assert cached.parent == cache and exported_weights(cached) == manifest.weights.sha256
    export.main([str(tiny_checkpoint)])  # siam export writes model.onnx with the checksum
    shipped = tiny_checkpoint / "model.onnx"
    assert exported_weights(shipped) == manifest.weights.sha256
    assert onnx_graph(model, manifest, tiny_checkpoint, cache) == shipped
    # a stale graph (other weights) beside the checkpoint is not used
    stale = manifest.model_copy(update={"weights": manifest.weights.model_copy(update={"sha256": "0" * 64})})
    assert onnx_graph(model, stale, tiny_checkpoint, cache).parent == cache
    shipped.write_bytes(b"not an onnx file")
    assert exported_weights(shipped) is None


def test_a_run_stopped_mid_epoch_resumes_where_it_stopped_and_matches_an_uninterrupted_one(
        tiny_cifar_tar: Path, tmp_path: Path) -> None:
    """--max-steps inside an epoch leaves the epoch incomplete (not marked done); the resumed run skips the
    steps already taken and, with the random state restored, ends with the very weights of a run that was
    never interrupted."""
    common = ["--attack", "fgsm", "--train-images", "200", "--batch-size", "50", "--epochs", "1"]
    straight, pieces = tmp_path / "straight", tmp_path / "pieces"
    train.main(train_args(tiny_cifar_tar, straight, tmp_path / "cache", *common))
    train.main(train_args(tiny_cifar_tar, pieces, tmp_path / "cache", *common, "--max-steps", "2"))
    stopped = load_checkpoint(pieces / "checkpoint")[1].training
    assert not stopped["complete"] and stopped["epochs_completed"] == 0 and stopped["stopped_at_step"] == 2
    train.main(train_args(tiny_cifar_tar, pieces, tmp_path / "cache", *common))
    resumed_model, resumed = load_checkpoint(pieces / "checkpoint")
    assert resumed.training["complete"] and resumed.training["epochs_completed"] == 1
    history = resumed.training["history"]
    assert [h["epoch"] for h in history] == [1] and history[0]["steps"] == 4
    straight_model, _ = load_checkpoint(straight / "checkpoint")
    for (name, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_per_epoch_check_leaves_weights_and_batchnorm_statistics_alone() -> None:
    """The check runs on test images: a train-mode forward there would fold their statistics into every
    BatchNorm running mean and variance (the leak of the checkpoints trained before 3dd85fc)."""
    model, spec = make_model(sigma=0.1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    test = Dataset(torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=generator),
                   torch.randint(0, 10, (12,), generator=generator), tuple("abcdefghij"), "made here", "", "png")
    args = argparse.Namespace(eval_images=6, eval_attack_images=6)
    record = train.evaluate_epoch(args, model, spec, test, torch.device("cpu"))
    assert record["eval_images"] == 6 and record["eval_attack_images"] == 6
    assert model.training, "training goes on in train mode"
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_trades_run_records_beta_and_no_clean_weight(tiny_cifar_tar: Path, tmp_path: Path) -> None:
    out = tmp_path / "trades"
    train.main(train_args(tiny_cifar_tar, out, tmp_path / "cache", "--epochs", "1", "--max-steps", "2",
                          "--attack", "trades", "--steps", "2", "--beta", "3"))
    _, manifest = load_checkpoint(out / "checkpoint")
    config = manifest.training["config"]
    assert config["attack"] == "trades" and config["beta"] == 3.0 and config["clean_weight"] is None
    assert manifest.training["history"][0]["steps"] == 2


@pytest.mark.parametrize(("flags", "message"), [
    (["--attack", "trades", "--clean-weight", "0"], "--clean-weight does not apply to --attack trades"),
    (["--attack", "pgd", "--beta", "6"], "--beta applies to --attack trades only"),
    (["--attack", "trades", "--beta", "-1"], "--beta must be >= 0"),
])
def test_loss_weights_that_would_be_ignored_are_refused(flags: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=message):
        train.main(["--output", str(tmp_path / "x"), *flags])


def test_training_loss_is_ce_plus_beta_kl_for_trades_and_the_weighted_ces_otherwise() -> None:
    torch.manual_seed(0)
    clean, adv, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    ce = torch.nn.functional.cross_entropy
    p, q = clean.softmax(1), adv.softmax(1)
    kl = (p * (p / q).log()).sum(1).mean()
    trades = train.build_parser().parse_args(["--attack", "trades", "--beta", "2"])
    train.resolve_loss_weights(trades)
    assert torch.allclose(train.training_loss(trades, clean, adv, y), ce(clean, y) + 2 * kl, atol=1e-5)
    pgd = train.build_parser().parse_args(["--clean-weight", "0.25"])
    train.resolve_loss_weights(pgd)
    assert torch.allclose(train.training_loss(pgd, clean, adv, y), 0.25 * ce(clean, y) + 0.75 * ce(adv, y))
    default = train.build_parser().parse_args([])
    train.resolve_loss_weights(default)
    assert default.clean_weight == 0.5 and default.beta is None
