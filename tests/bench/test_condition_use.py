"""bench/condition_use.py on tiny image runs: the label changes the x0 estimate of a conditional
model, the error grows with the noise, and a model without labels is refused by name."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import condition_use  # noqa: E402

from train.train import train  # noqa: E402


def test_errors_by_label_and_noise_level(tiny_cfg, tmp_path):
    run = train(tiny_cfg("steps=30")).run_dir
    out = tmp_path / "use.md"
    argv = ["--ckpt", str(run / "checkpoints" / "last"), "--n", "8", "--t", "0.2", "0.95", "--device", "cpu"]
    rows = condition_use.main([*argv, "--out", str(out)])
    assert [r["t"] for r in rows] == [0.2, 0.95]
    assert rows[0]["sigma"] < rows[1]["sigma"]
    assert rows[0]["right"] < rows[1]["right"]  # more noise, worse estimate
    assert rows[1]["right"] != rows[1]["null"]  # the label reaches the network
    lines = out.read_text().splitlines()
    assert lines[0].startswith("| t | sigma | x0 MSE, right label") and len(lines) == 4


def test_a_model_without_labels_is_refused(tiny_cfg):
    run = train(tiny_cfg("steps=2", "modality.conditional=false")).run_dir
    with pytest.raises(SystemExit, match="takes no class label"):
        condition_use.main(["--ckpt", str(run / "checkpoints" / "last"), "--n", "4", "--device", "cpu"])
