"""What the text modalities share: the tokenizer kept in the run's config, the corpus as sequences,
held text for prompting and infilling, and samples written as a .txt file.

text_discrete.py (token ids) and text_continuous.py (embeddings) differ only in the diffusion space.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from modalities.base import Modality, ModalityConfig
from modalities.text_data import SEPARATOR, TokenChunks, load_tokenizer, read_corpus, split_stream, train_tokenizer
from modalities.text_metrics import chunks, unigram_entropy, words

HOLE = re.compile(r"\[(\d+)\]")  # template=: "[12]" stands for 12 free tokens


@dataclass
class TextConfig(ModalityConfig):
    tokenizer: str = "char"  # char | byte | bpe (trained on the corpus) | <pretrained tokenizer folder>
    seq_len: int = 128  # tokens per training sequence and per sample
    bpe_vocab: int = 2048  # tokenizer=bpe: vocabulary size to learn
    vocab: int | None = None  # filled from the tokenizer at the start of training
    tokenizer_state: str | None = None  # filled: the serialised tokenizer (char list or tokenizer JSON)


class TextModality(Modality):
    """The text plumbing of both text modalities; subclasses choose the diffusion space."""

    # prompt: held first tokens; suffix: held last tokens; template: text with [n] holes of n free tokens
    requests: tuple[str, ...] = ("prompt", "suffix", "template")
    scored_by_reference = True

    def __init__(self, cfg, patch: int, data=None):
        super().__init__(cfg, patch, data)
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

    def heldout(self, path: str | None) -> TokenChunks:
        """All of the text at `path` as sequences, or this corpus's held-out split when path is None."""
        if path is None:
            return self.dataset("test")
        texts, skipped = read_corpus(path)
        ids = self._tokenizer().encode(SEPARATOR.join(texts))
        return TokenChunks(ids, self.cfg.seq_len, self.tokenizer, skipped)

    def likelihood_metrics(self, nats_per_token: float, heldout: TokenChunks) -> dict:
        """A held-out negative log-likelihood (or its bound) in the units text models are compared in:
        nats and bits per token, bits per character of the decoded held-out text, perplexity; and the
        held-out text's own unigram entropy, what sample entropies are read against."""
        n_tokens = len(heldout) * heldout.seq_len
        n_chars = len(self._tokenizer().decode(heldout.ids[:n_tokens].tolist()))
        return {
            "nll_nats_per_token": nats_per_token,
            "bits_per_token": nats_per_token / math.log(2),
            "bits_per_char": nats_per_token / math.log(2) * n_tokens / n_chars,
            "perplexity": math.exp(nats_per_token),
            "heldout_tokens": n_tokens,
            "data_unigram_entropy_bits": unigram_entropy(heldout.ids[:n_tokens], self.vocab),
        }

    def training_words(self) -> set[str]:
        """The words of the training split, what real_word_share counts as real."""
        try:
            train = self.dataset("train")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"the real-word share needs the training text: {e}") from e
        return set(words(self._tokenizer().decode(train.ids.tolist())))

    def strings(self, ids) -> list[str]:
        """(B, N) token ids -> B strings."""
        tokenizer = self._tokenizer()
        return [tokenizer.decode(row) for row in ids.tolist()]

    def save(self, samples, path, **request) -> str:
        path = Path(path).with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{'=' * 20} sample {i} {'=' * 20}\n{s}\n" for i, s in enumerate(samples))
        path.write_text(text, encoding="utf-8")
        print(text)
        return str(path)

    # --- sampling -------------------------------------------------------------------------
    def sample_shape(self, n):
        return (n, self.cfg.seq_len)

    def draw(self, process, model_fn, args, device, generator, **options) -> torch.Tensor:
        """args.n samples for evaluation, args.batch at a time, with args' steps, sampler and guidance."""
        return torch.cat(
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
                    **options,
                )
                for i, j in chunks(args.n, args.batch)
            ]
        )

    def held_tokens(self, prompt=None, suffix=None, template=None):
        """The tokens a sample must contain, from what the user asked.

        prompt= is held at the start and suffix= at the end of every sample; template= spells a
        whole sample as text with holes, "[n]" for n free tokens ("ROMEO:[40]my lord.[20]"), and
        leaves any tokens after it free. Text is tokenised piece by piece.

        Returns:
            (ids (seq_len,) long, held (seq_len,) bool), or None when nothing is held.
        """
        if template is not None and (prompt or suffix):
            raise ValueError("template= spells the whole sample; give it alone, or prompt=/suffix= without it")
        n, tokenizer = self.cfg.seq_len, self._tokenizer()
        pieces: list[tuple[list[int], bool]] = []  # (ids, held)
        if template is not None:
            at = 0
            for hole in HOLE.finditer(template):
                pieces += [(tokenizer.encode(template[at : hole.start()]), True), ([0] * int(hole[1]), False)]
                at = hole.end()
            pieces.append((tokenizer.encode(template[at:]), True))
        else:
            head, tail = tokenizer.encode(prompt or ""), tokenizer.encode(suffix or "")
            pieces = [(head, True), ([0] * max(n - len(head) - len(tail), 0), False), (tail, True)]
        used = sum(len(ids) for ids, _ in pieces)
        if used > n:
            asked = "template" if template is not None else "prompt and suffix"
            raise ValueError(f"the {asked} take {used} tokens, over modality.seq_len={n}")
        if not any(held and ids for ids, held in pieces):
            return None
        pieces.append(([0] * (n - used), False))
        ids = torch.tensor([i for piece, _ in pieces for i in piece], dtype=torch.long)
        held = torch.tensor([h for piece, h in pieces for _ in piece], dtype=torch.bool)
        return ids, held
