"""A new user's first hour, as the README tells it: serve the shipped default model, send it a folder of
real CIFAR-10 test images with ``siam predict`` (fixed m, then sequential sampling, as CSV), and read a
model table that is the one the committed evaluations make. (Install is ``.ci/run``'s first step and
``docker-compose up --build`` its smoke test.)"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from service_helpers import ROOT, Server

from service.settings import DEFAULT_CHECKPOINT
from training.data import DEFAULT_DATA

PER_CLASS = 4
TABLE_CHECKPOINTS = ("resnet20-trades30", "resnet20x4-trades", "resnet20-pgd7", "resnet20x4-pgd7",
                     "resnet20-smoothadv-s0125", "resnet20-smoothadv-s025")
LATENCY = ROOT / "benchmarks" / "results" / "latency-cpu-2cores-epyc.json"


@pytest.fixture(scope="module")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first images of every class of the JPEG test set, unpacked as the README's ``tar -xzf`` does."""
    archive = Path(DEFAULT_DATA)
    if not archive.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"no CIFAR-10 archive at {archive}: CI runs with ../shared beside the checkout")
        pytest.skip(f"no CIFAR-10 archive at {archive}")
    folder = tmp_path_factory.mktemp("first-hour")
    wanted = {f"{i:04d}.jpg" for i in range(PER_CLASS)}
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and m.name.startswith("test/") and Path(m.name).name in wanted]
        tar.extractall(folder, members=members, filter="data")
    return folder / "test"


def siam(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "siam_cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.subprocess
@pytest.mark.timeout(400)
def test_serve_the_default_and_predict_a_folder_of_test_images(test_images: Path) -> None:
    classes = sorted(p.name for p in test_images.iterdir())
    assert len(classes) == 10 and all(len(list((test_images / c).iterdir())) == PER_CLASS for c in classes)
    with Server(DEFAULT_CHECKPOINT) as server:
        fixed = siam("predict", str(test_images), "--url", server.url, "--samples", "16")
        sequential = siam("predict", str(test_images), "--url", server.url, "--samples", "256",
                          "--confidence", "0.999", "--format", "csv")
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    rows = [line.split("\t") for line in fixed.stdout.splitlines()]
    assert len(rows) == 10 * PER_CLASS
    right = sum(Path(path).parent.name == name for path, name, *_ in rows)
    # The default is right on ~71% of clean test images; 20 of 40 or fewer would be a broken path
    # (wrong colour order, normalization, class names), not bad luck (binomial tail < 0.1%).
    assert right > len(rows) // 2, fixed.stdout

    assert sequential.returncode == 0, sequential.stderr[-2000:]
    answers = list(csv.DictReader(io.StringIO(sequential.stdout)))
    assert len(answers) == 10 * PER_CLASS and not any(a["error"] for a in answers)
    used = [int(a["samples_used"]) for a in answers]
    assert all(16 <= u <= 256 for u in used) and all(a["samples"] == "256" for a in answers)
    assert sum(used) < 256 * len(used) / 2  # most clean images stop long before the budget
    assert sum(Path(a["path"]).parent.name == a["class_name"] for a in answers) > len(answers) // 2


def test_the_readme_model_table_is_the_one_the_committed_evaluations_make() -> None:
    made = subprocess.run([sys.executable, "-m", "training.model_table",
                           *(f"checkpoints/{name}" for name in TABLE_CHECKPOINTS), "--latency", str(LATENCY)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [line for line in made.splitlines() if line.startswith("| `")]
    assert len(rows) == len(TABLE_CHECKPOINTS)
    readme = (ROOT / "README.md").read_text()
    for row in rows:
        assert row in readme, f"README.md's model table is stale: regenerate it ({row[:60]}...)"
