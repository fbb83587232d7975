"""One module per kind of data; the registry names the valid choices."""

from __future__ import annotations

from modalities.audio import Audio
from modalities.image import Image
from modalities.image_vae import ImageVAE
from modalities.text_continuous import TextContinuous
from modalities.text_discrete import TextDiscrete
from modalities.video import Video

MODALITIES = {
    "audio": Audio,
    "image": Image,
    "image_vae": ImageVAE,
    "text_continuous": TextContinuous,
    "text_discrete": TextDiscrete,
    "video": Video,
}


def build_modality(cfg, patch: int, data=None):
    """The Modality object for cfg.name (the `modality.name` key), reading the data that the run's
    `data` config names (None: the modality's built-in data)."""
    if cfg.name not in MODALITIES:
        raise ValueError(f"modality.name={cfg.name!r} is not a modality; choose one of {sorted(MODALITIES)}")
    return MODALITIES[cfg.name](cfg, patch, data)
