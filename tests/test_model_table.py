"""The model table and the shipped evaluations it is made from: every number must come from the weights
that ship beside it, so a retrained checkpoint cannot keep its predecessor's figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from training import model_table

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "checkpoints").iterdir() if (p / "manifest.json").is_file())
RECORDS = ("eval.json", "sequential.json")
"""The evaluation records that name the weights they were made from (``siam evaluate``'s own files)."""


def test_every_shipped_checkpoint_has_an_evaluation() -> None:
    assert len(SHIPPED) >= 6
    for checkpoint in SHIPPED:
        assert any((checkpoint / "eval").rglob("eval.json")), f"{checkpoint.name} ships without an evaluation"


@pytest.mark.parametrize("checkpoint", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_evaluation_was_made_from_the_shipped_weights(checkpoint: Path) -> None:
    shipped = json.loads((checkpoint / "manifest.json").read_text())["weights"]["sha256"]
    records = [p for name in RECORDS for p in (checkpoint / "eval").rglob(name)]
    assert records
    for record in records:
        data = json.loads(record.read_text())
        assert data["weights_sha256"] == shipped, f"{record.relative_to(ROOT)} is from other weights"
        assert data["model"] == checkpoint.name


def copy_without_weights(checkpoint: Path, into: Path) -> Path:
    """The checkpoint's manifest and evaluations (all the table reads), without the weights."""
    out = into / checkpoint.name
    shutil.copytree(checkpoint / "eval", out / "eval")
    shutil.copy(checkpoint / "manifest.json", out / "manifest.json")
    return out


def test_the_table_refuses_an_evaluation_of_other_weights(tmp_path: Path) -> None:
    checkpoint = copy_without_weights(ROOT / "checkpoints" / "resnet20-pgd7", tmp_path)
    row = model_table.row(checkpoint, {})
    assert row is not None and row[0] == "`resnet20-pgd7`"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["weights"]["sha256"] = "0" * 64  # as if the model had been retrained and its evaluations kept
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match=r"knob/eval\.json was made from weights 201d0c0caa808cd8"):
        model_table.row(checkpoint, {})


def test_the_table_refuses_a_stale_apgd_evaluation_beside_a_current_one(tmp_path: Path) -> None:
    checkpoint = copy_without_weights(ROOT / "checkpoints" / "resnet20-pgd7", tmp_path)
    apgd = checkpoint / "eval" / "apgd" / "eval.json"
    data = json.loads(apgd.read_text())
    data["weights_sha256"] = "f" * 64
    apgd.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match=r"apgd/eval\.json"):
        model_table.row(checkpoint, {})


def worst_cells(run: Path, sigma: float) -> str:
    """The APGD column's m = 1 / 16 / 64 figures, read from an evaluation file directly."""
    results = json.loads((run / "eval.json").read_text())["results"]
    worst = {r["samples"]: r for r in results if r["attack"] == "worst" and r["sigma"] == sigma}
    return " / ".join(f"{100 * worst[m]['accuracy']:.1f}" if m in worst else "-" for m in (1, 16, 64))


def test_the_apgd_cell_is_the_apgd_evaluation_on_the_most_images_then_the_most_m(tmp_path: Path) -> None:
    checkpoint = copy_without_weights(ROOT / "checkpoints" / "resnet20-pgd7", tmp_path)
    knob, m16 = checkpoint / "eval" / "apgd-eot5-500-knob", checkpoint / "eval" / "apgd-eot5-500"
    data = json.loads((knob / "eval.json").read_text())
    assert data["data"]["images"] == 500 and data["attack"]["apgd_eot"] == 5
    # Two runs on 500 images: the one that ran m = 1, 16 and 64, not the one that ran m = 16 alone.
    assert model_table.row(checkpoint, {})[6] == f"{worst_cells(knob, 0.0625)} (500 img, EOT 5)"
    assert worst_cells(knob, 0.0625).count("-") == 0
    shutil.rmtree(knob)
    assert model_table.row(checkpoint, {})[6] == f"{worst_cells(m16, 0.0625)} (500 img, EOT 5)"
    assert worst_cells(m16, 0.0625).startswith("- / ")
    shutil.rmtree(m16)  # then the 200-image one, then the 50
    assert model_table.row(checkpoint, {})[6].endswith("(200 img, EOT 5)")
    shutil.rmtree(checkpoint / "eval" / "apgd-eot5-200")
    # that one also ran the grid's attacks, and its worst case counts them: the cell says so
    assert model_table.row(checkpoint, {})[6].endswith("(50 img, EOT 20, worst with pgd/eot/adaptive)")


def test_the_apgd_cell_never_reads_a_run_at_another_sigma(tmp_path: Path) -> None:
    """The default was also attacked at twice its sigma (``apgd-eot5-500-knob-sigma0125``), on as many images
    and m values as at its own: the table is the model as served, so that run must never fill its row."""
    checkpoint = copy_without_weights(ROOT / "checkpoints" / "resnet20-trades30", tmp_path)
    other = checkpoint / "eval" / "apgd-eot5-500-knob-sigma0125"
    assert worst_cells(other, 0.125).count("-") == 0 and worst_cells(other, 0.0625) == "- / - / -"
    own = f"{worst_cells(checkpoint / 'eval' / 'apgd-eot5-500-knob', 0.0625)} (500 img, EOT 5)"
    assert model_table.row(checkpoint, {})[6] == own
    for run in checkpoint.glob("eval/apgd*"):  # with only the run at another sigma, the cell is empty
        if run != other:
            shutil.rmtree(run)
    assert model_table.row(checkpoint, {})[6] == "-"
