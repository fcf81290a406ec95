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


def test_the_apgd_cell_is_the_apgd_evaluation_on_the_most_images(tmp_path: Path) -> None:
    checkpoint = copy_without_weights(ROOT / "checkpoints" / "resnet20-pgd7", tmp_path)
    larger = checkpoint / "eval" / "apgd-eot5-500" / "eval.json"
    data = json.loads(larger.read_text())
    assert data["data"]["images"] == 500 and data["attack"]["apgd_eot"] == 5
    worst = next(r for r in data["results"] if r["attack"] == "worst" and r["samples"] == 16)
    assert model_table.row(checkpoint, {})[6] == f"{100 * worst['accuracy']:.1f} (500 img, EOT 5)"
    for run in checkpoint.glob("eval/apgd-eot5-500*"):  # every 500-image run: then the 200-image one, then the 50
        shutil.rmtree(run)
    assert model_table.row(checkpoint, {})[6].endswith("(200 img, EOT 5)")
    shutil.rmtree(checkpoint / "eval" / "apgd-eot5-200")
    # that one also ran the grid's attacks, and its worst case counts them: the cell says so
    assert model_table.row(checkpoint, {})[6].endswith("(50 img, EOT 20, worst with pgd/eot/adaptive)")
