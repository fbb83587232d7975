"""The run folder runs/<name>: one name for every process, one live run at a time, and logs that
say each step once.

    runs/<name>/
        run.lock       "<pid> <host>" of the live run; removed when it exits
        config.yaml    loss.csv    loss.png    tb/    samples/    checkpoints/

A folder that already holds a run is refused unless the command says what to do with it:
`resume=...` continues it, `overwrite=true` deletes it first.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from datetime import datetime
from pathlib import Path

from accelerate.utils import broadcast_object_list
from omegaconf import OmegaConf

LOCK = "run.lock"


def choose_run_dir(cfg, accelerator) -> Path:
    """runs/<name>. The main process picks the name (a time stamp when none is given, the newest
    run of the modality for `resume=auto` without a name) and tells the others, so every process
    of a launch writes to the same folder. Needs the accelerator: it forms the process group."""
    out = Path(cfg.out_dir)
    name = [cfg.name]
    if accelerator.is_main_process and cfg.name is None:
        runs = sorted(out.glob(f"{cfg.modality.name}-*"), key=lambda p: p.stat().st_mtime)
        if cfg.resume == "auto" and runs:  # continue the newest run of this modality
            name = [runs[-1].name]
        else:
            name = [f"{cfg.modality.name}-{datetime.now():%Y%m%d-%H%M%S}"]
    broadcast_object_list(name)
    return out / name[0]


class RunLock:
    """`run.lock` in a run folder, naming the holder's PID and host, so two live runs never share a
    folder. A lock left by a process that died (SIGKILL, power loss) on this host is taken over with
    a message; one held on another host cannot be checked from here and is refused.

    Created with O_EXCL, so of two runs starting at once exactly one gets it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.me = f"{os.getpid()} {socket.gethostname()}"
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self.held:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.me + "\n")
            self.held = True
        return self

    def _take_over_if_stale(self):
        try:
            holder = self.path.read_text().strip()
        except FileNotFoundError:
            return  # released meanwhile: try again
        pid, _, host = holder.partition(" ")
        if not pid.isdigit():  # being written by a run that started a moment ago?
            time.sleep(0.5)
            if self.path.exists() and self.path.read_text().strip() == holder:
                raise RuntimeError(
                    f"{self.path} holds {holder!r}, not '<pid> <host>'; delete it if no run uses the folder"
                )
            return
        if host != socket.gethostname():
            raise RuntimeError(
                f"{self.path.parent} is in use by process {pid} on host {host} ({self.path}); "
                f"pick another name=, or delete {self.path} if that run is gone"
            )
        if _alive(int(pid)):
            raise RuntimeError(
                f"{self.path.parent} is in use by running process {pid} on this host ({self.path}); "
                "two runs must not write one folder: pick another name="
            )
        # Renamed aside rather than deleted, so of two runs taking over at once only one succeeds.
        grave = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return  # another run took it over first
        if grave.read_text().strip() != holder:  # moved a fresh lock that replaced the stale one: put it back
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass
        else:
            print(f"taking over the stale lock {self.path}: process {pid} on {host} is no longer running")
        grave.unlink()

    def release(self):
        if self.held and self.path.exists() and self.path.read_text().strip() == self.me:
            self.path.unlink()
        self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def claim_run_dir(cfg, accelerator, run_dir: Path) -> RunLock:
    """Lock `run_dir` for this run (main process) and refuse it when it already holds a run and the
    command neither resumes nor overwrites it. A refusal is raised on every process, so none waits
    for the others forever. Returns the lock, to be released when the run ends."""
    lock = RunLock(run_dir)
    error = [None]  # the exception, raised on every process
    if accelerator.is_main_process:
        try:
            lock.acquire()
            previous = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
            if previous and cfg.overwrite:
                print(f"overwrite=true: deleting the previous run in {run_dir} ({', '.join(previous)})")
                for name in previous:
                    path = run_dir / name
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            elif previous and not cfg.resume:
                lock.release()
                raise FileExistsError(
                    f"{run_dir} already holds a run ({', '.join(previous)}); continue it with resume=auto, "
                    "start it afresh with overwrite=true, or pick another name="
                )
        except (RuntimeError, FileExistsError) as e:
            error = [e]
    broadcast_object_list(error)
    if error[0] is not None:
        raise error[0]
    return lock


class RunLog:
    """loss.csv and the TensorBoard scalars (tb/), written by the main process.

    Opened at `step` (the checkpoint a run resumes from, 0 for a new run), it first drops what an
    earlier attempt logged after that step, so that after a kill and a resume each step is logged
    once: rows of loss.csv beyond `step` are cut, and TensorBoard is told to purge its events from
    step + 1 on (SummaryWriter's purge_step)."""

    def __init__(self, run_dir: Path, step: int, cfg, enabled: bool):
        self.csv, self.writer = Path(run_dir) / "loss.csv", None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        if self.csv.exists():
            rows = [row for row in self.csv.read_text().splitlines() if _row_step(row) <= step]
            self.csv.write_text("".join(row + "\n" for row in rows))
        self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=step + 1)
        self.writer.add_hparams(flat_hparams(cfg), {})

    def write(self, step: int, loss: float, **scalars):
        if self.writer is None:
            return
        with open(self.csv, "a") as f:
            f.write(f"{step},{loss!r}\n")
        for key, value in {"loss": loss, **scalars}.items():
            self.writer.add_scalar(key, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _row_step(row: str) -> float:
    """The step of a loss.csv row; inf for a row cut short by a kill, so that it is dropped."""
    step, _, value = row.partition(",")
    return int(step) if step.isdigit() and value else math.inf


def flat_hparams(cfg) -> dict:
    """The config flattened to scalars, as TensorBoard's hparams want."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                text = value if isinstance(value, (int, float, str, bool)) else str(value)
                if not (isinstance(text, str) and len(text) > 200):  # e.g. a serialised tokenizer
                    flat[f"{prefix}{key}"] = text

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def outputs_line(why: str, step: int, run_dir: Path) -> str:
    """The one line that ends a run: why it stopped, and the outputs that exist."""
    last = run_dir / "checkpoints" / "last"
    parts = [f"checkpoint {last}" if last.exists() else "no checkpoint"]
    samples = sorted((run_dir / "samples").glob("step_*"))
    if samples:
        parts.append(f"samples {samples[-1]}")
    if (run_dir / "tb").is_dir():
        parts.append(f"TensorBoard logs {run_dir / 'tb'}")
    return f"{why} at step {step}: " + ", ".join(parts)
