"""The trainer end to end on a tiny model: learning, resuming, numerical faults."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import TINY, expendable

import train.train as trainer
from modalities.image import Image
from train.checkpoint import load_model

REPO = Path(__file__).resolve().parents[2]


def test_tiny_model_loss_falls(tiny_cfg):
    result = trainer.train(tiny_cfg("steps=150", "log_every=25"))  # about 0.15 of the first loss by then
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.5 * first, result.losses
    assert (result.run_dir / "loss.png").stat().st_size > 1000
    assert (result.run_dir / "checkpoints" / "last" / "model.safetensors").exists()


def die_after_checkpoint(monkeypatch, cfg, step: int):
    """Train `cfg` until the run dies right after its step-`step` checkpoint."""
    real_save = trainer.save_checkpoint

    def save_then_die(accelerator, root, at, *args, **kwargs):
        real_save(accelerator, root, at, *args, **kwargs)
        if at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg)
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)


def test_resumed_run_matches_the_uninterrupted_one(tiny_cfg, tmp_path, monkeypatch):
    overrides = ["steps=24", "save_every=8", "modality.shapes_items=96"]  # 6 batches/epoch: resume crosses epochs
    full = trainer.train(tiny_cfg(*overrides, "name=full"))
    die_after_checkpoint(monkeypatch, tiny_cfg(*overrides, "name=cut"), 16)
    resumed = trainer.train(tiny_cfg(*overrides, "name=cut", "resume=auto"))

    assert [s for s, _ in resumed.losses] == list(range(17, 25))
    assert resumed.losses == full.losses[16:]  # bitwise equal on CPU
    for a, b in zip(resumed.ema_model.state_dict().values(), full.ema_model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_coarse_start_trains_its_share_at_half_resolution_and_resumes_exactly(tiny_cfg, monkeypatch):
    sides = []  # the side of every x0 that the loss trained on
    real_loss = Image.denoising_loss

    def spy(self, process, model, x0, *args, **kwargs):
        sides.append(x0.shape[-1])
        return real_loss(self, process, model, x0, *args, **kwargs)

    monkeypatch.setattr(Image, "denoising_loss", spy)
    overrides = ["steps=12", "save_every=4", "coarse_share=0.5", "modality.shapes_items=96"]
    full = trainer.train(tiny_cfg(*overrides, "name=full"))
    assert sides == [8] * 6 + [16] * 6  # 16x16 shapes: the first half of the steps on 8x8

    die_after_checkpoint(monkeypatch, tiny_cfg(*overrides, "name=cut"), 8)  # after the switch at step 6
    sides.clear()
    resumed = trainer.train(tiny_cfg(*overrides, "name=cut", "resume=auto"))
    assert sides == [16] * 4
    assert resumed.losses == full.losses[8:]
    for a, b in zip(resumed.ema_model.state_dict().values(), full.ema_model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_checkpoint_from_before_coarse_starts_resumes_at_full_resolution():
    state = trainer.TrainState(0, "cpu")
    saved = state.state_dict()
    assert saved["coarse_done"] is False
    del saved["coarse_done"]  # what a checkpoint written before coarse_share holds
    state.load_state_dict(saved)
    assert state.coarse_done


# The second model has a convolutional head (backbones/heads.py) and is self-conditioned.
@pytest.mark.parametrize("extra", [[], ["modality.head_channels=8", "modality.self_condition=true"]])
def test_sampling_from_a_checkpoint_is_deterministic(tiny_cfg, extra):
    result = trainer.train(tiny_cfg("steps=5", *extra))
    cfg, modality, model = load_model(result.run_dir / "checkpoints" / "last")
    assert cfg.modality.classes == ["circle", "square", "triangle", "diamond", "cross", "ring"]
    assert any(name.startswith("head.") for name in model.state_dict()) == bool(extra)  # saved and loaded

    def draw(seed):
        from diffusion import build_process

        process = build_process(cfg.modality.process, cfg.modality.diffusion)
        return process.sample(
            modality.model_fn(model),
            modality.sample_shape(4),
            modality.sample_cond(4, "cpu", label=1),
            steps=5,
            guidance=2.0,
            generator=torch.Generator().manual_seed(seed),
            **modality.sample_options(model),
        )

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_cfg, monkeypatch):
    from diffusion.continuous import GaussianVP

    real_loss = GaussianVP.loss
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):  # calls 3 and 4 give NaN; from call 7 on everything is infinite
        calls["n"] += 1
        loss = real_loss(self, *args, **kwargs)
        if calls["n"] in (3, 4):
            return loss * float("nan")
        return loss * float("inf") if calls["n"] >= 7 else loss

    monkeypatch.setattr(GaussianVP, "loss", flaky)
    cfg = tiny_cfg("steps=50", "save_every=2", "max_bad_steps=5")
    root = Path(cfg.out_dir) / "t" / "checkpoints"
    with pytest.raises(
        FloatingPointError, match=rf"5 non-finite steps in a row .*last good checkpoint is {root}/step_00000006"
    ):
        trainer.train(cfg)
    # Steps 3-4 were skipped and training went on; steps 7-11 stopped it. No checkpoint was written
    # inside either streak (steps 4, 8, 10): the ones left hold finite weights.
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000006"]
    _, _, model = load_model(root / "last")
    assert all(p.isfinite().all() for p in model.parameters())


def test_a_blow_up_to_huge_weights_keeps_no_checkpoint_and_its_samples_warn(tiny_cfg):
    # lr=1e30: step 1 throws the weights to ~1e30 (finite), every later loss is infinite.
    blow_up = ["optim.lr=1e30", "optim.warmup_steps=1", "max_bad_steps=5", "save_every=5", "steps=50"]
    cfg = tiny_cfg(*blow_up, "sample.every=5", "sample.n=2")
    with (
        pytest.raises(FloatingPointError, match="5 non-finite steps in a row .*no checkpoint was kept"),
        pytest.warns(UserWarning, match=r"samples .*step_00000005 are degenerate \(\d+ of \d+ values are not finite"),
    ):
        trainer.train(cfg)
    assert not list((Path(cfg.out_dir) / "t" / "checkpoints").glob("step_*"))


def test_bf16_and_fp32_agree_on_a_tiny_model(tiny_cfg):
    from diffusion import build_process
    from modalities import build_modality
    from train.checkpoint import build_model

    cfg = tiny_cfg()
    modality = build_modality(cfg.modality, cfg.backbone.patch)
    cfg.modality.classes = ["a", "b", "c"]
    model = build_model(cfg, build_modality(cfg.modality, cfg.backbone.patch))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    process = build_process("gaussian", cfg.modality.diffusion)
    x0 = torch.randn(8, 3, 16, 16)
    cond = {"label": torch.arange(8) % 3}
    fn = modality.model_fn(model)
    fp32 = process.loss(fn, x0, cond, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = process.loss(fn, x0, cond, generator=torch.Generator().manual_seed(0))
    # Stated tolerance: bf16 keeps 8 mantissa bits; through two blocks the loss agrees to 2%.
    assert abs(bf16.item() - fp32.item()) / fp32.item() < 0.02


def test_sample_cli_is_seeded_and_cycles_labels_across_batches(tiny_cfg, tmp_path, monkeypatch, capsys):
    import infer.sample as cli
    from infer.cli import parse
    from modalities.image import Image

    ckpt = trainer.train(tiny_cfg("steps=5")).run_dir / "checkpoints" / "last"
    seen = []
    real_build = Image.noise_process

    def spying_build(*args, **kwargs):
        process = real_build(*args, **kwargs)
        real_sample = process.sample

        def sample(model_fn, shape, cond, **options):
            seen.append(cond["label"].tolist())
            return real_sample(model_fn, shape, cond, **options)

        process.sample = sample
        return process

    monkeypatch.setattr(Image, "noise_process", spying_build)

    def run(*extra):
        argv = [f"ckpt={ckpt}", "n=8", "batch=3", "steps=2", "device=cpu", *extra]
        return open(cli.sample(parse(cli.SampleArgs, argv)), "rb").read()

    first = run("seed=0", f"out={tmp_path / 'a'}")
    assert seen == [[0, 1, 2], [3, 4, 5], [0, 1]]  # one grid through the 6 classes, not restarted per batch
    assert "wrote 8 samples (dpmpp_2m, 2 steps, guidance 2, seed 0)" in capsys.readouterr().out
    assert run("seed=0", f"out={tmp_path / 'b'}") == first
    assert run("seed=1", f"out={tmp_path / 'c'}") != first
    seen.clear()
    run("label=square", f"out={tmp_path / 'd'}")
    assert seen == [[1, 1, 1], [1, 1, 1], [1, 1]]


def test_sample_cli_refuses_a_request_the_model_cannot_take(tiny_cfg, tmp_path):
    from infer.cli import parse
    from infer.sample import SampleArgs, sample

    result = trainer.train(tiny_cfg("steps=2"))
    ckpt = result.run_dir / "checkpoints" / "last"
    with pytest.raises(SystemExit, match=r"prompt= does not apply to this image model; it takes label="):
        sample(parse(SampleArgs, [f"ckpt={ckpt}", "n=2", "steps=2", "prompt=a red circle", f"out={tmp_path / 's'}"]))


def test_sample_cli_warns_when_the_samples_are_degenerate(tiny_cfg, tmp_path):
    from safetensors.torch import load_file, save_file

    from infer.cli import parse
    from infer.sample import SampleArgs, sample

    ckpt = trainer.train(tiny_cfg("steps=2")).run_dir / "checkpoints" / "last"
    weights = load_file(ckpt / "model.safetensors")
    save_file({k: v * 1e30 for k, v in weights.items()}, ckpt / "model.safetensors")  # a model that blew up
    with pytest.warns(UserWarning, match=rf"samples from {ckpt} are degenerate"):
        sample(parse(SampleArgs, [f"ckpt={ckpt}", "n=2", "steps=2", "device=cpu", f"out={tmp_path / 's'}"]))


def start_compile_without_a_compiler():
    """A 6-step tiny run with compile=true where inductor cannot build a CPU kernel (CXX names no
    compiler, its cache is empty), in the background (tests/conftest.py): mostly imports and inductor."""
    tmp = Path(tempfile.mkdtemp(prefix="polydiff-nocxx-"))
    env = {**os.environ, "CXX": str(tmp / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor")}
    args = [sys.executable, "train/train.py", *TINY, "steps=6", f"out_dir={tmp / 'runs'}", "name=c", "compile=true"]
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=expendable
    )
    return proc, [tmp]


@pytest.mark.background(start=start_compile_without_a_compiler)
def test_compile_without_a_compiler_says_so_and_trains_eagerly(tiny_cfg, background):
    done = background()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compile=true: torch.compile cannot build kernels here (" in done.stdout
    assert "InvalidCxxCompiler: No working C++ compiler" in done.stdout
    run = Path(next(a for a in done.args if a.startswith("out_dir=")).removeprefix("out_dir=")) / "c"
    assert "compile: false" in (run / "config.yaml").read_text()  # the run records how it trained
    logged = [float(line.split(",")[1]) for line in (run / "loss.csv").read_text().splitlines()]
    eager = trainer.train(tiny_cfg("steps=6", "name=e"))
    assert logged == pytest.approx([loss for _, loss in eager.losses], rel=1e-4)
