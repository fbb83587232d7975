"""Train the shared DiT on one modality.

    accelerate launch train/train.py modality=image            # one or many GPUs
    python train/train.py modality=image backbone=dit_xs       # one process, CPU or GPU

Reads top to bottom: config -> accelerator -> run folder (train/run_dir.py: chosen, locked) ->
seed -> modality -> DiT -> EMA -> optimizer and schedule -> loader -> accelerator.prepare ->
resume -> loop (encode, loss, backward, clip, step, EMA, log, sample, save while healthy).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python train/train.py` without an install: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from backbones.dit import check_shape
from modalities import build_modality
from modalities.data import BadDataTracker, Tolerant, collate
from train.checkpoint import build_model, check_resumed_architecture, resume_state, save_checkpoint
from train.config import CONFIG_DIR, register_schemas, validate
from train.ema import update_ema
from train.health import finite_weights, warn_if_degenerate
from train.plots import plot_losses
from train.run_dir import RunLog, choose_run_dir, claim_run_dir, outputs_line

register_schemas()
logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise here


class TrainState:
    """Counters and the noise generator, saved and restored with the checkpoint.

    Noise, timesteps and condition dropout come from `generator`, not the global RNG, so that a
    resumed run draws exactly what the uninterrupted one would have."""

    def __init__(self, seed: int, device):
        self.step = self.epoch = self.batch_in_epoch = self.bad_steps = 0
        self.best_loss = math.inf
        self.coarse_done = False  # coarse_share: the run has moved on to full resolution
        self.generator = torch.Generator(device=device).manual_seed(seed + 1)

    def state_dict(self):
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "bad_steps": self.bad_steps,
            "best_loss": self.best_loss,
            "coarse_done": self.coarse_done,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state):
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.bad_steps, self.best_loss = state["bad_steps"], state["best_loss"]
        self.coarse_done = state.get("coarse_done", True)  # saved before coarse_share: never coarse
        self.generator.set_state(state["generator"])


def make_accelerator(cfg) -> Accelerator:
    """The Accelerator, made before anything else talks to other processes: it forms the process
    group with the launch's options (ACCELERATE_USE_CPU...), which a bare PartialState() would not."""
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        # A seedable sampler makes the data order a function of (seed, epoch): needed for exact resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    # `accelerate launch --cpu --num_processes N` starts one process (Accelerate starts several CPU
    # processes only through MPI) and says nothing; it does set MASTER_ADDR, as torchrun sets WORLD_SIZE.
    world_size = int(os.environ.get("WORLD_SIZE", 0))
    asked = f"WORLD_SIZE={world_size}" if world_size > accelerator.num_processes else None
    if not world_size and accelerator.num_processes == 1 and "MASTER_ADDR" in os.environ:
        asked = "MASTER_ADDR is set, as `accelerate launch --num_processes N` sets it"
    if asked:
        accelerator.print(
            f"warning: launched for several processes ({asked}) but training as {accelerator.num_processes}. "
            "`accelerate launch --cpu` starts one process; for several CPU processes use "
            "`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N train/train.py ...`"
        )
    return accelerator


def peak_lr(cfg) -> float:
    """optim.lr, or while it is null the backbone preset's own (backbone.lr): a small model trains
    well at 1e-3 and a DiT-XL at 1e-4, so one optimiser default cannot suit every size."""
    return cfg.optim.lr if cfg.optim.lr is not None else cfg.backbone.lr


FUSED_ADAMW_DEVICES = ("cuda", "cpu", "xpu", "mps")  # devices with torch's one-kernel AdamW (CPU: torch 2.4+)


def adamw(params, device_type: str, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0, fused: bool = True):
    """torch's AdamW, fused where the device has the kernel (optim.fused, on by default). The default
    implementation loops over the parameters with about ten elementwise passes each; the fused one
    makes one. On a CPU that is a few percent of a small model's step (bench/RESULTS.md, issue 12)."""
    fused = fused and device_type in FUSED_ADAMW_DEVICES
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused or None)


def make_optimizer(cfg, model, device):
    o = cfg.optim
    optimizer = adamw(model.parameters(), device.type, peak_lr(cfg), o.betas, o.weight_decay, o.fused)

    def lr_factor(step):  # linear warm-up, then constant or cosine to zero
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            progress = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def make_loader(cfg, dataset, accelerator) -> DataLoader:
    ways = accelerator.num_processes * cfg.grad_accum  # the global batch is split this many ways
    per_process = cfg.batch_size // ways
    if per_process * ways != cfg.batch_size or per_process < 1:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be a multiple of processes ({accelerator.num_processes}) x "
            f"grad_accum ({cfg.grad_accum}); e.g. batch_size={max(1, per_process) * ways}"
        )
    if len(dataset) < per_process:  # drop_last would give epochs without a batch: the loop would never end
        raise ValueError(
            f"the training data has {len(dataset)} items, fewer than one batch of {per_process} per process; "
            f"lower batch_size or add data (data.path)"
        )
    return DataLoader(
        Tolerant(dataset),
        batch_size=per_process,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        persistent_workers=False,
        worker_init_fn=ignore_sigterm,
    )


def ignore_sigterm(worker_id: int):
    """Loader workers ignore SIGTERM. Schedulers (Slurm, `timeout`, Kubernetes) signal the whole
    process group; a worker that died of it would crash the main process mid-step instead of
    letting it write its checkpoint and shut the workers down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def draw_samples(cfg, modality, process, ema_model, device, path: Path, seed: int = 0) -> str:
    """Sample a grid from the EMA model with the `sample:` settings and save it."""
    s = cfg.sample
    generator = torch.Generator(device=device).manual_seed(seed)
    ema_model.eval()
    x0 = process.sample(
        modality.model_fn(ema_model),
        modality.sample_shape(s.n),
        modality.sample_cond(s.n, device),
        steps=s.steps,
        sampler=s.sampler or process.samplers[0],
        guidance=s.guidance,
        generator=generator,
        device=device,
        **modality.sample_options(ema_model),
    )
    warn_if_degenerate(x0, f"samples {path}")
    return modality.save(modality.decode(x0, ema_model), path)


def preview(cfg, modality, process, ema_model, device, path: Path) -> str:
    """What training shows of the model at `path`: the modality's own picture (Modality.preview),
    else a grid sampled through the noise process."""
    return modality.preview(ema_model, device, path) or draw_samples(cfg, modality, process, ema_model, device, path)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list  # (step, mean loss over the logging window) of this process's run
    model: torch.nn.Module  # the trained (unwrapped) model, for tests and notebooks
    ema_model: torch.nn.Module


def train(cfg) -> TrainResult:
    """Run (or resume) the training that `cfg` describes, in a run folder locked while it runs."""
    validate(cfg)
    modality = build_modality(cfg.modality, cfg.backbone.patch, cfg.data)
    cfg.backbone.pos = modality.backbone_pos(cfg.backbone)  # recorded in config.yaml, as the model was built
    check_shape(cfg.backbone.hidden_size, cfg.backbone.num_heads, cfg.backbone.pos)
    modality.check(cfg.backbone)

    accelerator = make_accelerator(cfg)
    run_dir = choose_run_dir(cfg, accelerator)
    lock = claim_run_dir(cfg, accelerator, run_dir)  # refuses a folder holding another run
    try:
        return fit(cfg, accelerator, modality, run_dir)
    finally:
        lock.release()


def fit(cfg, accelerator, modality, run_dir: Path) -> TrainResult:
    """The training itself: data, model, EMA, optimizer, resume, loop."""
    set_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    device = accelerator.device

    train_set = modality.dataset("train")
    OmegaConf.set_struct(cfg, False)  # record what the data taught us (classes, vocabulary) in the config
    cfg.modality = OmegaConf.merge(cfg.modality, modality.resolve(train_set))
    OmegaConf.set_struct(cfg, True)
    modality = build_modality(cfg.modality, cfg.backbone.patch, cfg.data)

    model = build_model(cfg, modality).to(device)
    model.set_attention_backend(cfg.attention, device.type)
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    if cfg.compile:
        problem = compile_problem(device)
        if problem is None:
            model.compile_blocks()
        else:
            accelerator.print(f"compile=true: torch.compile cannot build kernels here ({problem}); training eagerly")
            cfg.compile = False  # config.yaml records how the run trained
    process = modality.noise_process()  # None for a model trained without one (modality=image_vae)
    optimizer, scheduler = make_optimizer(cfg, model, device)
    loader = make_loader(cfg, train_set, accelerator)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = TrainState(cfg.seed + accelerator.process_index, device)
    accelerator.register_for_checkpointing(scheduler, ema_model, state)

    ckpt_root = run_dir / "checkpoints"
    last_good = resume_state(accelerator, cfg.resume, run_dir)  # the newest checkpoint of a healthy run
    if last_good is not None:
        check_resumed_architecture(cfg, last_good)
        accelerator.print(f"resumed from {last_good} at step {state.step}")
    if accelerator.is_main_process:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    log = RunLog(run_dir, state.step, cfg, enabled=accelerator.is_main_process)  # cut back to this step

    # SIGTERM (what schedulers send before pre-emption) asks for a checkpoint and a clean exit.
    # max_minutes does the same when the wall-clock budget is spent. Processes agree on stopping.
    stop = {"signal": None, "now": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))

    tracker = BadDataTracker(cfg.data.bad_threshold)
    losses, window = [], []
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not accelerator.is_main_process, desc=run_dir.name)
    t0, seen = time.perf_counter(), 0
    deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else math.inf
    started, first_step = time.monotonic(), state.step
    modality.coarse = cfg.coarse_share > 0 and not state.coarse_done
    model.train()
    try:
        while state.step < cfg.steps and not stop["now"]:
            loader.set_epoch(state.epoch)
            if state.batch_in_epoch == 0:  # files found unusable while listing (wrong extension...) count too
                tracker.add(0, loader.dataset.skipped, verbose=accelerator.is_main_process and state.epoch == 0)
            batches = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
            for batch in batches:
                state.batch_in_epoch += 1
                tracker.add(batch["n"], batch["bad"], verbose=True)
                with accelerator.accumulate(model):
                    cond = modality.cond(batch)
                    if cond:  # condition dropout for guidance, drawn from the checkpointed generator
                        rows = next(iter(cond.values())).shape[0]
                        draw = torch.rand(rows, generator=state.generator, device=device)
                        cond["drop"] = draw < cfg.backbone.cond_dropout
                    loss = modality.loss(process, model, batch, cond, generator=state.generator)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        # The norm is taken after the gradients were averaged over processes, so every
                        # process reaches the same verdict (a NaN loss anywhere makes it NaN everywhere).
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
                        finite = bool(torch.isfinite(grad_norm))
                        if finite:
                            optimizer.step()
                            state.bad_steps = 0
                        else:
                            state.bad_steps += 1
                            accelerator.print(
                                f"warning: non-finite loss or gradient at step {state.step}, step skipped "
                                f"({state.bad_steps} in a row)"
                            )
                            if state.bad_steps >= cfg.max_bad_steps:
                                raise FloatingPointError(
                                    f"{state.bad_steps} non-finite steps in a row (max_bad_steps={cfg.max_bad_steps}); "
                                    + (
                                        f"the last good checkpoint is {last_good}"
                                        if last_good
                                        else "no checkpoint was kept"
                                    )
                                    + ". Lower optim.lr, or check the data."
                                )
                        optimizer.zero_grad(set_to_none=True)
                seen += batch["n"]
                window.append(loss.detach().float())
                if not accelerator.sync_gradients:
                    continue

                scheduler.step()
                update_ema(ema_model, accelerator.unwrap_model(model), cfg.ema_decay, state.step)
                state.step += 1
                now = time.monotonic()
                bar.total = steps_in_budget(cfg.steps, state.step, first_step, now - started, deadline - now)
                bar.update(1)
                stop["now"] = any_process(accelerator, stop["signal"] is not None or now > deadline)
                if modality.coarse and any_process(accelerator, coarse_spent(cfg, state.step, now - started)):
                    modality.coarse, state.coarse_done = False, True
                    if accelerator.is_main_process:
                        bar.write(f"step {state.step}: coarse_share={cfg.coarse_share} spent; on at full resolution")

                if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                    tracker.check(
                        *accelerator.reduce(torch.tensor([tracker.seen, tracker.bad], device=device)).tolist()
                    )
                    mean_loss = accelerator.reduce(torch.stack(window).nanmean(), "mean").item()
                    rate = seen * accelerator.num_processes / (time.perf_counter() - t0)
                    losses.append((state.step, mean_loss))
                    log.write(state.step, mean_loss, lr=scheduler.get_last_lr()[0], samples_per_s=rate)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{rate:.0f}")
                    window, t0, seen = [], time.perf_counter(), 0
                if accelerator.is_main_process and cfg.sample.every and state.step % cfg.sample.every == 0:
                    preview(cfg, modality, process, ema_model, device, run_dir / "samples" / f"step_{state.step:08d}")
                if state.step % cfg.save_every == 0 or state.step == cfg.steps or stop["now"]:
                    # Inside a non-finite streak, or with weights already blown up, a checkpoint would
                    # replace `last` by a broken model: keep the last good one instead.
                    if any_process(accelerator, state.bad_steps > 0 or not finite_weights(model, ema_model)):
                        accelerator.print(
                            f"warning: no checkpoint at step {state.step}: the run is unhealthy ({state.bad_steps} "
                            "non-finite steps in a row, or non-finite weights); "
                            f"the last good one is {last_good or 'none yet'}"
                        )
                    else:
                        is_best = bool(losses) and losses[-1][1] < state.best_loss
                        if is_best:
                            state.best_loss = losses[-1][1]
                        last_good = save_checkpoint(
                            accelerator, ckpt_root, state.step, cfg, ema_model, cfg.keep_last, is_best
                        )
                if state.step >= cfg.steps or stop["now"]:
                    break
            else:  # the epoch ran out
                seen_all, bad_all = accelerator.reduce(
                    torch.tensor([tracker.seen, tracker.bad], device=device)
                ).tolist()
                tracker.check(seen_all, bad_all, final=True)
                accelerator.print(f"epoch {state.epoch} done: {tracker.summary(seen_all, bad_all)}")
                tracker.reset()
                state.epoch += 1
                state.batch_in_epoch = 0

    except BaseException:
        log.close()  # a run that raises (non-finite stop, bad data) leaves no open writer behind
        raise
    finally:  # and no handler of its own for the process's SIGTERM
        bar.close()
        signal.signal(signal.SIGTERM, previous_handler)
    out_of_time = time.monotonic() > deadline
    if accelerator.is_main_process:
        # Every run ends with a grid of its final model, the first thing a person looks at (also a run
        # shorter than sample.every); not under SIGTERM, whose grace period is for the checkpoint.
        final = run_dir / "samples" / f"step_{state.step:08d}"
        drawn = any(final.parent.glob(final.name + ".*"))
        if cfg.sample.every and not drawn and (out_of_time or not stop["now"]):
            preview(cfg, modality, process, ema_model, device, final)
        if out_of_time or not stop["now"]:
            modality.finish(ema_model, run_dir, device)
        log.close()
        if losses:
            plot_losses(losses, run_dir / "loss.png")
        why = "done"
        if stop["now"] and out_of_time:
            why = f"stopped: max_minutes={cfg.max_minutes} spent"
        elif stop["now"]:
            why = "stopped by SIGTERM" + ("" if stop["signal"] is not None else " (sent to another process)")
        print(outputs_line(why, state.step, run_dir))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(run_dir, state.step, losses, accelerator.unwrap_model(model), ema_model)


def compile_problem(device) -> str | None:
    """Why torch.compile cannot build kernels on `device` here, or None when it can.

    inductor needs a C++ compiler for CPU kernels and Triton for GPU ones, and says so only when it
    first compiles, inside the first training step, where there is no way back to eager. So a two-op
    function is compiled and differentiated first. That pays inductor's start-up, which the model's
    compiling would pay otherwise (9-17 s on 2 CPU cores, bench/RESULTS.md), before max_minutes counts."""

    def probe(x):
        return torch.nn.functional.gelu(x * 2.0).sum()

    x = torch.ones(8, device=device, requires_grad=True)
    try:
        torch.compile(probe, fullgraph=True)(x).backward()
    except Exception as error:  # noqa: BLE001 - inductor's failures have many types (compiler, Triton, linker)
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return None


def coarse_spent(cfg, step: int, elapsed_s: float) -> bool:
    """Whether the coarse start (coarse_share) has had its share: of this invocation's max_minutes
    when that is set, else of the run's steps."""
    if cfg.max_minutes:
        return elapsed_s >= cfg.coarse_share * 60 * cfg.max_minutes
    return step >= cfg.coarse_share * cfg.steps


def steps_in_budget(steps: int, step: int, since_step: int, elapsed_s: float, left_s: float) -> int:
    """What the progress bar counts to: `steps`, or fewer where max_minutes will stop the run first,
    at the pace kept since `since_step` (elapsed_s ago, sample grids included); left_s is the budget left."""
    if not math.isfinite(left_s) or step <= since_step or elapsed_s <= 0:
        return steps
    return min(steps, step + int(max(0.0, left_s) * (step - since_step) / elapsed_s))


def any_process(accelerator, local: bool) -> bool:
    """True on every process when `local` is true on any: a SIGTERM may reach only one process,
    clocks differ, and a shard of weights may blow up on one; all must take the same branch at the
    same step or the next collective (save_state, the loop's reductions) hangs."""
    if accelerator.num_processes == 1:
        return local
    flag = torch.tensor([float(local)], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() > 0)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base=None)
def main(cfg):
    train(cfg)


if __name__ == "__main__":
    main()
