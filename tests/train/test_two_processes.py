"""Two training processes as one DDP run (torchrun on this machine).

This file sorts after every other test file on purpose: the test needs torchrun and two training
processes beside pytest (about 1 GB more memory) and TCP on 127.0.0.1, so where a small or sandboxed
machine cannot give it those, it fails or skips alone, after the rest of the suite has run.
"""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from conftest import TINY, csv_steps, expendable

import train.train as trainer

REPO = Path(__file__).resolve().parents[2]


def loopback_works() -> bool:
    """Whether a TCP connection to 127.0.0.1 can be made here (torchrun's workers meet over one)."""
    try:
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname(), timeout=5):
                return True
    except OSError:  # e.g. a network namespace whose loopback interface is down
        return False


def run_torchrun(cmd, timeout, marker: str, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run for torchrun, then every process whose command line holds `marker` (a path of this
    test's) killed. torchrun starts its workers in sessions of their own, so neither killing its process
    group nor its own end reaches them: a worker left behind (its agent killed for memory, say) would
    hold memory, and, were it writing to a pipe of ours, keep this test waiting however long the
    timeout. Output goes to files instead."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(cmd, stdout=out, stderr=err, **kwargs)
        try:
            process.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        for left in psutil.process_iter(["cmdline"]):
            if any(marker in arg for arg in left.info["cmdline"] or ()):
                left.kill()
        process.wait()
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(cmd, process.returncode, out.read(), err.read())
    if timed_out:
        pytest.fail(f"{' '.join(map(str, cmd))} still running after {timeout} s\n{result.stdout}{result.stderr}")
    return result


@pytest.mark.slow
def test_two_processes_without_a_name_are_one_ddp_run(tmp_path, tiny_cfg):
    if not loopback_works():
        pytest.skip("no TCP connection to 127.0.0.1 on this machine: torchrun's workers cannot meet")
    overrides = [*TINY, "steps=3", "batch_size=8", "save_every=3"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # --local-addr: without it the workers meet at the machine's host name, and where that name does not
    # resolve (a sandbox whose /etc/hosts lacks it) they wait until the timeout instead of failing.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    torchrun += ["--local-addr", "127.0.0.1"]
    cmd = [*torchrun, "train/train.py", *overrides, f"out_dir={tmp_path}/ddp"]
    out = run_torchrun(cmd, 180, str(tmp_path), cwd=REPO, env=env, text=True, preexec_fn=expendable)
    assert out.returncode == 0, f"exit {out.returncode} (-9: killed, out of memory?)\n{out.stdout}{out.stderr}"
    (run,) = (tmp_path / "ddp").iterdir()  # one folder for both processes
    assert csv_steps(run) == [1, 2, 3]  # one writer: each step once
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    assert out.stdout.count("done at step 3") == 1
    # Each process trains on half the batch with its own noise: the averaged loss is not the
    # one-process run's (two independent copies of it would be).
    alone = trainer.train(tiny_cfg("steps=3", "batch_size=8", "save_every=3"))
    two = [float(line.split(",")[1]) for line in (run / "loss.csv").read_text().splitlines()]
    assert two != [loss for _, loss in alone.losses]
