"""The latent cache: encoded once, reused while data, VAE and size are unchanged, rebuilt otherwise."""

import pytest
import torch
from test_latents import tiny_vae

import train.train as trainer
from modalities.image_data import Shapes
from modalities.latents import LatentCodec


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_is_reused_then_rebuilt_after_the_vae_changes(tiny_cfg, tmp_path, cache, capsys):
    tiny_vae(tmp_path / "vae")
    latent = ["steps=6", "modality.shapes_items=64", "modality.space=latent", f"modality.vae={tmp_path / 'vae'}"]
    plain = trainer.train(tiny_cfg(*latent, "name=plain"))
    assert "latent cache" not in capsys.readouterr().out

    cached = trainer.train(tiny_cfg(*latent, "data.cache_latents=true", "name=first"))
    assert "latent cache: encoding 64 items" in capsys.readouterr().out
    (folder,) = cache.glob("latents-*")
    assert sorted(p.name for p in folder.iterdir()) == [
        "captions.json",
        "key.json",
        "shard_00000.safetensors",
        "skipped.json",
    ]
    # training read the cache and saw what encoding on the fly gives (up to the encoder's round-off
    # in batches of another size, which a few optimizer steps amplify)
    assert [s for s, _ in cached.losses] == [s for s, _ in plain.losses]
    for (_, a), (_, b) in zip(cached.losses, plain.losses):
        assert a == pytest.approx(b, rel=3e-3), (cached.losses, plain.losses)

    trainer.train(tiny_cfg(*latent, "data.cache_latents=true", "name=second"))
    assert f"latent cache: reusing {folder}" in capsys.readouterr().out

    tiny_vae(tmp_path / "vae", seed=1)  # retrained weights in the same folder
    trainer.train(tiny_cfg(*latent, "data.cache_latents=true", "name=third"))
    assert f"latent cache: {folder} was made with other vae; rebuilding it" in capsys.readouterr().out
    from safetensors.torch import load_file

    x = torch.stack([Shapes(64, 16)[i]["x"] for i in range(4)])
    stored = load_file(folder / "shard_00000.safetensors")["moments"][:4]
    torch.testing.assert_close(stored, LatentCodec(tmp_path / "vae").moments(x), atol=1e-5, rtol=1e-4)


def test_cache_needs_latent_images(tiny_cfg, cache):
    with pytest.raises(ValueError, match="data.cache_latents=true caches VAE latents; it needs modality.space=latent"):
        trainer.train(tiny_cfg("data.cache_latents=true"))


def test_changed_files_rebuild_the_cache_naming_the_data(tmp_path, cache, capsys):
    import os

    from PIL import Image as PIL

    from modalities.image_data import ImageFolder
    from modalities.latent_cache import LatentCache

    tiny_vae(tmp_path / "vae")
    codec = LatentCodec(tmp_path / "vae")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        PIL.new("RGB", (8, 8), (80 * i, 10, 10)).save(images / f"{i}.png")
    where = {"dataset": "folder", "path": str(images), "size": 8}
    first = LatentCache(ImageFolder(str(images), 8), codec, where)
    assert "encoding 3 items" in capsys.readouterr().out and len(first) == 3
    LatentCache(ImageFolder(str(images), 8), codec, where)
    assert "reusing" in capsys.readouterr().out
    PIL.new("RGB", (8, 8), (0, 200, 0)).save(images / "1.png")
    os.utime(images / "1.png", ns=(1, 1))  # a changed file, whatever the clock's resolution
    changed = LatentCache(ImageFolder(str(images), 8), codec, where)
    assert "was made with other data; rebuilding it" in capsys.readouterr().out
    assert not torch.allclose(changed[1]["moments"], first[1]["moments"])


def test_video_latents_are_cached_frame_by_frame_and_train_as_encoded_on_the_fly(tiny_cfg, tmp_path, cache, capsys):
    from safetensors.torch import load_file

    from modalities.video_data import MovingShapes

    tiny_vae(tmp_path / "vae")
    latent = [
        "modality=video", "modality.frames=4", "modality.shapes_items=32", "steps=4", "modality.space=latent",
        f"modality.vae={tmp_path / 'vae'}",
    ]  # fmt: skip
    plain = trainer.train(tiny_cfg(*latent, "name=plain"))
    cached = trainer.train(tiny_cfg(*latent, "data.cache_latents=true", "name=cached"))
    assert "latent cache: encoding 32 items" in capsys.readouterr().out
    for (_, a), (_, b) in zip(cached.losses, plain.losses, strict=True):
        assert a == pytest.approx(b, rel=3e-3), (cached.losses, plain.losses)
    (folder,) = cache.glob("latents-*")
    shapes = MovingShapes(32, 4, 16, speed=2.0 / 16)  # as modality.speed=2 pixels per frame makes them
    clips = torch.stack([shapes[i]["x"] for i in range(2)])  # (2, 3, 4, 16, 16)
    stored = load_file(folder / "shard_00000.safetensors")["moments"][:2]
    assert stored.shape == (2, 8, 4, 8, 8)  # mean and log-variance of 4 channels, for each of 4 frames
    torch.testing.assert_close(stored, LatentCodec(tmp_path / "vae").moments(clips), atol=1e-5, rtol=1e-4)
    trainer.train(tiny_cfg(*latent, "data.cache_latents=true", "modality.speed=3.0", "name=faster"))
    assert "was made with other data; rebuilding it" in capsys.readouterr().out  # other clips, another key
