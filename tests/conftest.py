"""Shared test helpers: compose the real Hydra config with tiny overrides."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

try:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
except ImportError as e:  # a pytest from outside the environment polydiff was installed into
    raise pytest.UsageError(
        f"{e} in the Python running pytest ({sys.executable}): install polydiff into it first, and run "
        'both through one interpreter: python -m pip install -e ".[dev]", then python -m pytest'
    ) from e

from train.config import CONFIG_DIR, register_schemas

register_schemas()

# A model and data small enough for two CPU cores: dit_xs on 16x16 shapes.
TINY = [
    "backbone=dit_xs",
    "modality.size=16",
    "modality.shapes_items=512",
    "batch_size=16",
    "num_workers=0",
    "log_every=1",
    "save_every=1000",
    "sample.every=0",
    "sample.steps=4",
    "optim.warmup_steps=10",
    "optim.lr=1e-3",
]


def expendable() -> None:
    """preexec_fn for the torch processes a test starts: where memory runs out (a small CI container),
    the kernel then kills one of them, failing that one test, rather than pytest, the largest process,
    and with it every test still to run."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:  # no /proc (not Linux): the kernel's own choice
        pass


def csv_steps(run: Path) -> list[int]:
    """The steps a run's loss.csv lists, in order."""
    return [int(line.split(",")[0]) for line in (run / "loss.csv").read_text().splitlines()]


def compose_cfg(overrides=()):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def tiny_cfg(tmp_path):
    """tiny_cfg(*overrides) -> a composed config writing under tmp_path."""

    def make(*overrides):
        return compose_cfg([*TINY, f"out_dir={tmp_path / 'runs'}", "name=t", *overrides])

    return make


# A 20-step dit_xs text model on the built-in corpus, through the real trainer.
TINY_TEXT = [
    "modality=text_discrete",
    "backbone=dit_xs",
    "steps=20",
    "batch_size=8",
    "num_workers=0",
    "sample.every=20",
    "sample.steps=4",
    "sample.sampler=ancestral",
    "sample.n=2",
    "save_every=20",
    "log_every=10",
    "modality.seq_len=32",
    "optim.warmup_steps=5",
]


@pytest.fixture
def text_run(tmp_path):
    """text_run(*overrides) -> the trainer's result for a tiny text run under tmp_path."""
    from train.train import train

    def run(*overrides):
        return train(compose_cfg([*TINY_TEXT, f"out_dir={tmp_path}", "name=t", *overrides]))

    return run


def write_idx(path: Path, array: np.ndarray):
    """An idx file as MNIST ships them (gzip, unsigned bytes)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


# torch.compile's check (tests/bench/compile_check.py) spends 25-40 s in inductor's first build, mostly
# g++ waiting on its own; started when collection is done, it overlaps the tests before it instead of
# adding to the suite's wall-clock. Started only where the test that reads it was collected.
COMPILE_CHECK_TEST = "test_compiled_and_eager_blocks_give_the_same_loss_and_gradients"
_compile_check = {}


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(session, config, items):
    if any(item.name == COMPILE_CHECK_TEST for item in items) and not config.option.collectonly:
        repo = Path(__file__).resolve().parents[1]
        cache = tempfile.mkdtemp(prefix="polydiff-inductor-")  # empty: the build a fresh machine pays
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(repo)}
        proc = subprocess.Popen(
            [sys.executable, str(repo / "tests" / "bench" / "compile_check.py")],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _compile_check.update(proc=proc, cache=cache)


def pytest_sessionfinish(session, exitstatus):
    proc = _compile_check.get("proc")
    if proc is not None and proc.poll() is None:  # its test was deselected or the session stopped early
        proc.kill()
        proc.communicate()
    if "cache" in _compile_check:
        shutil.rmtree(_compile_check["cache"], ignore_errors=True)


@pytest.fixture
def compile_check():
    """() -> the finished compile check (subprocess.CompletedProcess-like: returncode, stdout, stderr)."""

    def result():
        proc = _compile_check["proc"]
        stdout, stderr = proc.communicate(timeout=600)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    return result
