"""Media I/O through PyAV, for every modality that reads or writes video or audio files.

torchvision 0.26 has no video I/O and torchaudio 2.11 none without torchcodec, so PyAV (FFmpeg's
libraries) does all decoding and encoding here; torchaudio only transforms tensors. Files that
cannot be used raise modalities.data.BadSample naming the file, so loaders skip and count them.
"""

from __future__ import annotations

import wave

import av
import numpy as np
import torch

from modalities.data import BadSample

# --- video ------------------------------------------------------------------------------



# --- audio ------------------------------------------------------------------------------
AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus", ".aac"}


def read_audio(path, sample_rate: int) -> torch.Tensor:
    """Decode an audio file to mono float samples at `sample_rate`.

    FFmpeg's resampler (through PyAV) converts any other rate, so no file is dropped for its
    format; channels are averaged to mono here (FFmpeg's own downmix adds them at -3 dB, which
    would make a stereo file louder than the same sound in mono).

    Args:
        path: an audio file PyAV can open (wav, flac, mp3, ogg, m4a, ...).
        sample_rate: the rate of the returned samples, in Hz.
    Returns:
        (samples,) float32 in [-1, 1].
    Raises:
        BadSample: the file cannot be decoded or holds no audio samples.
    """
    resampler = av.AudioResampler(format="fltp", rate=sample_rate)  # planar: (channels, samples) frames
    chunks = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise BadSample(path, "no audio stream")
            for frame in container.decode(audio=0):
                chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().mean(axis=0) for f in resampler.resample(None)]  # flush the resampler
    except (av.FFmpegError, ValueError, OSError) as e:
        raise BadSample(path, f"cannot decode audio ({type(e).__name__}: {e})") from e
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise BadSample(path, "no audio samples")
    return torch.from_numpy(np.concatenate(chunks)).clamp(-1, 1)


def write_wav(path, waveform: torch.Tensor, sample_rate: int) -> None:
    """Write a mono waveform as a 16-bit PCM WAV file (the standard library's `wave`).

    Args:
        path: the .wav file to write.
        waveform: (samples,) float, clipped to [-1, 1].
        sample_rate: in Hz.
    """
    pcm = (waveform.detach().float().cpu().clamp(-1, 1) * 32767).round().to(torch.int16).numpy()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.astype("<i2").tobytes())
