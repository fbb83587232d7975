"""polydiff's own KL autoencoder, trained by the shared loop and saved in diffusers' format."""

import json

import pytest
import torch
from diffusers import AutoencoderKL

import train.train as trainer
from infer.cli import parse
from infer.sample import SampleArgs, sample
from modalities.image import Image
from modalities.image_data import Shapes
from modalities.latents import LatentCodec

TINY_VAE = [
    "modality=image_vae",
    "modality.block_out_channels=[8,16]",
    "modality.norm_num_groups=8",
    "modality.holdout=64",
    "modality.scale_items=128",
    "ema_decay=0.9",
]


def test_own_vae_learns_and_its_folder_loads_with_plain_diffusers(tiny_cfg, capsys):
    result = trainer.train(tiny_cfg(*TINY_VAE, "steps=80", "log_every=10", "sample.every=40"))
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.5 * first, result.losses  # the reconstruction error falls
    run = result.run_dir
    assert (run / "samples" / "step_00000040.png").stat().st_size > 500  # originals above reconstructions
    assert (run / "reconstructions.png").exists()
    report = json.loads((run / "vae_eval.json").read_text())
    assert report["heldout_psnr_db"] > 12  # an untrained decoder's grey gives about 6 dB on the shapes
    assert "held-out reconstruction PSNR" in capsys.readouterr().out

    folder = run / "checkpoints" / "last" / "vae"
    vae = AutoencoderKL.from_pretrained(folder)  # plain diffusers, no polydiff code
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    # the measured scale and shift give the DiT latents of about zero mean and unit variance
    codec = LatentCodec(run / "checkpoints" / "last", mode="sample")
    x = torch.stack([Shapes(128, 16)[i]["x"] for i in range(128)])
    z = codec.encode(x, torch.Generator().manual_seed(0))
    assert abs(z.mean().item()) < 0.2 and 0.8 < z.std().item() < 1.25
    # and the run's checkpoint is what modality.vae names
    image = Image(Image.Config(size=16, space="latent", vae=str(run / "checkpoints" / "last"), classes=["a"]), patch=2)
    assert image.sample_shape(1) == (1, 4, 8, 8)
    with pytest.raises(SystemExit, match="modality=image_vae model is trained without a noise process"):
        sample(parse(SampleArgs, [f"ckpt={run / 'checkpoints' / 'last'}", "device=cpu"]))


def test_vae_shapes_are_checked_at_start_up(tiny_cfg):
    with pytest.raises(ValueError, match="modality.norm_num_groups=8 does not divide"):
        trainer.train(tiny_cfg(*TINY_VAE, "modality.block_out_channels=[8,12]"))
    with pytest.raises(ValueError, match="not divisible by the VAE's 8x downsampling"):
        trainer.train(tiny_cfg(*TINY_VAE, "modality.size=20", "modality.block_out_channels=[8,8,8,8]"))
