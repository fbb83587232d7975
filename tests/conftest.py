"""Shared test helpers: compose the real Hydra config with tiny overrides."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import struct
import subprocess
import sys
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


def load_bench(name: str):
    """bench/<name>.py as a fresh module of this process: its tests call its main() here, since a new
    interpreter for each call spends seconds importing torch."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_idx(path: Path, array: np.ndarray):
    """An idx file as MNIST ships them (gzip, unsigned bytes)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


# A test marked `background(start=...)` spends most of its time in a process of its own (torch.compile's
# first build, a pytest collection in a fresh copy): `start()` returns that process (Popen, stdout
# and stderr piped, text) and the paths to remove at the end, or None where the test will skip. These
# processes run one at a time, in the order of their tests, the first from the end of collection, each
# next one as soon as the one before has finished (checked before every test): so they run beside the
# tests before theirs instead of adding to the suite's wall-clock, with one such process at a time
# beside pytest (three at once took the suite's memory peak from 2.1 GB to 2.55 GB). Only tests
# collected and not deselected count. The test reads the finished process through the `background`
# fixture, which starts it at once if its turn has not come. Nobody reads its pipes until then: a
# process that prints more than a pipe holds (64 KB on Linux) would wait, so keep its output short.
_waiting = []  # (nodeid, start), not started yet, in test order
_started = {}  # nodeid -> (Popen, [paths to remove]), or None where start() said the test skips


def _start(nodeid):
    for i, (waiting, start) in enumerate(_waiting):
        if waiting == nodeid:
            del _waiting[i]
            _started[nodeid] = start()
            return


def _start_next():
    """The next waiting process, where none is running."""
    while _waiting and not any(s is not None and s[0].poll() is None for s in _started.values()):
        _start(_waiting[0][0])


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(session, config, items):
    if config.option.collectonly:
        return
    for item in items:
        marker = item.get_closest_marker("background")
        if marker is not None:
            _waiting.append((item.nodeid, marker.kwargs["start"]))
    _start_next()


def pytest_runtest_setup(item):
    _start_next()


def pytest_sessionfinish(session, exitstatus):
    for started in _started.values():
        if started is None:
            continue
        proc, paths = started
        if proc.poll() is None:  # its test did not run to the end, or the session stopped early
            proc.kill()
            proc.communicate()
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def background(request):
    """() -> this test's background process, finished (subprocess.CompletedProcess), or None where its
    start() returned None (the test skips)."""

    def result(timeout=600):
        if request.node.nodeid not in _started:  # its turn has not come: start it now
            _start(request.node.nodeid)
        if _started[request.node.nodeid] is None:
            return None
        proc = _started[request.node.nodeid][0]
        stdout, stderr = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    return result
