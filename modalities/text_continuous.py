"""Text as continuous embedding diffusion with a rounding decoder (Diffusion-LM, Li et al. 2022).

Gaussian noise cannot be added to token ids, so each token becomes a learnt embedding_dim-vector and
the process diffuses the (B, N, embed_dim) sequence; the DiT's input and output layers project
those vectors to and from its width. Three parts make it decode to words rather than gibberish:

- the rounding term: the cross-entropy of the tokens given the predicted x0 through a decoder
  (a separate linear layer or the embedding table itself), added to the diffusion loss, so that x0
  estimates carry the token and the decoder learns to read them (Li et al. 2022, Sec. 4.1);
- a guard against the embeddings collapsing: learnt jointly with an x0 loss, they shrink towards
  zero, where every token is close to every other (Li et al., Sec. 4.1; Dieleman et al. 2022,
  CDCD, Sec. 3.2). Here every row is L2-normalised to norm sqrt(embed_dim) wherever it is used, so
  the per-dimension scale is 1, like images in [-1, 1], and the loss cannot shrink it;
- the clamping trick: at sampling, the x0 estimate is replaced by the embedding of one token from a
  chosen share of the steps on (Li et al., Sec. 4.2), through the x0_hook of the continuous samplers:
  the token the chosen decoding reads, the rounding decoder's most probable one (decode=argmax) or
  the nearest embedding (decode=nearest, Diffusion-LM's own clamp).

`interpolate=true` (the default) is CDCD's score interpolation (Dieleman et al. 2022, Sec. 3.1):
the rounding decoder reads the network's output as token logits, and the x0 estimate is the
probability-weighted mean of the embeddings, so the estimate always lies in their convex hull and
the rounding cross-entropy on those logits trains the network as a classifier at every noise level.
`interpolate=false` lets the network regress x0 freely, as Diffusion-LM does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import PROCESSES
from diffusion.continuous import SELF_COND, ContinuousProcess
from modalities.base import DiffusionConfig
from modalities.text import TextConfig, TextModality
from modalities.text_metrics import chunks, sample_metrics

DECODERS = ("linear", "tied")
DECODES = ("argmax", "nearest")


@dataclass
class TextContinuousConfig(TextConfig):
    name: str = "text_continuous"
    process: str = "gaussian"  # gaussian | flow
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(schedule="sqrt", prediction="x0"))
    embed_dim: int = 32  # size of the learnt token embeddings the process diffuses
    decoder: str = "linear"  # rounding decoder: linear (its own layer) | tied (logits from the embedding table)
    rounding_weight: float = 1.0  # weight of the rounding cross-entropy beside the diffusion loss
    self_condition: bool = False  # the network also sees its previous x0 estimate (Chen et al. 2023)
    interpolate: bool = True  # score interpolation (CDCD): x0 = softmax(decoder(output)) @ embeddings
    clamp: bool = True  # sampling: the clamping trick (x0 estimate -> the embedding of the token `decode` reads)
    clamp_from: float = 0.0  # sampling: share of the steps done before clamping starts (0: from the first)
    decode: str = "argmax"  # sampling: argmax (the rounding decoder) | nearest (nearest embedding); clamps alike


class EmbeddingDiffusion(nn.Module):
    """The DiT with the embedding table it diffuses in and the rounding decoder; what a
    text_continuous checkpoint holds (`dit.*`, `embedding.weight`, `decoder.*`)."""

    def __init__(self, dit: nn.Module, vocab: int, embed_dim: int, decoder: str):
        super().__init__()
        self.dit, self.embed_dim = dit, embed_dim
        self.embedding = nn.Embedding(vocab, embed_dim)
        if decoder == "linear":
            self.decoder = nn.Linear(embed_dim, vocab)
        else:  # tied: logits are scaled dot products with the table, the scale learnt
            self.decoder = None
            self.logit_scale = nn.Parameter(torch.ones(()))

    def table(self) -> torch.Tensor:
        """(V, embed_dim) embeddings, every row of norm sqrt(embed_dim): the collapse guard."""
        return F.normalize(self.embedding.weight, dim=-1) * math.sqrt(self.embed_dim)

    def embed(self, ids) -> torch.Tensor:
        """(B, N) ids -> (B, N, embed_dim)."""
        return F.embedding(ids, self.table())

    def logits(self, x) -> torch.Tensor:
        """Rounding decoder: (..., embed_dim) vectors -> (..., V) token logits."""
        if self.decoder is not None:
            return self.decoder(x.float())
        return self.logit_scale * x.float() @ self.table().T

    def nearest(self, x) -> torch.Tensor:
        """(..., embed_dim) vectors -> (...) ids of their nearest embeddings (Euclidean)."""
        table = self.table()
        return (x.float() @ table.T - 0.5 * table.pow(2).sum(-1)).argmax(-1)  # argmin of ||x - e||^2

    def set_attention_backend(self, name: str, device_type: str | None = None):
        self.dit.set_attention_backend(name, device_type)

    def compile_blocks(self, **options):
        self.dit.compile_blocks(**options)


class TextContinuous(TextModality):
    Config = TextContinuousConfig
    # on top of the held text: the clamping trick on/off, from which share of the steps, and the decoding
    requests = TextModality.requests + ("clamp", "clamp_from", "decode")
    saved_before = {"interpolate": False}  # runs saved before 2026-12-03 regressed x0 freely

    def __init__(self, cfg, patch: int, data=None):
        super().__init__(cfg, patch, data)
        continuous = sorted(name for name, c in PROCESSES.items() if issubclass(c, ContinuousProcess))
        if cfg.process not in continuous:
            raise ValueError(f"modality.process={cfg.process!r} does not diffuse vectors; choose one of {continuous}")
        if cfg.embed_dim < 1:
            raise ValueError(f"modality.embed_dim={cfg.embed_dim} must be at least 1 (Diffusion-LM uses 16 to 128)")
        if cfg.decoder not in DECODERS:
            raise ValueError(f"modality.decoder={cfg.decoder!r}; choose one of {DECODERS}")
        if cfg.rounding_weight < 0:
            raise ValueError(f"modality.rounding_weight={cfg.rounding_weight} must be >= 0")
        if cfg.interpolate and (cfg.process, cfg.diffusion.prediction) != ("gaussian", "x0"):
            raise ValueError(
                "modality.interpolate=true makes the network's output an x0 estimate: it needs "
                f"modality.process=gaussian and modality.diffusion.prediction=x0, not {cfg.process!r} and "
                f"{cfg.diffusion.prediction!r} (or set modality.interpolate=false)"
            )
        self.sampling(cfg.clamp, cfg.clamp_from, cfg.decode)
        # the decoder logits of the latest sampling call of model_fn, which clamping to the decoder's
        # argmax reads under interpolate (the x0 estimate, a mean of embeddings, no longer says them)
        self.last_call: dict = {}

    def sampling(self, clamp=None, clamp_from=None, decode=None) -> tuple[bool, float, str]:
        """The sampling choices, the request's where given, else the config's; checked."""
        clamp = self.cfg.clamp if clamp is None else clamp
        clamp_from = self.cfg.clamp_from if clamp_from is None else clamp_from
        decode = self.cfg.decode if decode is None else decode
        if not isinstance(clamp, bool):
            raise ValueError(f"clamp={clamp!r} must be true or false")
        if not 0 <= clamp_from <= 1:
            raise ValueError(f"clamp_from={clamp_from} must be a share of the steps in 0..1")
        if decode not in DECODES:
            raise ValueError(f"decode={decode!r}; choose one of {DECODES}")
        return clamp, float(clamp_from), decode

    # --- the network and its objective ---------------------------------------------------
    def build_model(self, cfg) -> nn.Module:
        return EmbeddingDiffusion(super().build_model(cfg), self.vocab, self.cfg.embed_dim, self.cfg.decoder)

    def backbone_kwargs(self):
        inputs = self.cfg.embed_dim * (2 if self.cfg.self_condition else 1)  # x_t [, previous x0 estimate]
        return {"in_dim": inputs, "out_dim": self.cfg.embed_dim, "num_classes": 0}

    def encode(self, batch, generator=None):
        """The token ids; their vectors come from the model's table (see loss)."""
        return batch["x"].long()

    def loss(self, process, model, batch, cond, generator=None):
        """Diffusion loss on the embedded sequence plus rounding_weight times the rounding
        cross-entropy: of the tokens given the x0 estimate (what sampling decodes) and given the clean
        embeddings (what the likelihood bound decodes at the lowest noise level). With interpolate, the
        first term is on the logits the x0 estimate was interpolated from."""
        ids, seen = self.encode(batch), {}
        x0 = model.embed(ids)
        diffusion, x0_hat = process.loss_and_x0(
            self.model_fn(model, seen), x0, cond, generator, self.cfg.self_condition
        )
        logits = seen["logits"] if self.cfg.interpolate else model.logits(x0_hat)
        rounding = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        rounding = rounding + F.cross_entropy(model.logits(x0).flatten(0, 1), ids.flatten())
        return diffusion + self.cfg.rounding_weight * rounding

    def model_fn(self, backbone, seen: dict | None = None):
        """The DiT on (B, N, embed_dim) vectors; with self_condition, the x0 estimate in
        cond[SELF_COND] (zeros when absent) is concatenated to each token's input. With interpolate,
        the output is read by the rounding decoder and the x0 estimate returned is the
        probability-weighted mean of the embeddings; the logits of the last call go to seen["logits"]
        (to self.last_call, detached, when seen is not given: what sampling's clamp reads)."""
        dit = backbone.dit
        keep = seen is not None
        seen = seen if keep else self.last_call

        def fn(xt, t, cond):
            cond = dict(cond)
            previous = cond.pop(SELF_COND, None)
            if self.cfg.self_condition:
                xt = torch.cat([xt, torch.zeros_like(xt) if previous is None else previous.to(xt.dtype)], -1)
            tokens, positions = self.to_tokens(xt)
            out = self.from_tokens(dit(tokens, positions, t, **cond), xt.shape)
            if not self.cfg.interpolate:
                return out
            logits = backbone.logits(out)
            seen["logits"] = logits if keep else logits.detach()
            return (logits.softmax(-1) @ backbone.table()).to(out.dtype)

        return fn

    def to_tokens(self, x):
        return x, torch.arange(x.shape[1], device=x.device)[:, None]  # (B, N, inputs), (N, 1) positions

    def from_tokens(self, tokens, shape):
        return tokens  # (B, N, embed_dim)

    # --- sampling -------------------------------------------------------------------------
    def sample_shape(self, n):
        return (n, self.cfg.seq_len, self.cfg.embed_dim)

    def sample_options(self, model=None, prompt=None, suffix=None, template=None, **request):
        """An x0_hook that applies the clamping trick (from clamp_from of the steps on) and puts the
        embeddings of held text (prompt=, suffix=, template=, see held_tokens) back at every step,
        so the held text comes out exactly.

        Clamping snaps each vector to the embedding of the token `decode` would read: the rounding
        decoder's argmax (under interpolate, of the logits the estimate was averaged from, which
        model_fn leaves in self.last_call), or the nearest embedding. Under interpolate the two
        differ: the nearest embedding to a probability-weighted mean favours tokens that resemble
        many likely ones (space, 'e') over the most likely one. On Tiny Shakespeare (40 CPU
        minutes) the argmax clamp gave 52-53% real words against 47-48% (bench/RESULTS.md)."""
        clamp, clamp_from, decode = self.sampling(**request)
        held = self.held_tokens(prompt, suffix, template)
        options = {"self_condition": True} if self.cfg.self_condition else {}
        if not clamp and held is None:
            return options
        if model is None:
            raise ValueError("clamping and held text need the model's embeddings: pass model=")
        table = model.table().detach()

        def snap(x0_hat):
            if decode == "nearest":
                return model.nearest(x0_hat)
            logits = self.last_call.get("logits") if self.cfg.interpolate else model.logits(x0_hat)
            if logits is None or logits.shape[:-1] != x0_hat.shape[:-1]:
                raise RuntimeError("clamping to the decoder's argmax needs the logits of this model_fn call")
            return logits.argmax(-1)

        def hook(x0_hat, progress):
            if clamp and progress >= clamp_from:
                x0_hat = table[snap(x0_hat)].to(x0_hat.dtype)
            if held is not None:
                ids, mask = (v.to(x0_hat.device) for v in held)
                x0_hat = torch.where(mask[:, None], table[ids].to(x0_hat.dtype), x0_hat)
            return x0_hat

        return {**options, "x0_hook": hook}

    def decode(self, x0, model=None, prompt=None, suffix=None, template=None, **request) -> list[str]:
        """(B, N, embed_dim) vectors -> strings, through the rounding decoder (decode=argmax) or the
        nearest embedding (decode=nearest); held text is written as given."""
        return self.strings(self.round(x0, model, self.sampling(**request)[2], prompt, suffix, template))

    def round(self, x0, model, how: str, prompt=None, suffix=None, template=None) -> torch.Tensor:
        """(B, N, embed_dim) -> (B, N) ids by `how` (argmax | nearest), held tokens in place."""
        if model is None:
            raise ValueError("decoding embeddings needs the model's rounding decoder: pass model=")
        with torch.no_grad():
            ids = model.logits(x0).argmax(-1) if how == "argmax" else model.nearest(x0)
        held = self.held_tokens(prompt, suffix, template)
        if held is not None:
            ids = torch.where(held[1].to(ids.device), held[0].to(ids.device), ids)
        return ids.cpu()

    # --- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def nll(self, model, process, ids, mc_timesteps: int, generator=None) -> torch.Tensor:
        """The variational bound on -log p(tokens) in nats per token, (B,): the process's diffusion
        and prior terms on the embedded sequence (GaussianVP.bound) plus the decoder term, the
        rounding decoder's cross-entropy of the tokens given the x0 estimate (with interpolate: the
        logits it is interpolated from) at the lowest noise level t_min. Embeddings are a fixed
        function of the tokens, so this bounds the tokens' own likelihood and is comparable with the
        token-ID models' bounds."""
        seen = {}
        x0, model_fn = model.embed(ids), self.model_fn(model, seen)
        terms = process.bound(model_fn, x0, {}, mc_timesteps, generator)
        t = torch.full((ids.shape[0],), process.t_min, device=ids.device)
        zt = process.corrupt(x0, t, torch.randn(x0.shape, generator=generator, device=ids.device))[0]
        x0_hat = process.to_x0(model_fn(zt, t, {}), zt, t)
        logits = seen["logits"] if self.cfg.interpolate else model.logits(x0_hat)
        decoder = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").sum(1)
        return (terms + decoder.double()) / ids.shape[1]

    def evaluate(self, model, process, args, device, reference=None) -> dict:
        """Held-out bound and sample quality, with and without clamping and for both decodings.

        Likelihood (process=gaussian, which has a bound; none is reported for flow): nll() over the
        held-out sequences with args.mc_timesteps Monte-Carlo noise levels each, in the units of
        likelihood_metrics. Samples: args.n drawn from the same noise three times: clamped (from
        modality.clamp_from) to the decoder's argmax and decoded by it, which gives the unprefixed
        figures (real-word share, unigram entropy, generative perplexity under `reference`); clamped
        to the nearest embedding and decoded by it (prefix clamp_nearest_); and without clamping,
        decoded both ways (noclamp_argmax_, noclamp_nearest_). rounding_changed_share (and
        noclamp_...): the share of tokens of the first (last) set whose decoder argmax differs from
        the nearest embedding, how much the decoder is doing.
        """
        model_fn, heldout = self.model_fn(model), self.heldout(args.data.path)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        metrics = {}
        if hasattr(process, "bound"):
            nats = [
                self.nll(model, process, heldout.sequences(i, j).to(device), args.mc_timesteps, generator)
                for i, j in chunks(len(heldout), args.batch)
            ]
            metrics.update(self.likelihood_metrics(torch.cat(nats).mean().item(), heldout))
        known = self.training_words()
        # (clamp, clamp target, the decodings scored, and the key of the rounding-changed share)
        runs = (
            (True, "argmax", ("argmax",), "rounding_changed_share"),
            (True, "nearest", ("nearest",), None),
            (False, "argmax", DECODES, "noclamp_rounding_changed_share"),
        )
        for clamp, target, scored, changed_key in runs:
            options = self.sample_options(model, clamp=clamp, decode=target)
            draw = torch.Generator(device=device).manual_seed(args.seed)  # the same noise for all
            x0 = self.draw(process, model_fn, args, device, draw, **options)
            decoded = {how: self.round(x0, model, how) for how in DECODES}
            for how in scored:
                prefix = "" if (clamp, how) == (True, "argmax") else f"{'clamp' if clamp else 'noclamp'}_{how}_"
                texts = self.strings(decoded[how])
                metrics.update(sample_metrics(texts, decoded[how], self.vocab, known, reference, args, device, prefix))
            if changed_key:
                metrics[changed_key] = (decoded["argmax"] != decoded["nearest"]).float().mean().item()
        return metrics
