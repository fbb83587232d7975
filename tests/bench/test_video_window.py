"""bench/video_window.py on a tiny Moving-MNIST split: the evaluation's window stays on the digit under
a faint haze where the plain intensity centroid drifts, and the table prints one row per case."""

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_idx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import video_window  # noqa: E402


@pytest.fixture
def mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    images = np.zeros((8, 28, 28))
    for i in range(8):
        images[i, 6 : 22 - i, 10:18] = 255  # a different glyph per item
    labels = np.arange(8) % 4
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    return tmp_path


def test_the_ink_window_holds_where_the_plain_centroid_drifts(mnist, capsys):
    _, rows = video_window.window_table(str(mnist), clips=8, frames=4, size=32)
    shift = {(r["perturbation"], r["window"]): r["centre_shift"] for r in rows}
    assert shift[("clean", "ink")] == 0 and shift[("clean", "plain")] == 0
    assert shift[("haze, abs N(0, 0.02)", "ink")] < 0.2
    assert shift[("haze, abs N(0, 0.02)", "plain")] > 1.0  # the haze drags it towards the middle
    video_window.main(["--data", str(mnist), "--clips", "8", "--frames", "4"])
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| perturbation | window |") and len(table) == 4 + 2 * 5


def test_vae_round_trip_adds_its_rows(mnist, tmp_path, capsys):
    from diffusers import AutoencoderKL

    AutoencoderKL(
        in_channels=1, out_channels=1, block_out_channels=(8,), norm_num_groups=4, latent_channels=2
    ).save_pretrained(tmp_path / "vae")
    _, rows = video_window.window_table(str(mnist), clips=4, frames=4, size=32, vae=str(tmp_path / "vae"))
    trips = [r for r in rows if r["perturbation"] == "VAE round trip (vae)"]
    assert [r["window"] for r in trips] == ["ink", "plain"]
    assert trips[0]["centre_shift"] > 0  # an untrained VAE does not give the clip back
