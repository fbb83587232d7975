"""Media I/O through PyAV, for every modality that reads or writes video or audio files.

torchvision 0.26 has no video I/O and torchaudio 2.11 none without torchcodec, so PyAV (FFmpeg's
libraries) does all decoding and encoding here; torchaudio only transforms tensors. Files that
cannot be used raise modalities.data.BadSample naming the file, so loaders skip and count them.
"""

from __future__ import annotations

# --- video ------------------------------------------------------------------------------



# --- audio ------------------------------------------------------------------------------
