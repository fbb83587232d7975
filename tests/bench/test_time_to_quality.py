"""bench/time_to_quality.py on a tiny image run: one row per (run, image count), missing checkpoints
reported as missing, counts that are not whole steps refused."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import time_to_quality  # noqa: E402

from train.train import train  # noqa: E402


@pytest.fixture
def image_run(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    return train(tiny_cfg("steps=4", "save_every=2", "keep_last=5")).run_dir  # batch 16: 32 images a checkpoint


def test_rows_follow_the_checkpoints_and_missing_ones_are_named(image_run, tmp_path, capsys):
    out = tmp_path / "ttq.md"
    argv = ["--runs", f"tiny={image_run}", "--images", "32", "48", "64", "--n", "4", "--steps", "2"]
    rows = time_to_quality.main([*argv, "--device", "cpu", "--out", str(out)])
    assert [(r["images"], r["step"]) for r in rows] == [(32, 2), (48, 3), (64, 4)]
    assert "label_agreement" not in rows[1]  # step 3 was never saved
    assert "no checkpoint at step 3 (48 images)" in capsys.readouterr().out
    for r in (rows[0], rows[2]):
        assert 0 <= r["label_agreement"] <= 1 and r["frechet_distance"] > 0 and r["n"] == 4
    table = out.read_text().splitlines()
    assert table[0].startswith("| run | images | step | label agreement")
    assert table[3].startswith("| tiny | 48 | 3 | missing | missing |")


def test_a_count_that_is_not_whole_steps_is_refused(image_run):
    with pytest.raises(SystemExit, match="40 images is not a whole number of steps"):
        time_to_quality.main(["--runs", str(image_run), "--images", "40"])
