"""Pre-emption, kills mid-write, corrupt checkpoints, bad files, several processes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, expendable
from PIL import Image

import train.checkpoint as checkpoint
import train.train as trainer
from train.checkpoint import load_model

REPO = Path(__file__).resolve().parents[2]


def launch(tmp_path, name, *overrides, new_session=False):
    args = [sys.executable, str(REPO / "train" / "train.py"), *TINY, f"out_dir={tmp_path}", f"name={name}", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        args,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
        preexec_fn=expendable,
    )


def wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def loss_rows(run: Path) -> dict:
    rows = {}
    for line in (run / "loss.csv").read_text().splitlines():
        step, value = line.split(",")
        rows[int(step)] = float(value)
    return rows


def test_sigkill_then_resume_auto_reproduces_the_losses(tmp_path):
    common = ["steps=30", "save_every=10", "modality.shapes_items=128", "deterministic=true"]
    full = launch(tmp_path, "full", *common)  # side by side with the victim: one thread each
    victim = launch(tmp_path, "cut", *common)
    wait_for(tmp_path / "cut" / "checkpoints" / "step_00000010" / "model.safetensors", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert full.wait(timeout=300) == 0, full.stdout.read()
    resumed = launch(tmp_path, "cut", *common, "resume=auto")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    expected, got = loss_rows(tmp_path / "full"), loss_rows(tmp_path / "cut")
    steps = [int(line.split(",")[0]) for line in (tmp_path / "cut" / "loss.csv").read_text().splitlines()]
    assert steps == list(range(1, 31))  # the steps logged after the checkpoint, before the kill, are cut
    assert [got[s] for s in range(11, 31)] == [expected[s] for s in range(11, 31)]


def test_sigterm_writes_a_final_checkpoint(tmp_path):
    proc = launch(tmp_path, "term", "steps=100000", "save_every=5")
    wait_for(tmp_path / "term" / "checkpoints" / "step_00000005" / "model.safetensors", proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM" in out
    last = (tmp_path / "term" / "checkpoints" / "last").resolve()
    assert (last / "model.safetensors").exists() and (last / "state").is_dir()


def test_sigterm_to_the_process_group_with_loader_workers_still_checkpoints(tmp_path):
    """Slurm and `timeout` signal every process of the job, data loader workers included."""
    proc = launch(tmp_path, "group", "steps=100000", "save_every=5", "num_workers=1", new_session=True)
    wait_for(tmp_path / "group" / "checkpoints" / "step_00000005" / "model.safetensors", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM" in out
    assert ((tmp_path / "group" / "checkpoints" / "last").resolve() / "state").is_dir()


def test_max_minutes_stops_with_a_checkpoint_and_resume_continues(tiny_cfg, capsys):
    result = trainer.train(tiny_cfg("steps=1000", "max_minutes=1e-6", "save_every=500"))
    assert result.step == 1  # the budget is checked after every optimizer step
    assert "stopped: max_minutes=1e-06 spent at step 1" in capsys.readouterr().out
    last = (result.run_dir / "checkpoints" / "last").resolve()
    assert last.name == "step_00000001" and (last / "state").is_dir()
    assert trainer.train(tiny_cfg("steps=3", "resume=auto")).step == 3


def test_the_progress_bar_counts_to_the_steps_the_time_allows():
    inf = float("inf")
    assert trainer.steps_in_budget(1000, 100, 0, 10.0, 20.0) == 300  # 10 steps/s for 20 more seconds
    assert trainer.steps_in_budget(1000, 150, 50, 10.0, 20.0) == 350  # the pace since this invocation began
    assert trainer.steps_in_budget(250, 100, 0, 10.0, 20.0) == 250  # `steps` ends the run first
    assert trainer.steps_in_budget(1000, 100, 0, 10.0, inf) == 1000  # no max_minutes
    assert trainer.steps_in_budget(1000, 100, 0, 10.0, -0.5) == 100  # spent: the bar is full
    assert trainer.steps_in_budget(1000, 50, 50, 0.0, 20.0) == 1000  # no pace yet


def test_a_failed_write_leaves_the_previous_checkpoint(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("steps=4", "save_every=2")
    real_save_file = checkpoint.save_file
    calls = {"n": 0}

    def dies_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save_file(*args, **kwargs)
            raise OSError("disk full")  # the write of step 4 fails half way
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", dies_on_second)
    with pytest.raises(OSError, match="disk full"):
        trainer.train(cfg)
    root = Path(cfg.out_dir) / "t" / "checkpoints"
    assert (root / "last").resolve().name == "step_00000002"
    assert not (root / "step_00000004").exists()
    load_model(root / "last")  # intact and loadable


def test_keeps_last_k_and_best(tiny_cfg):
    result = trainer.train(tiny_cfg("steps=12", "save_every=2", "keep_last=2"))
    root = result.run_dir / "checkpoints"
    steps = sorted(p.name for p in root.glob("step_*"))
    best = (root / "best").resolve().name
    assert steps[-2:] == ["step_00000010", "step_00000012"]
    assert set(steps) == {"step_00000010", "step_00000012", best}


def test_truncated_or_mismatched_checkpoints_are_named(tiny_cfg, tmp_path):
    import shutil

    result = trainer.train(tiny_cfg("steps=2"))
    good = (result.run_dir / "checkpoints" / "last").resolve()
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"broken/model.safetensors is not a readable safetensors file"):
        load_model(broken)

    other = tmp_path / "other"
    shutil.copytree(good, other)
    text = (other / "config.yaml").read_text().replace("hidden_size: 64", "hidden_size: 96")
    (other / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"(?s)does not match the architecture.*file has \(64,.*needs \(96,"):
        load_model(other)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")

    alien = tmp_path / "alien"
    shutil.copytree(good, alien)
    text = (alien / "config.yaml").read_text().replace("hidden_size: 64", "hidden_size: 64\n  width_mult: 2")
    (alien / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"alien/config.yaml does not fit .*backbone.width_mult"):
        load_model(alien)


def make_folder(root: Path, n_good: int, bad: dict):
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(n_good // 2):
            Image.new("RGB", (20, 20), (i * 7 % 255, 80, 40)).save(root / label / f"{i}.png")
    for name, data in bad.items():
        (root / "cats" / name).write_bytes(data)


def test_bad_files_are_reported_skipped_and_counted(tiny_cfg, tmp_path, capsys):
    png = tmp_path / "x.png"
    Image.new("RGB", (20, 20)).save(png)
    bad = {
        "empty.png": b"",
        "corrupt.jpg": b"not a jpeg at all",
        "truncated.png": png.read_bytes()[:40],
        "notes.txt": b"hello",
    }
    make_folder(tmp_path / "imgs", 400, bad)
    cfg = tiny_cfg(
        "modality.dataset=folder",
        f"data.path={tmp_path / 'imgs'}",
        "steps=30",
        "batch_size=16",
        "data.bad_threshold=0.05",
    )
    with pytest.warns(UserWarning, match="empty.png: cannot decode image"):
        result = trainer.train(cfg)
    assert result.step == 30
    # Per epoch: 25 full batches of 16 hold 397 good and the 3 undecodable files; notes.txt is listed too.
    assert "4 bad of 401 items" in capsys.readouterr().out


def test_too_many_bad_files_stop_the_run(tiny_cfg, tmp_path):
    make_folder(tmp_path / "imgs", 100, {f"bad{i}.png": b"junk" for i in range(10)})
    cfg = tiny_cfg("modality.dataset=folder", f"data.path={tmp_path / 'imgs'}", "steps=30", "batch_size=16")
    with (
        pytest.raises(
            RuntimeError,
            match=r"(?s)\d+ of \d+ items \(\d+\.\d%\) could not be read, above data.bad_threshold=0.01.*bad\d.png",
        ),
        pytest.warns(UserWarning),
    ):
        trainer.train(cfg)


def test_missing_data_path_is_named(tiny_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        trainer.train(tiny_cfg("modality.dataset=folder", f"data.path={tmp_path / 'nope'}"))


def _two_process_run(out_dir):
    from conftest import compose_cfg

    cfg = compose_cfg([*TINY, f"out_dir={out_dir}", "name=ddp", "steps=3", "batch_size=8", "save_every=3"])
    seen = []
    real_encode = trainer.build_modality

    def spying_modality(*args, **kwargs):  # record the data each process trains on
        modality = real_encode(*args, **kwargs)
        encode = modality.encode
        modality.encode = lambda batch, *rest: seen.append(batch["x"].sum().item()) or encode(batch, *rest)
        return modality

    trainer.build_modality = spying_modality
    result = trainer.train(cfg)
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    flat = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    batches = [None] * world
    dist.all_gather_object(batches, (seen, result.losses))
    if rank == 0:
        torch.save(
            {
                "same_weights": all(torch.equal(gathered[0], g) for g in gathered[1:]),
                "batches": batches,
                "per_process": cfg.batch_size // world,
            },
            Path(out_dir) / "report.pt",
        )


@pytest.mark.slow
def test_two_processes_average_gradients(tmp_path):
    # debug_launcher forks two gloo workers. Forking a process that already ran torch's OpenMP
    # threads (this pytest process has) can deadlock the children, so launch from a fresh interpreter.
    script = (
        "import sys; sys.path[:0] = sys.argv[2:]; from accelerate import debug_launcher; "
        "import test_reliability as t; debug_launcher(t._two_process_run, args=(sys.argv[1],), num_processes=2)"
    )
    paths = [str(REPO / "tests" / "train"), str(REPO / "tests"), str(REPO)]
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), *paths], check=True, timeout=300, cwd=REPO, preexec_fn=expendable
    )
    report = torch.load(tmp_path / "report.pt", weights_only=True)
    assert report["same_weights"]  # gradients were averaged: replicas identical
    (seen0, _), (seen1, _) = report["batches"]
    assert len(seen0) == len(seen1) == 3 and seen0 != seen1  # each process saw different data
    assert report["per_process"] * 2 == 8
    assert (tmp_path / "ddp" / "checkpoints" / "step_00000003").exists()
