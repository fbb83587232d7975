"""The Modality contract: one kind of data in and out of the shared DiT (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from backbones.dit import DiT
from backbones.heads import ConvHead, HeadedDiT
from diffusion import build_process
from diffusion.continuous import SELF_COND


@dataclass
class DiffusionConfig:
    """Options of the noise processes; each process reads the ones its constructor takes."""

    schedule: str = "cosine"  # gaussian: linear | cosine | sqrt; masked/uniform: linear | loglinear | cosine
    prediction: str = "v"  # gaussian: eps | v | x0
    timesteps: str | None = None  # gaussian, flow: uniform | logit_normal; null: the process's own (flow: logit_normal)
    weighting: str = "none"  # gaussian, flow: none | min_snr (Hang et al. 2023)
    snr_gamma: float = 5.0  # weighting=min_snr: the SNR cap gamma
    shift: float = 1.0  # gaussian, flow: every noise level sigma times this; > 1 for redundant data (video)
    stratified: bool = False  # gaussian, flow: each batch's training times one per quantile band of the density


@dataclass
class ModalityConfig:
    """Keys every modality has. Each modality extends this with its own."""

    name: str = "image"
    process: str = "gaussian"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


def label_cond(cfg, classes: list[str], n: int, device, label=None) -> dict:
    """Class labels for n samples of a class-conditional modality (cfg.conditional): `label` (an
    index or a class name) for all, or, when None, labels cycling through the classes.

    Returns:
        {"label": (n,) long} on device, or {} for an unconditional model.
    """
    if not cfg.conditional:
        if label is not None:
            raise ValueError("this model was trained without labels (modality.conditional=false); drop label=")
        return {}
    if label is None:
        labels = torch.arange(n) % len(classes)  # a grid that cycles through the classes
    else:
        index = classes.index(str(label)) if str(label) in classes else label
        if not isinstance(index, int) or not 0 <= index < len(classes):
            raise ValueError(f"label={label!r} is not a class of this model: {classes} (or 0..{len(classes) - 1})")
        labels = torch.full((n,), index)
    return {"label": labels.to(device)}


class Modality:
    """One kind of data. Subclasses set `Config` and implement the methods below.

    The backbone sees only what `to_tokens` makes; `model_fn` wraps it so that noise
    processes call it on data-shaped tensors: model_fn(xt, t, cond) -> prediction shaped like xt
    (or logits per token for discrete data).
    """

    Config = ModalityConfig
    grid_axes = 1  # axes of the token grid: 1 for sequences, 2 for images and spectrograms, 3 for video
    # The DiT's positions while backbone.pos is null: "rope" (rotary, relative) or "sincos" (added
    # to the tokens, absolute). Absolute positions suit data whose content sits at fixed places
    # (centred digits, shapes at set spots): on MNIST they reach 90% label agreement at 64,000
    # images where rotary ones reach 69% (bench/RESULTS.md, issue 12).
    positions = "rope"
    # What a user may ask of sampling (infer/sample.py's label=, prompt=, ...): those keys reach
    # sample_cond and sample_options; any other key is refused naming these.
    requests: tuple[str, ...] = ()
    # Whether evaluation can score samples with another checkpoint (infer/evaluate.py's reference=,
    # e.g. generative perplexity of text); where not, reference= is refused.
    scored_by_reference = False
    # Keys added to Config after runs were saved without them, with the value those runs used
    # (today's default may differ): load_run_config fills them into older runs' configs.
    saved_before: dict = {}
    # Set by the trainer while a run trains on coarse data first (coarse_share): the default loss then
    # trains on coarsen(encode(batch)).
    coarse = False

    def __init__(self, cfg, patch: int, data=None):
        # data: the run's `data` config; its path (None: the modality's built-in data) and the
        # share of unreadable files tolerated while listing them
        self.cfg, self.patch = cfg, patch
        self.data_path = data.path if data is not None else None
        self.bad_threshold = data.bad_threshold if data is not None else 0.01

    @property
    def classes(self) -> list[str]:
        """Class names of a labelled modality (`modality.classes`, filled from the training data)."""
        classes = getattr(self.cfg, "classes", None)
        if classes is None:
            raise ValueError("modality.classes is unset: the class list comes from the training data")
        return list(classes)

    # --- data ---------------------------------------------------------------------------
    def dataset(self, split: str):
        """A torch Dataset of dicts ({"x": ..., optional "label", "caption"}); items that
        cannot be read raise modalities.data.BadSample naming the file."""
        raise NotImplementedError

    def resolve(self, train_set) -> dict:
        """Facts learnt from the training data that sampling needs later (class count,
        vocabulary); written into the run's config. Default: none."""
        return {}

    def check(self, backbone) -> None:
        """Reject impossible shapes (patch vs. input size...) before any data is loaded."""

    def encode(self, batch, generator=None) -> torch.Tensor:
        """Raw batch (already on device) -> x0 in the diffusion space. `generator` is the trainer's
        checkpointed one, for encoders that draw (a VAE posterior sample): resume stays exact."""
        return batch["x"]

    def coarsen(self, x0) -> torch.Tensor:
        """x0 at half the resolution along its grid's axes, for the coarse start of a run (progressive
        resolution, `coarse_share`); to_tokens then gives the coarse tokens the positions of the places
        they cover on the full grid, so that the network carries what it learnt there over to full
        resolution. A modality that has a coarse form overrides this (see `has_coarse_form`)."""
        raise NotImplementedError

    @classmethod
    def has_coarse_form(cls) -> bool:
        return cls.coarsen is not Modality.coarsen

    def cond(self, batch) -> dict:
        """Raw batch -> condition tensors for the backbone (label, cond, context...)."""
        return {}

    def decode(self, x0, model=None, **request):
        """x0 -> user-facing data (pixels in [0, 1], waveforms, strings).

        Args:
            model: the network that drew x0, for a modality whose way back to data is part of what
                training learnt (text embeddings and their rounding decoder); others ignore it.
            request: what the user asked of sampling (the keys of `requests`, e.g. decode=nearest).
        """
        return x0

    def save(self, samples, path, **request) -> str:
        """Write the decoded samples as the user-facing artefact; returns the path written. `request`
        is the sampling request (prompt=, label=, ...), which a modality may write beside them."""
        raise NotImplementedError

    # --- the network and its objective -------------------------------------------------
    def build_model(self, cfg) -> torch.nn.Module:
        """The network that training fits and sampling calls, as the run config `cfg` describes it.

        Default: the shared DiT (`cfg.backbone`) shaped by backbone_kwargs(). A modality that trains
        parameters of its own beside the DiT (learnt embeddings) or another network altogether (an
        autoencoder) returns its own module; like the DiT it offers set_attention_backend(name,
        device_type) and compile_blocks(), and its state_dict is what checkpoints hold."""
        b = cfg.backbone
        dit = DiT(
            hidden_size=b.hidden_size,
            depth=b.depth,
            num_heads=b.num_heads,
            mlp_ratio=b.mlp_ratio,
            pos=self.backbone_pos(b),
            qk_norm=b.qk_norm,
            cond_dropout=b.cond_dropout,
            attn_backend=cfg.attention,
            layout=b.layout,
            grad_checkpointing=cfg.grad_checkpointing,
            **self.backbone_kwargs(),
        )
        head = self.conv_head()
        return HeadedDiT(dit, ConvHead(*head, self.grid_axes)) if head else dit

    def conv_head(self) -> tuple[int, int] | None:
        """(features, channels) of a convolutional output head (backbones/heads.py) for grid data: the
        DiT's tokens then carry `features` values per grid cell, unpatchified by from_tokens and turned
        into the data's `channels` by the head. Default None: the DiT's linear read-out alone."""
        return None

    def backbone_pos(self, backbone) -> str:
        """The positions the DiT uses: backbone.pos, or while it is null this modality's own."""
        return backbone.pos or self.positions

    def loss(self, process, model, batch, cond: dict, generator=None) -> torch.Tensor:
        """The training objective of one batch (a scalar to minimise). `cond` already carries the
        condition dropout. Default: the process's denoising loss on encode(batch), self-conditioned
        where self_conditioning(), at half the resolution while `coarse`; a modality whose objective has
        terms of its own (a rounding loss, a reconstruction loss) overrides this."""
        x0 = self.encode(batch, generator)
        if self.coarse:
            x0 = self.coarsen(x0)
        return self.denoising_loss(process, model, x0, cond, generator)

    def denoising_loss(self, process, model, x0, cond: dict, generator=None) -> torch.Tensor:
        """The process's loss on x0 through model_fn, with self-conditioning where it is on."""
        if self.self_conditioning():
            return process.loss_and_x0(self.model_fn(model), x0, cond, generator, self_condition=True)[0]
        return process.loss(self.model_fn(model), x0, cond, generator=generator)

    def self_conditioning(self) -> bool:
        """Whether the network also sees its own previous x0 estimate (Chen et al. 2023, "Analog Bits"),
        concatenated to x_t along the channel axis (axis 1) by model_fn: `modality.self_condition` of a
        modality of continuous data on a grid (images, video). The process trains it
        (ContinuousProcess.self_conditioned) and feeds it in sampling (sample_options)."""
        return bool(getattr(self.cfg, "self_condition", False))

    def noise_process(self):
        """The noise process that corrupts x0 and samples it (diffusion/), as modality.process and
        modality.diffusion name it; None for a model trained without one (an autoencoder)."""
        return build_process(self.cfg.process, self.cfg.diffusion, **self.process_kwargs())

    def preview(self, model, device, path) -> str | None:
        """What training saves every sample.every steps when it is not a grid sampled through the noise
        process (an autoencoder's originals beside its reconstructions): the path written. Default:
        None, and the trainer samples a grid."""
        return None

    def finish(self, model, run_dir: Path, device) -> None:
        """Work at the end of training on the EMA model, after the last checkpoint (main process only):
        reports and exported files (an autoencoder's held-out PSNR and its diffusers folder). Default:
        nothing."""

    # --- tokens -------------------------------------------------------------------------
    def backbone_kwargs(self) -> dict:
        """What the DiT must be built with: in_dim or in_vocab, out_dim, num_classes, ..."""
        raise NotImplementedError

    def to_tokens(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (tokens (B, N, D) or ids (B, N), positions (N, A) integer grid coordinates)."""
        raise NotImplementedError

    def from_tokens(self, tokens, shape) -> torch.Tensor:
        """Backbone output tokens (B, N, out_dim) -> tensor shaped like the x of `shape`."""
        raise NotImplementedError

    def model_fn(self, backbone):
        head, self_cond = self.conv_head(), self.self_conditioning()

        def fn(xt, t, cond):
            x = xt
            if self_cond:  # the previous estimate (zeros when there is none) as more input channels
                cond = dict(cond)
                previous = cond.pop(SELF_COND, None)
                x = torch.cat([xt, torch.zeros_like(xt) if previous is None else previous.to(xt.dtype)], dim=1)
            tokens, positions = self.to_tokens(x)
            if head is None:
                return self.from_tokens(backbone(tokens, positions, t, **cond), xt.shape)
            grid = (xt.shape[0], head[0], *xt.shape[2:])  # features in place of the channels
            return backbone(tokens, positions, t, unpatchify=lambda out: self.from_tokens(out, grid), **cond)

        return fn

    # --- sampling -----------------------------------------------------------------------
    def sample_shape(self, n: int) -> tuple:
        raise NotImplementedError

    def sample_cond(self, n: int, device, **request) -> dict:
        """Conditions for n samples from what the user asked (label=3, prompt=...)."""
        return {}

    def process_kwargs(self) -> dict:
        """Sizes the noise process needs from this modality (e.g. the vocabulary). Default: none."""
        return {}

    def evaluate(self, model, process, args, device, reference=None) -> dict:
        """This modality's metrics for a trained model (see infer/evaluate.py for `args`):
        a flat dict of name -> number. `reference` is (cfg, modality, model) of a checkpoint that
        scores the samples, loaded by infer/ when the user names one (text: generative perplexity);
        None otherwise. Default: none."""
        raise NotImplementedError(f"modality {self.cfg.name} has no evaluation yet")

    def classifier_data(self, split: str):
        """What the shared evaluation classifier (modalities/image_metrics.py) learns and scores:
        a Dataset of {"x": (C, H, W) with H, W in 16..64, "label": int} with a `classes` attribute.
        Default: dataset(split), right for images."""
        return self.dataset(split)

    def classifier_key(self) -> dict:
        """What identifies classifier_data for the classifier's cache (item counts and classes are
        added to it). Default: the modality, its data set and data path."""
        return {
            "modality": self.cfg.name,
            "dataset": getattr(self.cfg, "dataset", None),
            "path": self.data_path and str(Path(self.data_path).resolve()),
        }

    def sample_options(self, model=None, **request) -> dict:
        """Extra keyword arguments for the process's sample() from the user's request (e.g. fixed
        prompt tokens for discrete text, an x0_hook for continuous processes). `model` is the network
        that samples, for hooks that read its weights (the clamping trick reads the embedding table).
        Default: self_condition=True for a self-conditioned network, else none."""
        return {"self_condition": True} if self.self_conditioning() else {}
