"""Audio in: decode files, scale PCM, downmix, resample to 16 kHz, and check what the front end needs.

Silent fixes, all documented here and in the README:
- files with several channels are averaged to mono;
- int16 / int32 PCM is scaled to +-1 (divided by 2**15 / 2**31); float16/64 become float32;
- any sample rate is resampled to 16 kHz with soxr (high quality, the resampler librosa uses).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr
import torch

from .frontend import MIN_SAMPLES, SAMPLE_RATE

PathLike = str | os.PathLike

_INT_SCALE = {np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_TORCH_TO_NUMPY = {
    torch.float16: np.float16,
    torch.bfloat16: np.float32,
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.int16: np.int16,
    torch.int32: np.int32,
}
ACCEPTED_DTYPES = "float16, float32, float64, int16 or int32 PCM"
STREAM_BLOCK_FRAMES = 1 << 18  # source frames per read when a file is decoded in blocks


def load_audio(path: PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode an audio file to a mono float32 waveform at ``sample_rate`` Hz.

    Args:
        path: any file soundfile (libsndfile) reads: wav, flac, ogg/vorbis, opus, mp3, aiff, ...
        sample_rate: output rate in Hz (16 kHz, what ATST takes, by default).

    Returns:
        (N,) float32 numpy array, full scale +-1, channels averaged.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file cannot be decoded, or holds no samples.
    """
    wav, sr = read_audio(path)
    return resample(wav, sr, sample_rate)


def read_audio(path: PathLike) -> tuple[np.ndarray, int]:
    """Decode a file to a mono float32 waveform at its own rate: ((N,) array, sample rate in Hz)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no audio file at {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, not an audio file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (N, C)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(
            f"cannot decode {str(path)!r} as audio ({e}); readable formats: {', '.join(sorted(sf.available_formats()))}"
        ) from None
    if data.size == 0:
        raise ValueError(f"{str(path)!r} holds no audio samples")
    return data.mean(axis=1, dtype=np.float32), int(sr)


def stream_blocks(path: PathLike, block_frames: int = STREAM_BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """Decode a file block by block to mono float32 at 16 kHz, as ``load_audio`` would (soxr HQ).

    Yields (n,) arrays of about ``block_frames`` source frames each; memory stays bounded
    whatever the file's length. Raises ``ValueError`` for NaN or Inf samples.
    """
    with sf.SoundFile(str(path)) as f:
        rs = None
        if f.samplerate != SAMPLE_RATE:
            rs = soxr.ResampleStream(f.samplerate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        while True:
            data = f.read(block_frames, dtype="float32", always_2d=True)  # (n, C)
            last = data.shape[0] < block_frames
            mono = data.mean(axis=1, dtype=np.float32)
            if rs is not None:
                mono = rs.resample_chunk(mono, last=last)
            if not np.isfinite(mono).all():
                raise ValueError(f"{str(path)!r} contains NaN or Inf samples")
            yield mono
            if last:
                return


def resample(wav: np.ndarray, orig_sr: float, target_sr: float = SAMPLE_RATE) -> np.ndarray:
    """Resample a (N,) waveform from ``orig_sr`` to ``target_sr`` Hz (soxr, high quality); float32 out."""
    wav = np.asarray(wav, dtype=np.float32)
    if orig_sr == target_sr:
        return wav
    return soxr.resample(wav, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def check_sample_rate(sample_rate) -> float:
    """Validate a sample rate in Hz: a positive finite number."""
    if sample_rate is None:
        raise ValueError("sample_rate is required for arrays and tensors (in Hz, e.g. sample_rate=16000)")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"sample_rate must be a number in Hz, got {type(sample_rate).__name__}")
    if not math.isfinite(sample_rate) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
    return float(sample_rate)


def to_float_waveform(x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Scale a waveform of an accepted dtype to float (+-1 full scale); torch stays torch, numpy stays numpy."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in _TORCH_TO_NUMPY:
            raise TypeError(f"audio tensors must be {ACCEPTED_DTYPES}, got {x.dtype}")
        if x.dtype in (torch.int16, torch.int32):
            return x.float() / _INT_SCALE[np.dtype(_TORCH_TO_NUMPY[x.dtype])]
        return x if x.dtype == torch.float64 else x.float()
    x = np.asarray(x)
    if x.dtype in _INT_SCALE:
        return x.astype(np.float32) / _INT_SCALE[x.dtype]
    if x.dtype in _FLOAT_DTYPES:
        return x if x.dtype == np.float64 else x.astype(np.float32, copy=False)
    raise TypeError(f"audio arrays must be {ACCEPTED_DTYPES}, got dtype {x.dtype}")


def prepare_waveform(x: np.ndarray | torch.Tensor, sample_rate, what: str = "audio") -> torch.Tensor:
    """Turn one 1-D waveform of any accepted dtype and rate into a checked float32 16 kHz CPU tensor.

    Raises ``TypeError`` for a dtype that is not audio, ``ValueError`` for an empty, too short or
    non-finite waveform (the message names ``what`` and says what is accepted).
    """
    sr = check_sample_rate(sample_rate)
    x = to_float_waveform(x)
    if x.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D waveform, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty (0 samples)")
    finite = torch.isfinite(x).all() if isinstance(x, torch.Tensor) else np.isfinite(x).all()
    if not bool(finite):
        raise ValueError(f"{what} contains NaN or Inf samples; pass finite values in +-1")
    if sr != SAMPLE_RATE:
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        x = resample(x, sr)
    wav = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if wav.shape[0] < MIN_SAMPLES:
        raise ValueError(
            f"{what} is too short: {wav.shape[0]} samples at {SAMPLE_RATE} Hz; the front end needs at least "
            f"{MIN_SAMPLES} samples ({1000 * MIN_SAMPLES / SAMPLE_RATE:.2f} ms)"
        )
    return wav
