"""Audio in: which files are audio, decode them (paths, bytes or file objects; whole or in blocks),
scale PCM, downmix, resample to 16 kHz, and check what the front end needs.

Silent fixes, all documented here and in the README:
- files with several channels are averaged to mono;
- int16 / int32 PCM is scaled to +-1 (divided by 2**15 / 2**31); float16/64 become float32;
- any sample rate is resampled to 16 kHz with soxr (high quality, the resampler librosa uses).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import soundfile as sf
import soxr
import torch

from .frontend import MIN_SAMPLES, SAMPLE_RATE

PathLike = str | os.PathLike
AudioSource = PathLike | bytes | bytearray | memoryview | BinaryIO  # what the decoder reads

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
#: Extensions of the files that are audio (case-insensitive): the formats libsndfile decodes, the
#: one list that folder runs (``batch.find_inputs``) and training (``train.data.list_audio``) use.
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf", ".w64", ".rf64"}
)


def is_audio_path(path: PathLike) -> bool:
    """Whether a file is audio to embed or train on, judged by its extension (``AUDIO_EXTENSIONS``,
    case-insensitive); hidden files (names starting with ``.``, e.g. macOS ``._x.wav``) never are."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says: ``frames`` per channel at ``sample_rate`` Hz, ``channels``."""

    frames: int
    sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        """Seconds, at the file's own rate."""
        return self.frames / self.sample_rate


def _label(source: AudioSource) -> str:
    """How errors name a source: the path in quotes, or what the bytes / file object are."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{memoryview(source).nbytes} bytes>"
    name = getattr(source, "name", None)
    return f"<file object {name!r}>" if isinstance(name, str) else "<file object>"


def _cannot_decode(what: str, error: Exception) -> ValueError:
    """The one error for contents libsndfile cannot read (its reason, without its own prefix)."""
    reason = getattr(error, "error_string", None) or str(error)
    return ValueError(f"cannot decode {what} as audio ({reason})")


def _open(source: AudioSource) -> tuple[sf.SoundFile, str]:
    """An open ``soundfile.SoundFile`` of a path, bytes or binary file object, and its label for errors."""
    what = _label(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no audio file at {what}")
        if path.is_dir():
            raise ValueError(f"{what} is a directory, not an audio file")
        source = str(path)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        return sf.SoundFile(source), what
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:  # empty, truncated and unknown files alike
        raise _cannot_decode(what, e) from None


def audio_info(source: AudioSource) -> AudioInfo:
    """The header of an audio file (path, encoded bytes or binary file object), without decoding it.

    Raises the errors of ``read_audio`` (``FileNotFoundError``, ``ValueError``).
    """
    f, _ = _open(source)
    with f:
        return AudioInfo(frames=f.frames, sample_rate=f.samplerate, channels=f.channels)


def read_audio(source: AudioSource) -> tuple[np.ndarray, int]:
    """Decode audio to a mono float32 waveform at its own rate.

    Args:
        source: a path, the encoded contents of a file (``bytes``), or a binary file object, in any
            format soundfile (libsndfile) reads: wav, flac, ogg/vorbis, opus, mp3, aiff, ...

    Returns:
        ((N,) float32 numpy array, full scale +-1, channels averaged; sample rate in Hz).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a directory, contents that cannot be decoded, or no samples.
    """
    f, what = _open(source)
    with f:
        try:
            data = f.read(dtype="float32", always_2d=True)  # (N, C)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise _cannot_decode(what, e) from None
        sr = int(f.samplerate)
    if data.size == 0:
        raise ValueError(f"{what} holds no audio samples")
    return data.mean(axis=1, dtype=np.float32), sr


def load_audio(source: AudioSource, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode audio (a path, encoded bytes or a binary file object) to a mono float32 waveform at ``sample_rate`` Hz.

    Args:
        source: as ``read_audio``.
        sample_rate: output rate in Hz (16 kHz, what ATST takes, by default).

    Returns:
        (N,) float32 numpy array, full scale +-1, channels averaged.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file cannot be decoded, or holds no samples.
    """
    wav, sr = read_audio(source)
    return resample(wav, sr, sample_rate)


def stream_blocks(path: PathLike, block_frames: int = STREAM_BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """Decode a file block by block to mono float32 at 16 kHz, as ``load_audio`` would (soxr HQ).

    Yields (n,) arrays of about ``block_frames`` source frames each; memory stays bounded
    whatever the file's length. Raises the errors of ``read_audio``, and ``ValueError`` for NaN
    or Inf samples.
    """
    f, what = _open(path)
    with f:
        rs = None
        if f.samplerate != SAMPLE_RATE:
            rs = soxr.ResampleStream(f.samplerate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        while True:
            try:
                data = f.read(block_frames, dtype="float32", always_2d=True)  # (n, C)
            except (sf.LibsndfileError, RuntimeError) as e:
                raise _cannot_decode(what, e) from None
            last = data.shape[0] < block_frames
            mono = data.mean(axis=1, dtype=np.float32)
            if rs is not None:
                mono = rs.resample_chunk(mono, last=last)
            if not np.isfinite(mono).all():
                raise ValueError(f"{what} contains NaN or Inf samples")
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
