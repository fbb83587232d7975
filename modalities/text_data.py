"""Text data: tokenizers and the corpus packed into fixed-length token sequences.

Shared by the text modalities. A corpus is a plain text file, a folder of *.txt files, a JSONL
file with a "text" field per line, or (path None) the built-in English documentation of CPython
(`pydoc_data.topics`, on every machine with Python, no download). Documents are joined with a
blank line into one token stream; its last tenth is the held-out split (as nanoGPT), and both
splits are cut into consecutive sequences of seq_len tokens.

Tokenizers all have `vocab_size`, `encode(text) -> list[int]`, `decode(ids) -> str` and
`state() -> str | None`, the serialised form a run stores in its config so that sampling needs
only the checkpoint directory.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

HELD_OUT = 0.1  # share of the token stream kept for evaluation (the end of it)
SEPARATOR = "\n\n"  # between documents


class CharTokenizer:
    """One id per character seen in the training corpus (nanoGPT's shakespeare_char)."""

    def __init__(self, chars: list[str]):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)

    @classmethod
    def train(cls, texts: list[str]) -> CharTokenizer:
        return cls(sorted(set("".join(texts)) | set(SEPARATOR)))

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.index.keys())
        if unknown:
            raise ValueError(
                f"characters {unknown[:20]} are not in this model's vocabulary "
                f"({self.vocab_size} characters learnt from its training text)"
            )
        return [self.index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def state(self) -> str:
        return json.dumps(self.chars, ensure_ascii=False)


class ByteTokenizer:
    """UTF-8 bytes, 256 ids; decoding replaces byte sequences that are not valid UTF-8."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def state(self) -> None:
        return None


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer: byte-level BPE trained on the corpus, or the fast
    tokenizer of a pretrained model directory. Its JSON is the state."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train_bpe(cls, texts: list[str], vocab_size: int) -> HFTokenizer:
        """Byte-level BPE (GPT-2's scheme, Radford et al. 2019): any text encodes, nothing is unknown."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer)

    @classmethod
    def pretrained(cls, path: str) -> HFTokenizer:
        """The fast tokenizer saved in a model directory (tokenizer.json), read offline."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"modality.tokenizer={path!r}: not char, byte, bpe or a readable tokenizer directory ({e})"
            ) from e
        if not tokenizer.is_fast:
            raise ValueError(f"modality.tokenizer={path!r}: needs a fast tokenizer (tokenizer.json)")
        return cls(tokenizer.backend_tokenizer)

    @classmethod
    def from_state(cls, state: str) -> HFTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(state))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def state(self) -> str:
        return self.tokenizer.to_str()


def load_tokenizer(kind: str, state: str | None):
    """The tokenizer a run saved: `kind` is modality.tokenizer, `state` modality.tokenizer_state.
    Returns None when it must first be learnt from the training corpus."""
    if kind == "byte":
        return ByteTokenizer()
    if state is None:
        return HFTokenizer.pretrained(kind) if kind not in ("char", "bpe") else None
    return CharTokenizer(json.loads(state)) if kind == "char" else HFTokenizer.from_state(state)


def train_tokenizer(kind: str, texts: list[str], bpe_vocab: int):
    """Learn a char or BPE tokenizer from the training texts."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return HFTokenizer.train_bpe(texts, bpe_vocab)
    raise ValueError(
        f"modality.tokenizer={kind!r} cannot be learnt from text; choose char, byte, bpe or a tokenizer directory"
    )


# --- corpus ----------------------------------------------------------------------------------


def builtin_corpus() -> list[str]:
    """CPython's English documentation topics (pydoc_data.topics), about 460k characters."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def universal_newlines(text: str) -> str:
    """CRLF and lone CR line ends as \\n, as Python's text mode reads files (old corpora end lines with
    CR alone); otherwise \\r would enter the vocabulary and the samples."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents with a leading byte-order mark dropped and universal newlines;
    empty, binary or undecodable files raise ValueError naming the file."""
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise ValueError(f"{path}: binary file (NUL bytes), not text")
    try:
        text = data.decode("utf-8-sig")  # -sig: a leading BOM is dropped, not read as U+FEFF
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from e
    if not text.strip():
        raise ValueError(f"{path}: empty text file")
    return universal_newlines(text)


def tolerate(bad: list[str], total: int, max_bad: float, what: str):
    """Warn about each of the `bad` items ("where: reason") while they are at most `max_bad` of the
    `total` and not all of them; otherwise raise ValueError listing the first ones."""
    if bad and (len(bad) == total or len(bad) > max_bad * total):
        listed = "\n  ".join(bad[:20])
        raise ValueError(
            f"{len(bad)} of {total} {what} cannot be read (more than data.bad_threshold={max_bad}); "
            f"fix or remove them:\n  {listed}"
        )
    for report in bad:
        warnings.warn(f"skipped unreadable {report}", stacklevel=3)


def read_jsonl(path: Path, max_bad: float = 0.01) -> tuple[list[str], list[str]]:
    """The "text" field of every line of a JSONL file (universal newlines inside it too). Lines that
    are not JSON or have no string "text" are skipped and reported while they are at most `max_bad`
    of the records, as unreadable files are in a folder.

    Returns:
        (texts, skipped) with skipped as "path:line: reason" strings.
    """
    texts, skipped, records = [], [], 0
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        records += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.append(f"{path}:{number}: not JSON ({e.msg})")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            skipped.append(f'{path}:{number}: no string "text" field')
            continue
        texts.append(universal_newlines(record["text"]))
    if not records:
        raise ValueError(f"{path}: no records")
    tolerate(skipped, records, max_bad, f"lines of {path}")
    return texts, skipped


def read_corpus(path: str | None, max_bad: float = 0.01) -> tuple[list[str], list[str]]:
    """The documents at `path` (None: the built-in corpus).

    Unreadable *.txt files in a folder, and bad lines of a JSONL file, are skipped and reported with
    their paths while they are at most `max_bad` of the files (lines); beyond that, or when none is
    readable, ValueError names them.
    Returns:
        (texts, skipped) with skipped as "path: reason" strings.
    """
    if path is None:
        return builtin_corpus(), []
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"data.path={path}: no such file or folder")
    if root.is_file():
        return read_jsonl(root, max_bad) if root.suffix == ".jsonl" else ([read_text(root)], [])
    files = sorted(root.rglob("*.txt"))
    if not files:
        raise ValueError(f"data.path={path}: no *.txt files in this folder")
    texts, skipped = [], []
    for file in files:
        try:
            texts.append(read_text(file))
        except (ValueError, OSError) as e:
            skipped.append(str(e))
    tolerate(skipped, len(files), max_bad, f"text files in {path}")
    return texts, skipped


class TokenChunks(Dataset):
    """Consecutive seq_len-token sequences of one split of the token stream: {"x": (seq_len,) long}.

    Args:
        ids: the split's token stream. skipped: unreadable files, reported by the loader.
    """

    def __init__(self, ids: list[int], seq_len: int, tokenizer, skipped: list[str]):
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.seq_len, self.tokenizer, self.skipped = seq_len, tokenizer, skipped
        if len(self) == 0:
            raise ValueError(
                f"{len(ids)} tokens are fewer than one sequence of modality.seq_len={seq_len}; "
                "use more text or a smaller seq_len"
            )

    def __len__(self):
        return len(self.ids) // self.seq_len

    def __getitem__(self, i):
        return {"x": self.ids[i * self.seq_len : (i + 1) * self.seq_len]}

    def sequences(self, start: int, end: int) -> torch.Tensor:
        """Sequences start..end-1 stacked: (end - start, seq_len)."""
        return self.ids[start * self.seq_len : end * self.seq_len].view(end - start, self.seq_len)


def split_stream(ids: list[int], split: str) -> list[int]:
    """The first 90% of the stream for "train", the last 10% otherwise."""
    cut = int(len(ids) * (1 - HELD_OUT))
    return ids[:cut] if split == "train" else ids[cut:]
