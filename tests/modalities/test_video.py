"""Video: real files through the folder data set, bad files skipped and counted, training with both
attention layouts, MP4 output read back, first_frame held exactly, seeded sampling, Moving MNIST."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx
from omegaconf import OmegaConf
from PIL import Image as PILImage

import train.train as trainer
from diffusion import build_process
from diffusion.samplers import SAMPLERS
from modalities.data import BadDataTracker, Tolerant, collate
from modalities.image_data import image_dataset, to_tensor
from modalities.media import read_video, write_video
from modalities.video import Video, VideoConfig
from modalities.video_data import VideoFolder
from modalities.video_metrics import centroids, displacements, glimpse
from train.checkpoint import build_model

SHARED_VIDEO = Path(__file__).resolve().parents[3] / "shared" / "data" / "video" / "carphone_pristine.mp4"
TINY_VIDEO = ["modality=video", "modality.frames=4", "modality.size=8", "steps=80", "log_every=20"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYDIFF_CACHE", str(tmp_path / "cache"))


def tiny_video(**keys):
    cfg = OmegaConf.merge(OmegaConf.structured(VideoConfig), {"frames": 4, "size": 8, "classes": ["a", "b"], **keys})
    return Video(cfg, patch=2)


def moving_square(frames: int, size: int) -> np.ndarray:
    """(T, size, size, 3) uint8: a white square moving one pixel per frame."""
    clip = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        clip[t, 4:10, 2 + t : 8 + t] = 255
    return clip


@pytest.mark.skipif(not SHARED_VIDEO.exists(), reason="../shared/data/video not present")
def test_real_mp4_decodes_into_the_clips_its_timestamps_give(tmp_path):
    (tmp_path / "v").mkdir()
    shutil.copy(SHARED_VIDEO, tmp_path / "v" / "carphone.mp4")
    data = VideoFolder(tmp_path / "v", frames=4, size=16, stride=3)
    frames, _ = read_video(SHARED_VIDEO)
    span = 3 * 3 + 1
    assert len(data) == len(frames) // span and data.skipped == []
    item = data[2]  # seeks into the file: frames 2 * span + 0, 3, 6, 9 of the whole decode
    assert item["x"].shape == (3, 4, 16, 16) and item["label"] == 0
    for j in range(4):
        whole = to_tensor(PILImage.fromarray(frames[2 * span + 3 * j]), 16, 3)
        assert (item["x"][:, j] - whole).abs().max() < 1e-5, j
    assert len(list((tmp_path / "cache").glob("video-index-*.json"))) == 1


def test_corrupt_and_too_short_files_are_skipped_and_counted(tmp_path):
    root = tmp_path / "v"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
    write_video(moving_square(12, 16), root / "cat" / "good.mp4", fps=8)
    write_video(moving_square(12, 16), root / "dog" / "later_truncated.mp4", fps=8)
    write_video(moving_square(3, 16), root / "dog" / "short.mp4", fps=8)
    (root / "dog" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (root / "dog" / "notes.txt").write_text("not a video")
    data = VideoFolder(root, frames=6, size=8)
    assert data.classes == ("cat", "dog") and len(data) == 4  # 12 frames: two clips of 6 in each good file
    reasons = "\n".join(data.skipped)
    assert len(data.skipped) == 3
    assert "short.mp4: 3 decodable frames, a clip needs 6" in reasons and "corrupt.mp4: cannot decode" in reasons
    assert "notes.txt: not a video file extension" in reasons
    key = data.fingerprint()  # what a latent cache of these clips is keyed on
    assert VideoFolder(root, frames=6, size=8).fingerprint() == key != VideoFolder(root, frames=4, size=8).fingerprint()
    (root / "dog" / "later_truncated.mp4").write_bytes(b"junk")  # broken after indexing: skipped at read time
    assert VideoFolder(root, frames=6, size=8).fingerprint() != key  # its size changed
    tolerant = Tolerant(data)
    tracker = BadDataTracker(threshold=0.9)
    tracker.add(0, tolerant.skipped, verbose=False)
    batch = collate([tolerant[i] for i in range(len(data))])
    tracker.add(batch["n"], batch["bad"], verbose=False)
    assert batch["n"] == 2 and tracker.bad == 5 and tracker.seen == 7
    assert batch["x"].shape == (2, 3, 6, 8, 8) and batch["label"].tolist() == [0, 0]


# attention=math for the factorized run: on a CPU, SDPA's fused kernel over hundreds of 4-token
# groups (across-frame blocks) is about 10x slower than the plain math (bench/throughput.py --clip-sweep).
# The third run puts the convolutional output head (backbones/heads.py) over the clip and trains with
# self-conditioning.
@pytest.mark.parametrize(
    "layout,process,attention,extra",
    [
        ("full", "gaussian", "auto", []),
        ("factorized", "flow", "math", []),
        ("full", "gaussian", "auto", ["modality.head_channels=8", "modality.self_condition=true"]),
    ],
)
def test_tiny_video_model_loss_falls(tiny_cfg, layout, process, attention, extra):
    overrides = [f"backbone.layout={layout}", f"modality.process={process}", f"attention={attention}", *extra]
    result = trainer.train(tiny_cfg(*TINY_VIDEO, *overrides))
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.5 * first, result.losses


def test_saved_clips_read_back_as_mp4_with_frames_size_and_rate(tmp_path):
    video = tiny_video(fps=6)
    smooth = torch.rand(2 * 5, 3, 4, 4)  # yuv420p keeps colour at half resolution: smooth content survives
    clips = torch.nn.functional.interpolate(smooth, size=16, mode="bilinear").view(2, 5, 3, 16, 16).transpose(1, 2)
    strip = video.save(clips, tmp_path / "s")
    assert PILImage.open(strip).size == (5 * 17 + 1, 2 * 17 + 1)  # a row per clip, a column per frame
    frames, fps = read_video(tmp_path / "s-001.mp4")
    assert frames.shape == (5, 16, 16, 3) and fps == 6
    error = [np.abs(frames.astype(float) - (clip.permute(1, 2, 3, 0) * 255).numpy()).mean() for clip in clips]
    assert error[1] < 12 < 3 * 12 < error[0], error  # H.264 in yuv420p is close to the clip written, not exact
    write_video(np.zeros((3, 7, 9), dtype=np.uint8), tmp_path / "odd.mp4", fps=4)  # yuv420p needs even sides
    assert read_video(tmp_path / "odd.mp4")[0].shape == (3, 8, 10, 3)


def sampler_setup(process="gaussian"):
    video = tiny_video()
    cfg = OmegaConf.create({"backbone": {"hidden_size": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}})
    cfg.backbone.update({"pos": "rope", "qk_norm": True, "cond_dropout": 0.1, "layout": "full"})
    cfg.update({"attention": "math", "grad_checkpointing": False})
    torch.manual_seed(0)
    model = build_model(cfg, video).eval()
    return video, video.model_fn(model), build_process(process, OmegaConf.create({}))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("process", ["gaussian", "flow"])
def test_first_frame_holds_frame_zero_exactly(tmp_path, sampler, process):
    video, model_fn, proc = sampler_setup(process)
    image = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)  # cropped and resized to 8
    PILImage.fromarray(image).save(tmp_path / "f.png")
    options = video.sample_options(first_frame=str(tmp_path / "f.png"))
    cond = video.sample_cond(2, "cpu")
    x0 = proc.sample(model_fn, video.sample_shape(2), cond, steps=3, sampler=sampler, guidance=2.0, **options)
    expected = options["x0_hook"](torch.zeros(1, 3, 4, 8, 8), 0.5)[0, :, 0]
    assert torch.equal(x0[0, :, 0], expected) and torch.equal(x0[1, :, 0], expected)
    assert not torch.equal(x0[0, :, 1], expected)
    assert video.sample_options() == {}  # the trainer's call, with no request


def test_a_self_conditioned_model_sees_its_previous_estimate(tmp_path):
    video = tiny_video(self_condition=True)
    cfg = OmegaConf.create({"backbone": {"hidden_size": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}})
    cfg.backbone.update({"pos": "rope", "qk_norm": True, "cond_dropout": 0.1, "layout": "full"})
    cfg.update({"attention": "math", "grad_checkpointing": False})
    torch.manual_seed(0)
    model = build_model(cfg, video).eval()
    with torch.no_grad():
        for p in model.parameters():  # off the adaLN-Zero start, whose output is zero whatever the input
            p.add_(torch.randn_like(p) * 0.05)
    xt, t, cond = torch.randn(2, 3, 4, 8, 8), torch.full((2,), 0.5), video.sample_cond(2, "cpu")
    fn = video.model_fn(model)
    none, zeros = fn(xt, t, cond), fn(xt, t, {**cond, "x0_self": torch.zeros_like(xt)})
    torch.testing.assert_close(none, zeros)  # no estimate yet: zeros, as in training
    assert not torch.allclose(fn(xt, t, {**cond, "x0_self": torch.ones_like(xt)}), zeros)
    PILImage.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    assert video.sample_options() == {"self_condition": True}  # what training's and evaluation's samples use
    assert video.sample_options(first_frame=str(tmp_path / "f.png")).keys() == {"self_condition", "x0_hook"}


def test_sampling_under_a_seed_is_deterministic():
    video, model_fn, proc = sampler_setup()

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return proc.sample(model_fn, video.sample_shape(2), video.sample_cond(2, "cpu"), steps=3, generator=g)

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


def test_moving_mnist_clips_keep_the_digit_and_move_at_the_set_speed(tmp_path):
    images = np.zeros((6, 28, 28))
    for i in range(6):
        images[i, 6 : 22 - i, 10:18] = 255  # a different glyph per item
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5, 9]))
    keys = {"dataset": "moving_mnist", "frames": 10, "size": 32, "speed": 3.0}
    video = Video(
        OmegaConf.merge(OmegaConf.structured(VideoConfig), keys),
        2,
        OmegaConf.create({"path": str(tmp_path), "bad_threshold": 0.01}),
    )
    data = video.dataset("test")
    for i in range(6):
        item = data[i]
        assert item["label"] == [3, 1, 4, 1, 5, 9][i] and item["x"].shape == (1, 10, 32, 32)
        mass = (item["x"] + 1).sum(dim=(0, 2, 3))  # the whole digit is in every frame: same ink
        assert torch.allclose(mass, mass[0], rtol=1e-5)
        steps = displacements((item["x"][None] + 1) / 2)[0]
        assert (steps - 3.0).abs().median() < 0.75, steps  # bounces shorten a step, rounding moves 0.5 px
    assert torch.equal(data[3]["x"], video.dataset("test")[3]["x"])
    # image modalities (a video VAE's training, modality=image_vae) take single frames: where clip i starts
    frames = image_dataset(
        OmegaConf.create({"dataset": "moving_mnist", "size": 32, "classes": None}), "test", tmp_path, 1, None
    )
    assert frames[4]["x"].shape == (1, 32, 32) and frames[4]["label"] == 5
    assert torch.equal(frames[4]["x"], data[4]["x"][:, 0])


def test_the_digit_window_ignores_faint_haze_and_stray_specks():
    # A 6 x 6 "digit" centred at (22.5, 9.5) on a 32 x 32 frame, then what generated frames add: an
    # uneven haze (|N(0, 0.03)|, about 6 of 255 grey levels) and, in the second frame, one bright
    # speck far away. The intensity centroid above the darkest pixel lands far off, towards the
    # middle (the haze outweighs the digit); the window must stay on the digit.
    clean = torch.zeros(2, 1, 32, 32)
    clean[:, :, 7:13, 20:26] = 1.0
    haze = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0)).abs() * 0.03
    hazy = (clean + haze).clamp(max=1)
    hazy[1, :, 28, 2] = 1.0
    weight = hazy.mean(1) - hazy.mean(1).amin(dim=(1, 2), keepdim=True)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    plain = torch.stack([(weight * xs).sum((1, 2)), (weight * ys).sum((1, 2))], -1) / weight.sum((1, 2))[:, None]
    assert (plain - torch.tensor([22.5, 9.5])).norm(dim=-1).min() > 3
    assert torch.allclose(centroids(hazy), torch.tensor([22.5, 9.5]).expand(2, 2), atol=0.1)
    crops = glimpse(hazy, 16)  # the window 16 px wide around the digit, resized to 32
    assert (crops - glimpse(clean, 16)).abs().mean() < 0.05
    # the digit in its middle, up to the crop corner's rounding (one frame pixel, two glimpse pixels)
    assert torch.allclose(centroids(glimpse(clean, 16), 32), torch.tensor(15.5), atol=2.1)


def test_impossible_shapes_are_rejected_naming_the_keys():
    backbone = OmegaConf.create({"patch": 2})
    with pytest.raises(ValueError, match=r"modality.tubelet=3 does not divide modality.frames=4; use .*\[1, 2, 4\]"):
        tiny_video(tubelet=3).check(backbone)
    with pytest.raises(ValueError, match="backbone.patch=2 does not divide modality.size=9"):
        tiny_video(size=9).check(backbone)
