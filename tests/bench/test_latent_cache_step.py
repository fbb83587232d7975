"""bench/latent_cache_step.py on a tiny VAE and DiT: both set-ups run, the cache is built once, a ratio is printed."""

import json

import torch
from conftest import load_bench
from diffusers import AutoencoderKL


def test_times_both_setups_and_builds_the_cache_once(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        norm_num_groups=4,
    ).save_pretrained(tmp_path / "vae")
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    tiny = ["backbone=dit_xs", "modality.size=16", "modality.shapes_items=64", "batch_size=16"]
    result = load_bench("latent_cache_step").main(
        ["--vae", str(tmp_path / "vae"), "--rounds", "2", "--steps", "2", "--", *tiny]
    )
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["setup"] for r in rows] == ["no_cache", "cache"]
    assert all(r["iqr"][0] <= r["ms_per_step"] <= r["iqr"][1] for r in rows)
    assert result["ratio"] == result["no_cache"] / result["cache"] > 0
    assert "latent cache: encoding 64 items" in out and "step time without / with the latent cache" in out
    assert len(list((tmp_path / "cache").glob("latents-*/shard_*.safetensors"))) == 1
