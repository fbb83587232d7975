"""Media I/O through PyAV, for every modality that reads or writes video or audio files.

torchvision 0.26 has no video I/O and torchaudio 2.11 none without torchcodec, so PyAV (FFmpeg's
libraries) does all decoding and encoding here; torchaudio only transforms tensors. Files that
cannot be used raise modalities.data.BadSample naming the file, so loaders skip and count them.
"""

from __future__ import annotations

import wave
from pathlib import Path

import av
import numpy as np
import torch

from modalities.data import BadSample

# --- video ------------------------------------------------------------------------------

VIDEO_EXTENSIONS = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif"}


def write_video(frames: np.ndarray, path, fps: int) -> str:
    """Write frames as an H.264 MP4 (yuv420p, the pixel format every player reads).

    Args:
        frames: (T, H, W, 3) or (T, H, W) uint8. yuv420p halves the chroma resolution, so an odd
            height or width is padded by one replicated row or column (players would reject it).
        fps: frames per second (an integer rate, the MP4 time base).
    Returns:
        the path written.
    """
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    _, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18"}  # visually lossless: a sample's artefacts are the model's, not the codec's
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return str(path)


def probe_video(path) -> dict:
    """Index a video file by decoding it once: {"times": start time in seconds of every decodable
    frame, in decode order, "fps": the stream's average rate, "duration": seconds}.

    Frame counts and rates in container headers can be far off (AVI, variable-rate phone video),
    so the index lists the frames that really decode and their own timestamps. Raises
    BadSample when the file cannot be opened or holds no video stream."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadSample(path, "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            times = [_seconds(frame, stream, i) for i, frame in enumerate(container.decode(stream))]
            rate = float(stream.average_rate) if stream.average_rate else 0.0
    except av.FFmpegError as e:
        raise BadSample(path, f"cannot decode video ({type(e).__name__}: {e})") from e
    if not times:
        raise BadSample(path, "no decodable video frames")
    fps = rate or (len(times) - 1) / max(times[-1] - times[0], 1e-9)
    return {"times": times, "fps": fps, "duration": times[-1] - times[0] + 1 / max(fps, 1e-9)}


def _seconds(frame, stream, index: int) -> float:
    """A frame's presentation time in seconds; frames without a timestamp (some AVI and GIF
    files) get one from their decode index and the stream's rate."""
    if frame.pts is not None and stream.time_base is not None:
        return float(frame.pts * stream.time_base)
    rate = float(stream.average_rate or 25)
    return index / rate


def decode_frames(path, start: float, count: int, stride: int = 1) -> list:
    """Decode `count` frames, every `stride`-th, from the first frame at or after `start` seconds.

    Seeks to the key frame at or before `start` and decodes forward, so a clip costs the frames
    from that key frame on, never the whole file. Returns PIL images (RGB). Raises BadSample when
    the file cannot be decoded or ends before the clip does."""
    frames = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if start > 0 and stream.time_base is not None:
                try:
                    container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
                except av.FFmpegError:  # not seekable (some GIFs, broken indexes): decode from the start
                    container.seek(0)
            taken = 0
            for i, frame in enumerate(container.decode(stream)):
                if _seconds(frame, stream, i) < start - 1e-6:
                    continue
                if taken % stride == 0:
                    frames.append(frame.to_image())
                    if len(frames) == count:
                        break
                taken += 1
    except av.FFmpegError as e:
        raise BadSample(path, f"cannot decode video ({type(e).__name__}: {e})") from e
    if len(frames) < count:
        raise BadSample(path, f"ends after {len(frames)} of {count} frames from {start:.3f} s")
    return frames


def read_video(path) -> tuple[np.ndarray, float]:
    """Every frame of a (short) video file: ((T, H, W, 3) uint8, frames per second)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


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
