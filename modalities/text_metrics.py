"""Sample-quality figures shared by the text modalities and bench/text_compare.py.

Each takes decoded strings or token ids, so token-ID and embedding models are measured the same way.
"""

from __future__ import annotations

import math
import re

import torch

WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")  # letters, with inner apostrophes (o'er, ne'er)


def chunks(n: int, size: int):
    """(start, end) pairs covering range(n) in pieces of at most `size`."""
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def unigram_entropy(ids, vocab: int) -> float:
    """Entropy in bits of the token frequencies in `ids` (any shape)."""
    p = torch.bincount(ids.flatten().cpu(), minlength=vocab).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def words(text: str) -> list[str]:
    """The words of `text`, lower-cased."""
    return [w.lower() for w in WORD.findall(text)]


def real_word_share(texts: list[str], known: set[str]) -> float:
    """The share of the words in `texts` that occur in `known` (the training text's words), which
    catches character soup that a likelihood or an entropy alone does not. Only words of two letters
    or more count (a lone letter is "real" too often to say anything), and the first and last word of
    each text are left out, since a fixed-length sample cuts them at arbitrary points. NaN when the
    texts hold no such word."""
    inner = [w for text in texts for w in words(text)[1:-1] if len(w) >= 2]
    if not inner:
        return math.nan
    return sum(w in known for w in inner) / len(inner)


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
    process = modality.noise_process()
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


def sample_metrics(texts: list[str], ids, vocab: int, known: set[str], reference, args, device, prefix="") -> dict:
    """The sample-quality figures of one set of samples: real-word share, unigram entropy of the
    token ids and, with a reference model, generative perplexity; names start with `prefix`."""
    metrics = {
        f"{prefix}real_word_share": real_word_share(texts, known),
        f"{prefix}sample_unigram_entropy_bits": unigram_entropy(ids, vocab),
    }
    if reference is not None:
        metrics[f"{prefix}generative_perplexity"] = generative_perplexity(texts, reference, args, device)
    return metrics
