"""bench/latent_cache_step.py on a tiny VAE and DiT: both set-ups run, the cache is built once, a ratio is printed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL

REPO = Path(__file__).resolve().parents[2]


def test_times_both_setups_and_builds_the_cache_once(tmp_path):
    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        norm_num_groups=4,
    ).save_pretrained(tmp_path / "vae")
    env = {**os.environ, "POLYDIFF_CACHE": str(tmp_path / "cache")}
    tiny = ["backbone=dit_xs", "modality.size=16", "modality.shapes_items=64", "batch_size=16"]
    args = [sys.executable, str(REPO / "bench" / "latent_cache_step.py"), "--vae", str(tmp_path / "vae")]
    run = subprocess.run(
        [*args, "--rounds", "2", "--steps", "2", "--", *tiny], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [r["setup"] for r in rows] == ["no_cache", "cache"]
    assert all(r["iqr"][0] <= r["ms_per_step"] <= r["iqr"][1] for r in rows)
    assert "latent cache: encoding 64 items" in run.stdout and "step time without / with the latent cache" in run.stdout
    assert len(list((tmp_path / "cache").glob("latents-*/shard_*.safetensors"))) == 1
