"""Latent images and clips: any diffusers AutoencoderKL folder through polydiff, the latent DiT, its
checkpoint; clips through the image VAE frame by frame."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf
from PIL import Image as PILImage

from modalities.image import Image, ImageConfig
from modalities.image_data import Shapes
from modalities.latents import LatentCodec


def tiny_vae(folder, seed=0, scaling_factor=0.5, shift_factor=0.25):
    """A random 2-block AutoencoderKL (2x downsampling, 4 latent channels) saved with save_pretrained."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        latent_channels=4,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
    vae.save_pretrained(folder)
    return vae


def test_a_diffusers_vae_folder_loads_and_round_trips_shapes(tmp_path):
    vae = tiny_vae(tmp_path / "vae").eval()
    codec = LatentCodec(tmp_path / "vae")
    x = torch.stack([Shapes(2, 16)[i]["x"] for i in range(2)])  # (2, 3, 16, 16)
    z = codec.encode(x)
    assert z.shape == (2, 4, 8, 8) and codec.factor == 2
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        expected = vae.decode(mean).sample
    torch.testing.assert_close(z, (mean - 0.25) * 0.5)  # scaling and shift read from the folder's config
    torch.testing.assert_close(codec.decode(z), expected)  # and undone exactly on the way back
    # a sample differs from the mean, reproducibly under a seed
    sampling = LatentCodec(tmp_path / "vae", mode="sample")
    a, b = (sampling.encode(x, torch.Generator().manual_seed(1)) for _ in range(2))
    assert torch.equal(a, b) and not torch.allclose(a, z)
    # a pipeline-style folder (the VAE in vae/) loads the same
    torch.testing.assert_close(LatentCodec(tmp_path).encode(x), z)


def latent_cfg(vae, **keys):
    return OmegaConf.merge(
        OmegaConf.structured(ImageConfig), {"size": 16, "space": "latent", "vae": vae and str(vae), **keys}
    )


def test_latent_images_are_shaped_by_the_vae(tmp_path):
    tiny_vae(tmp_path / "vae")
    image = Image(latent_cfg(tmp_path / "vae", classes=["a", "b"]), patch=2)
    assert image.sample_shape(3) == (3, 4, 8, 8)
    assert image.backbone_kwargs()["in_dim"] == 2 * 2 * 4
    image.check(OmegaConf.create({"patch": 2}))
    with pytest.raises(ValueError, match="backbone.patch=16 \\(through the VAE's 2x downsampling\\)"):
        image.check(OmegaConf.create({"patch": 16}))
    with pytest.raises(ValueError, match="modality.space=latent needs modality.vae="):
        Image(latent_cfg(None), patch=2)
    with pytest.raises(FileNotFoundError, match="nowhere: the VAE folder does not exist"):
        Image(latent_cfg(tmp_path / "nowhere"), patch=2)


def test_latent_dit_trains_and_its_checkpoint_names_a_moved_vae(tiny_cfg, tmp_path):
    import train.train as trainer
    from train.checkpoint import load_model

    tiny_vae(tmp_path / "vae")
    result = trainer.train(tiny_cfg("steps=3", "modality.space=latent", f"modality.vae={tmp_path / 'vae'}"))
    ckpt = result.run_dir / "checkpoints" / "last"
    saved = OmegaConf.load(ckpt / "config.yaml").modality
    assert saved.vae == str((tmp_path / "vae").resolve()) and saved.vae_config["latent_channels"] == 4
    from safetensors.torch import load_file

    assert not any("encoder" in k or "decoder" in k for k in load_file(ckpt / "model.safetensors"))  # DiT only
    cfg, modality, model = load_model(ckpt)
    assert modality.decode(torch.zeros(modality.sample_shape(2))).shape == (2, 3, 16, 16)

    shutil.move(tmp_path / "vae", tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=f"modality.vae={tmp_path / 'vae'}: the VAE folder does not exist"):
        load_model(ckpt)
    tiny_vae(tmp_path / "vae", seed=1, scaling_factor=0.7)  # another VAE in its place is refused too
    with pytest.raises(ValueError, match="is not the one this model was trained with"):
        load_model(ckpt)


def test_latent_video_goes_through_the_vae_frame_by_frame(tmp_path):
    from modalities.video import Video, VideoConfig

    tiny_vae(tmp_path / "vae")
    keys = {"frames": 3, "size": 16, "classes": ["a"], "space": "latent", "vae": str(tmp_path / "vae")}
    video = Video(OmegaConf.merge(OmegaConf.structured(VideoConfig), keys), patch=2)
    clips = torch.rand(2, 3, 3, 16, 16) * 2 - 1  # (B, C, T, H, W)
    z = video.encode({"x": clips})
    assert z.shape == (2, 4, 3, 8, 8) == video.sample_shape(2)
    for t in range(3):  # each frame's latent is the image VAE's latent of that frame alone
        torch.testing.assert_close(z[:, :, t], video.codec.encode(clips[:, :, t]))
    pixels = video.decode(z)
    assert pixels.shape == (2, 3, 3, 16, 16)
    torch.testing.assert_close(pixels[:, :, 1], ((video.codec.decode(z[:, :, 1]).clamp(-1, 1) + 1) / 2))
    assert video.backbone_kwargs()["in_dim"] == 1 * 2 * 2 * 4  # tubelet x patch x patch x latent channels
    with pytest.raises(ValueError, match="backbone.patch=16 \\(through the VAE's 2x downsampling\\)"):
        video.check(OmegaConf.create({"patch": 16}))
    # first_frame holds the given image's latent in frame 0
    PILImage.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8)).save(tmp_path / "f.png")
    hook = video.sample_options(first_frame=str(tmp_path / "f.png"))["x0_hook"]
    held = hook(torch.zeros(1, 4, 3, 8, 8), 0.5)
    frame = torch.full((1, 3, 16, 16), 200 / 255 * 2 - 1)
    torch.testing.assert_close(held[0, :, 0], video.codec.encode(frame)[0], atol=1e-3, rtol=1e-3)
    assert held[0, :, 1:].abs().max() == 0


def test_latent_video_model_trains_and_records_its_vae(tiny_cfg, tmp_path):
    import train.train as trainer
    from train.checkpoint import load_model

    tiny_vae(tmp_path / "vae")
    result = trainer.train(
        tiny_cfg(
            "modality=video", "modality.frames=4", "modality.size=16", "steps=60", "log_every=20",
            "modality.space=latent", f"modality.vae={tmp_path / 'vae'}",
        )
    )  # fmt: skip
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.6 * first, result.losses
    ckpt = result.run_dir / "checkpoints" / "last"
    assert OmegaConf.load(ckpt / "config.yaml").modality.vae == str((tmp_path / "vae").resolve())
    _, modality, _ = load_model(ckpt)
    assert modality.decode(torch.zeros(modality.sample_shape(1))).shape == (1, 3, 4, 16, 16)
