"""Text as token ids for discrete diffusion (masked or uniform) and the autoregressive baseline.

Each token is one DiT token with a 1-D position; the backbone embeds ids directly (in_vocab) and
returns logits over the vocabulary plus one extra id V, which is [MASK] for masked diffusion and
the start token for the autoregressive baseline. Samples are saved as a .txt file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusion import PROCESSES, build_process
from diffusion.discrete import TokenProcess
from modalities.base import DiffusionConfig, Modality, ModalityConfig
from modalities.text_data import (
    SEPARATOR,
    TokenChunks,
    load_tokenizer,
    read_corpus,
    split_stream,
    train_tokenizer,
)


@dataclass
class TextDiscreteConfig(ModalityConfig):
    name: str = "text_discrete"
    process: str = "masked"  # masked | uniform | autoregressive
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(schedule="loglinear"))
    tokenizer: str = "char"  # char | byte | bpe (trained on the corpus) | <pretrained tokenizer folder>
    seq_len: int = 128  # tokens per training sequence and per sample
    bpe_vocab: int = 2048  # tokenizer=bpe: vocabulary size to learn
    vocab: int | None = None  # filled from the tokenizer at the start of training
    tokenizer_state: str | None = None  # filled: the serialised tokenizer (char list or tokenizer JSON)


class TextDiscrete(Modality):
    Config = TextDiscreteConfig
    requests = ("prompt",)
    scored_by_reference = True

    def __init__(self, cfg, patch: int, data=None):
        super().__init__(cfg, patch, data)
        token_processes = sorted(name for name, cls in PROCESSES.items() if issubclass(cls, TokenProcess))
        if cfg.process not in token_processes:
            raise ValueError(
                f"modality.process={cfg.process!r} does not model token ids; choose one of {token_processes}"
            )
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.tokenizer_state)

    @property
    def vocab(self) -> int:
        if self.cfg.vocab is None:
            raise ValueError("modality.vocab is unset: it comes from the tokenizer at the start of training")
        return self.cfg.vocab

    def _tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("modality.tokenizer_state is unset: the tokenizer is learnt as training starts")
        return self.tokenizer

    # --- data -----------------------------------------------------------------------------
    def dataset(self, split: str):
        """Consecutive seq_len-token sequences of the corpus's first 90% ("train") or last 10%.
        A char or BPE tokenizer is learnt here from the whole corpus (as nanoGPT's char level) when
        the config does not hold one yet."""
        texts, skipped = read_corpus(self.data_path, self.bad_threshold)
        if self.tokenizer is None:
            self.tokenizer = train_tokenizer(self.cfg.tokenizer, texts, self.cfg.bpe_vocab)
        ids = self.tokenizer.encode(SEPARATOR.join(texts))
        return TokenChunks(split_stream(ids, split), self.cfg.seq_len, self.tokenizer, skipped)

    def resolve(self, train_set) -> dict:
        return {"vocab": train_set.tokenizer.vocab_size, "tokenizer_state": train_set.tokenizer.state()}

    def encode(self, batch):
        return batch["x"].long()  # (B, N) ids

    def decode(self, x0) -> list[str]:
        tokenizer = self._tokenizer()
        return [tokenizer.decode(row) for row in x0.tolist()]

    def save(self, samples, path) -> str:
        path = Path(path).with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{'=' * 20} sample {i} {'=' * 20}\n{s}\n" for i, s in enumerate(samples))
        path.write_text(text, encoding="utf-8")
        print(text)
        return str(path)

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
    def sample_shape(self, n):
        return (n, self.cfg.seq_len)

    def sample_options(self, prompt: str | None = None, **request):
        """prompt= becomes the held first tokens of every sample."""
        if request:
            raise ValueError(f"text models take prompt= only, not {sorted(request)}")
        if not prompt:
            return {}
        ids = self._tokenizer().encode(prompt)
        if len(ids) > self.cfg.seq_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, over modality.seq_len={self.cfg.seq_len}")
        fixed = torch.zeros(self.cfg.seq_len, dtype=torch.long)
        fixed[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return {"fixed": fixed, "fixed_mask": torch.arange(self.cfg.seq_len) < len(ids)}

    # --- evaluation -----------------------------------------------------------------------
    def heldout(self, path: str | None) -> TokenChunks:
        """All of the text at `path` as sequences, or this corpus's held-out split when path is None."""
        if path is None:
            return self.dataset("test")
        texts, skipped = read_corpus(path)
        ids = self._tokenizer().encode(SEPARATOR.join(texts))
        return TokenChunks(ids, self.cfg.seq_len, self.tokenizer, skipped)

    def evaluate(self, model, process, args, device, reference=None) -> dict:
        """Held-out likelihood and sample quality.

        nll_nats_per_token: the process's `nll` over the held-out sequences (args.mc_timesteps
        Monte-Carlo times, seeded by args.seed): an upper bound for diffusion, exact for the
        autoregressive baseline; bits_per_token, bits_per_char and perplexity follow from it.
        Sample quality: unigram entropy of args.n samples beside that of the held-out text (collapse
        into repetition shows as a lower entropy) and, when `reference` is given (a text checkpoint
        loaded by infer/: the autoregressive baseline), the generative perplexity of the decoded samples
        under it.
        """
        model_fn, heldout = self.model_fn(model), self.heldout(args.data.path)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        nats = [
            process.nll(model_fn, heldout.sequences(i, j).to(device), {}, args.mc_timesteps, generator)
            for i, j in chunks(len(heldout), args.batch)
        ]
        nats_per_token = torch.cat(nats).mean().item()
        n_tokens = len(heldout) * heldout.seq_len
        n_chars = len(self._tokenizer().decode(heldout.ids[:n_tokens].tolist()))
        metrics = {
            "nll_nats_per_token": nats_per_token,
            "bits_per_token": nats_per_token / math.log(2),
            "bits_per_char": nats_per_token / math.log(2) * n_tokens / n_chars,
            "perplexity": math.exp(nats_per_token),
            "heldout_tokens": n_tokens,
        }
        samples = torch.cat(
            [
                process.sample(
                    model_fn,
                    self.sample_shape(j - i),
                    {},
                    steps=args.steps,
                    sampler=args.sampler,
                    guidance=args.guidance,
                    generator=generator,
                    device=device,
                )
                for i, j in chunks(args.n, args.batch)
            ]
        )
        metrics["sample_unigram_entropy_bits"] = unigram_entropy(samples, self.vocab)
        metrics["data_unigram_entropy_bits"] = unigram_entropy(heldout.ids[:n_tokens], self.vocab)
        if reference is not None:
            metrics["generative_perplexity"] = generative_perplexity(self.decode(samples), reference, args, device)
        return metrics


def chunks(n: int, size: int):
    """(start, end) pairs covering range(n) in pieces of at most `size`."""
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def unigram_entropy(ids, vocab: int) -> float:
    """Entropy in bits of the token frequencies in `ids` (any shape)."""
    p = torch.bincount(ids.flatten().cpu(), minlength=vocab).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def generative_perplexity(texts: list[str], reference, args, device) -> float:
    """exp(mean nats per token) of `texts` under a text model, each text re-encoded with that model's
    tokenizer and cut to its seq_len (Sahoo et al. 2024 score samples under GPT-2 the same way).
    Exact for an autoregressive reference.

    Args:
        reference: (cfg, modality, model) of the scoring checkpoint, as infer/ loads it (modalities
            never load checkpoints themselves: train/ and infer/ import modalities, not the reverse).
        args: seed, batch and mc_timesteps (the reference's timesteps, if it is a diffusion model).
    """
    cfg, modality, model = reference
    process = build_process(cfg.modality.process, cfg.modality.diffusion, **modality.process_kwargs())
    by_length: dict[int, list[list[int]]] = {}
    for text in texts:
        ids = modality.tokenizer.encode(text)[: cfg.modality.seq_len]
        if ids:
            by_length.setdefault(len(ids), []).append(ids)
    model_fn, generator = modality.model_fn(model), torch.Generator(device=device).manual_seed(args.seed)
    total_nats, total_tokens = 0.0, 0
    for length, group in by_length.items():
        x0 = torch.tensor(group, dtype=torch.long, device=device)
        for i, j in chunks(len(group), args.batch):
            nats = process.nll(model_fn, x0[i:j], {}, args.mc_timesteps, generator)  # (j - i,) per token
            total_nats += nats.sum().item() * length
        total_tokens += len(group) * length
    return math.exp(total_nats / total_tokens)
