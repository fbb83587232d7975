"""Text as token ids for discrete diffusion (masked or uniform) and the autoregressive baseline.

Each token is one DiT token with a 1-D position; the backbone embeds ids directly (in_vocab) and
returns logits over the vocabulary plus one extra id V, which is [MASK] for masked diffusion and
the start token for the autoregressive baseline. Samples are saved as a .txt file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffusion import PROCESSES
from diffusion.discrete import TokenProcess
from modalities.base import DiffusionConfig
from modalities.text import TextConfig, TextModality
from modalities.text_metrics import chunks, sample_metrics


@dataclass
class TextDiscreteConfig(TextConfig):
    name: str = "text_discrete"
    process: str = "masked"  # masked | uniform | autoregressive
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(schedule="loglinear"))


class TextDiscrete(TextModality):
    Config = TextDiscreteConfig

    def __init__(self, cfg, patch: int, data=None):
        super().__init__(cfg, patch, data)
        token_processes = sorted(name for name, cls in PROCESSES.items() if issubclass(cls, TokenProcess))
        if cfg.process not in token_processes:
            raise ValueError(
                f"modality.process={cfg.process!r} does not model token ids; choose one of {token_processes}"
            )

    def encode(self, batch, generator=None):
        return batch["x"].long()  # (B, N) ids

    def decode(self, x0, model=None, **request) -> list[str]:
        return self.strings(x0)

    # --- tokens ---------------------------------------------------------------------------
    def backbone_kwargs(self):
        v = self.vocab + 1  # the data tokens and [MASK] / start
        return {"in_vocab": v, "out_dim": v, "num_classes": 0, "causal": PROCESSES[self.cfg.process].causal}

    def process_kwargs(self):
        return {"vocab_size": self.vocab, "mask_id": self.vocab, "bos_id": self.vocab}

    def to_tokens(self, x):
        return x, torch.arange(x.shape[1], device=x.device)[:, None]  # (B, N) ids, (N, 1) positions

    def from_tokens(self, tokens, shape):
        return tokens  # (B, N, V + 1) logits

    # --- sampling -------------------------------------------------------------------------
    def sample_options(self, model=None, prompt=None, suffix=None, template=None, **request):
        """prompt=, suffix= and template= (see held_tokens) become tokens held in every sample. The
        autoregressive baseline writes left to right, so it can only continue a prefix."""
        if request:
            raise ValueError(f"{sorted(request)} do not apply to text models; they take {list(self.requests)}")
        held = self.held_tokens(prompt, suffix, template)
        if held is None:
            return {}
        ids, mask = held
        if PROCESSES[self.cfg.process].causal and not mask[: int(mask.sum())].all():
            raise ValueError(
                "the autoregressive baseline continues a prefix: give prompt= alone (suffix= and template= holes "
                "need a diffusion model)"
            )
        return {"fixed": ids, "fixed_mask": mask}

    # --- evaluation -----------------------------------------------------------------------
    def evaluate(self, model, process, args, device, reference=None) -> dict:
        """Held-out likelihood and sample quality.

        nll_nats_per_token: the process's `nll` over the held-out sequences (args.mc_timesteps
        Monte-Carlo times, seeded by args.seed): an upper bound for diffusion, exact for the
        autoregressive baseline; bits_per_token, bits_per_char and perplexity follow from it.
        Sample quality of args.n samples (text_metrics.sample_metrics): the share of their words seen
        in the training text, their unigram entropy beside that of the held-out text (collapse into
        repetition shows as a lower entropy) and, when `reference` is given (a text checkpoint loaded
        by infer/: the autoregressive baseline), their generative perplexity under it.
        """
        model_fn, heldout = self.model_fn(model), self.heldout(args.data.path)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        nats = [
            process.nll(model_fn, heldout.sequences(i, j).to(device), {}, args.mc_timesteps, generator)
            for i, j in chunks(len(heldout), args.batch)
        ]
        metrics = self.likelihood_metrics(torch.cat(nats).mean().item(), heldout)
        samples = self.draw(process, model_fn, args, device, generator)
        known = self.training_words()
        metrics.update(sample_metrics(self.strings(samples), samples, self.vocab, known, reference, args, device))
        return metrics
