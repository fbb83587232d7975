"""Run folders: one per run, locked while it runs, logs that say each step once."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import csv_steps

import train.train as trainer
from train.run_dir import RunLock

REPO = Path(__file__).resolve().parents[2]


def test_a_used_run_folder_is_refused_unless_resumed_or_overwritten(tiny_cfg):
    first = trainer.train(tiny_cfg("steps=4", "save_every=2"))
    log = (first.run_dir / "loss.csv").read_text()
    with pytest.raises(FileExistsError, match=r"t already holds a run \(checkpoints, config.*resume=auto.*overwrite"):
        trainer.train(tiny_cfg("steps=2"))
    assert (first.run_dir / "loss.csv").read_text() == log  # nothing of the refused run was written
    assert (first.run_dir / "checkpoints" / "last").resolve().name == "step_00000004"

    with pytest.raises(ValueError, match="overwrite=true deletes the run that resume=auto continues"):
        trainer.train(tiny_cfg("steps=2", "overwrite=true", "resume=auto"))
    trainer.train(tiny_cfg("steps=2", "overwrite=true"))
    assert csv_steps(first.run_dir) == [1, 2]
    assert sorted(p.name for p in (first.run_dir / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert not (first.run_dir / "run.lock").exists()  # released at exit


def test_a_live_run_holds_its_folder_and_a_stale_lock_is_taken_over(tiny_cfg, monkeypatch, capsys):
    cfg = tiny_cfg("steps=2")
    run_dir = Path(cfg.out_dir) / "t"
    seen = {}
    real_save = trainer.save_checkpoint

    def save_and_try_a_second_run(accelerator, root, step, *args, **kwargs):
        seen["lock"] = (run_dir / "run.lock").read_text()
        with pytest.raises(RuntimeError, match=rf"in use by running process {os.getpid()} on this host"):
            RunLock(run_dir).acquire()  # what a second run with the same name=t meets
        return real_save(accelerator, root, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", save_and_try_a_second_run)
    trainer.train(cfg)
    assert seen["lock"] == f"{os.getpid()} {socket.gethostname()}\n"
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a run killed without releasing its lock
    (run_dir / "run.lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    assert trainer.train(tiny_cfg("steps=3", "resume=auto")).step == 3
    assert f"taking over the stale lock {run_dir / 'run.lock'}: process {dead.pid}" in capsys.readouterr().out

    (run_dir / "run.lock").write_text("4242 other-machine\n")  # cannot be checked from here
    with pytest.raises(RuntimeError, match=r"in use by process 4242 on host other-machine.*delete"):
        trainer.train(tiny_cfg("steps=4", "resume=auto"))
    assert (run_dir / "run.lock").read_text() == "4242 other-machine\n"


def test_resume_cuts_the_logs_back_to_the_checkpoint(tiny_cfg):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = trainer.train(tiny_cfg("steps=6", "save_every=4"))
    ckpts = first.run_dir / "checkpoints"
    for name in ("step_00000006", "last", "best"):  # as if killed after logging steps 5-6, before their checkpoint
        path = ckpts / name
        path.unlink() if path.is_symlink() else shutil.rmtree(path)
    resumed = trainer.train(tiny_cfg("steps=6", "save_every=4", "resume=auto"))
    assert [s for s, _ in resumed.losses] == [5, 6]
    assert csv_steps(first.run_dir) == [1, 2, 3, 4, 5, 6]  # each step once
    events = EventAccumulator(str(first.run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    logged = [float(line.split(",")[1]) for line in (first.run_dir / "loss.csv").read_text().splitlines()]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(logged)


def test_resuming_with_other_positions_is_refused_naming_them(tiny_cfg):
    """Positions have no weights: without this check an image run trained with rotary positions
    (the default until sincos became the image default) would resume as a sincos model."""
    trainer.train(tiny_cfg("steps=2", "save_every=2", "sample.every=0", "backbone.pos=rope"))
    with pytest.raises(ValueError, match=r"was trained with backbone\.pos=rope \(this run: sincos\)"):
        trainer.train(tiny_cfg("steps=4", "sample.every=0", "resume=auto"))
    resumed = trainer.train(tiny_cfg("steps=4", "sample.every=0", "resume=auto", "backbone.pos=rope"))
    assert [s for s, _ in resumed.losses][-1] == 4 and resumed.model.pos == "rope"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny_cfg, tmp_path, capsys):
    first = trainer.train(tiny_cfg("steps=4", "save_every=2"))
    newest = first.run_dir / "checkpoints" / "step_00000004" / "state" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short
    resumed = trainer.train(tiny_cfg("steps=5", "save_every=2", "resume=auto"))
    out = capsys.readouterr().out
    assert f"{newest}: truncated (1000 bytes" in out and "falling back to an older one" in out
    assert "resumed from" in out and "step_00000002 at step 2" in out
    assert resumed.step == 5 and [s for s, _ in resumed.losses] == [3, 4, 5]

    last = (first.run_dir / "checkpoints" / "last").resolve()
    (last / "state" / "optimizer.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"resume=.*damaged: {last}/state/optimizer.bin: empty"):
        trainer.train(tiny_cfg(f"resume={last}", "name=other"))  # named by hand: no fallback
    for ckpt in (first.run_dir / "checkpoints").glob("step_*"):
        (ckpt / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?s)no intact checkpoint in .*step_00000005/model.safetensors: truncated"):
        trainer.train(tiny_cfg("steps=6", "resume=auto"))


def test_a_short_run_still_leaves_one_sample_grid(tiny_cfg, capsys):
    result = trainer.train(tiny_cfg("steps=2", "sample.every=1000", "sample.n=4"))
    grid = result.run_dir / "samples" / "step_00000002.png"
    assert grid.stat().st_size > 100
    assert (
        f"done at step 2: checkpoint {result.run_dir / 'checkpoints' / 'last'}, samples {grid},"
        in capsys.readouterr().out
    )


def test_the_final_model_always_gets_a_grid(tiny_cfg):
    """Grids at every sample.every steps and one of the final model, also off that rhythm."""
    result = trainer.train(tiny_cfg("steps=3", "sample.every=2", "sample.n=2"))
    assert sorted(p.name for p in (result.run_dir / "samples").iterdir()) == ["step_00000002.png", "step_00000003.png"]


def test_sample_every_zero_draws_nothing_and_the_end_line_says_so(tiny_cfg, capsys):
    result = trainer.train(tiny_cfg("steps=2", "sample.every=0"))
    assert not (result.run_dir / "samples").exists()
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("done at step 2")][0]
    assert "samples" not in line and "checkpoints/last" in line


def test_accelerate_launch_asking_for_processes_it_did_not_start_is_named(tiny_cfg, monkeypatch, capsys):
    # `accelerate launch --cpu --num_processes 2` runs one process with MASTER_ADDR set and no WORLD_SIZE.
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    trainer.train(tiny_cfg("steps=1"))
    assert "warning: launched for several processes (MASTER_ADDR is set" in capsys.readouterr().out
