"""Config schemas. Hydra composes configs/train.yaml against these dataclasses, so a misspelt
key or a value of the wrong type fails at start-up naming the key; values with a fixed set of
choices are checked by `validate`, which names the valid ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from modalities import MODALITIES

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


@dataclass
class BackboneConfig:
    name: str = MISSING
    depth: int = MISSING
    hidden_size: int = MISSING
    num_heads: int = MISSING
    patch: int = 2
    mlp_ratio: float = 4.0
    pos: str | None = None  # rope | sincos | None: the modality's choice (Modality.positions)
    qk_norm: bool = True
    cond_dropout: float = 0.1
    layout: str = "full"  # full | factorized (alternate within-frame and across-frame attention)
    lr: float = 1e-4  # the peak learning rate this size trains at; used while optim.lr is null


@dataclass
class OptimConfig:
    lr: float | None = None  # None: the backbone preset's lr (backbone.lr)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "constant"  # constant | cosine
    fused: bool = True  # one-kernel AdamW where the device has it (train.adamw)


@dataclass
class DataConfig:
    path: str | None = None  # the training data (file or folder, per modality); None: the built-in data
    bad_threshold: float = 0.01
    cache_latents: bool = False  # latent images: encode the data set once through the VAE, then read the cache


@dataclass
class SampleConfig:
    every: int = 1000
    n: int = 16
    steps: int = 50
    sampler: str | None = None  # None: the process's default (its first in `samplers`)
    guidance: float = 2.0


@dataclass
class TrainConfig:
    modality: Any = MISSING
    backbone: BackboneConfig = MISSING
    optim: OptimConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    name: str | None = None
    out_dir: str = "runs"
    resume: str | None = None
    overwrite: bool = False  # delete an existing, non-empty run folder and start afresh in it
    seed: int = 0
    steps: int = 20000
    batch_size: int = 64
    grad_accum: int = 1
    mixed_precision: str = "no"
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    attention: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    num_workers: int = 2
    log_every: int = 50
    save_every: int = 1000
    keep_last: int = 2
    max_bad_steps: int = 20
    max_minutes: float | None = None  # stop with a checkpoint after this much wall-clock time (this invocation)
    # Progressive resolution: this share of the training budget (of max_minutes when set, else of steps)
    # trains on the data at half the resolution first, then the run goes on at full resolution.
    coarse_share: float = 0.0
    deterministic: bool = False


def register_schemas():
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="backbone", name="backbone_schema", node=BackboneConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    for name, cls in MODALITIES.items():
        cs.store(group="modality", name=f"{name}_schema", node=cls.Config)


def _choice(key: str, value, choices):
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {list(choices)}")


def validate(cfg: DictConfig):
    """Check values with a fixed set of choices and the numbers that must be positive."""
    from backbones.attention import BACKENDS
    from backbones.dit import LAYOUTS
    from diffusion import PROCESSES

    _choice("mixed_precision", cfg.mixed_precision, ("no", "bf16", "fp16"))
    _choice("attention", cfg.attention, BACKENDS)
    _choice("optim.schedule", cfg.optim.schedule, ("constant", "cosine"))
    _choice("modality.name", cfg.modality.name, MODALITIES)
    if "process" in cfg.modality:  # modalities trained without a noise process (image_vae) have no such key
        _choice("modality.process", cfg.modality.process, PROCESSES)
    _choice("backbone.layout", cfg.backbone.layout, LAYOUTS)
    if cfg.backbone.layout == "factorized" and MODALITIES[cfg.modality.name].grid_axes < 2:
        raise ValueError(
            f"backbone.layout=factorized splits the first grid axis from the others, and modality "
            f"{cfg.modality.name} has a 1-D grid; use backbone.layout=full"
        )
    for key in ("steps", "batch_size", "grad_accum", "save_every", "log_every", "sample.n", "sample.steps"):
        if OmegaConf.select(cfg, key) < 1:
            raise ValueError(f"{key}={OmegaConf.select(cfg, key)} must be at least 1")
    if cfg.modality.get("head_channels", 0) < 0:
        raise ValueError(f"modality.head_channels={cfg.modality.head_channels} must be 0 (no head) or positive")
    if not 0 <= cfg.data.bad_threshold < 1:
        raise ValueError(f"data.bad_threshold={cfg.data.bad_threshold} must be in [0, 1)")
    if cfg.max_minutes is not None and cfg.max_minutes <= 0:
        raise ValueError(f"max_minutes={cfg.max_minutes} must be positive (or null for no limit)")
    if cfg.overwrite and cfg.resume:
        raise ValueError(f"overwrite=true deletes the run that resume={cfg.resume} continues; give one of them")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay={cfg.ema_decay} must be in [0, 1)")
    if not 0 <= cfg.coarse_share < 1:
        raise ValueError(f"coarse_share={cfg.coarse_share} must be in [0, 1): the share of the run trained coarse")
    if cfg.coarse_share and not MODALITIES[cfg.modality.name].has_coarse_form():
        coarse = sorted(name for name, cls in MODALITIES.items() if cls.has_coarse_form())
        raise ValueError(
            f"coarse_share={cfg.coarse_share}: modality {cfg.modality.name} has no coarse form to start on "
            f"(modalities with one: {coarse}); use coarse_share=0"
        )


def load_run_config(path) -> DictConfig:
    """Read a saved config.yaml back against the schemas (types and keys checked)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a checkpoint directory holds config.yaml and model.safetensors")
    saved = OmegaConf.load(path)
    name = OmegaConf.select(saved, "modality.name")
    if name not in MODALITIES:
        raise ValueError(f"{path}: modality.name={name!r} is not a modality of this polydiff ({sorted(MODALITIES)})")
    schema = OmegaConf.structured(TrainConfig)
    schema.modality = OmegaConf.structured(MODALITIES[name].Config)
    schema.backbone = OmegaConf.structured(BackboneConfig)
    schema.optim = OmegaConf.structured(OptimConfig)
    if OmegaConf.select(saved, "modality.path") is not None:  # runs before data.path existed (2026-11-23)
        saved.data = {**saved.get("data", {}), "path": saved.modality.path}
    if "path" in saved.get("modality", {}):
        del saved.modality["path"]
    for key, value in MODALITIES[name].saved_before.items():  # runs saved before the key existed
        if key not in saved.modality:
            saved.modality[key] = value
    try:
        return OmegaConf.merge(schema, saved)
    except (ConfigKeyError, ValidationError) as e:
        raise ValueError(
            f"{path} does not fit this polydiff's config schema ({e.full_key}: {e.msg}); "
            "was it written by another version?"
        ) from e
