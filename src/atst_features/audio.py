"""Audio in: which files are audio, decode them (paths, bytes or file objects; whole or in blocks),
scale PCM, downmix, resample to 16 kHz, and check what the front end needs.

Files are decoded by libsndfile (``soundfile``); what it cannot read (m4a/AAC, MP4, WebM, WMA, ...)
by FFmpeg through PyAV when the ``av`` extra is installed (``pip install 'atst-features[av]'``):
first for the extensions of ``AV_EXTENSIONS``, else when libsndfile cannot open a file.

Silent fixes, all documented here and in the README:
- files with several channels are averaged to mono;
- int16 / int32 PCM is scaled to +-1 (divided by 2**15 / 2**31); float16/64 become float32;
- any-endian and negatively strided arrays are copied to native order;
- any sample rate is resampled to 16 kHz with soxr (high quality, the resampler librosa uses).

Mistakes that would give wrong results silently are refused or warned about instead: rates
outside 1 kHz .. 768 kHz (a rate in kHz), values that overflow float32, and (a warning) float
samples far above full scale (int16-scaled floats).
"""

from __future__ import annotations

import io
import math
import os
import warnings
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
MIN_SAMPLE_RATE = 1_000  # Hz; below this a rate was almost surely given in kHz (16, 44.1, 48)
MAX_SAMPLE_RATE = 768_000  # Hz; the highest rate audio hardware and formats use
LOUD_PEAK = 10.0  # float samples peaking above this (20 dB over full scale) are warned about
AV_EXTRA = "pip install 'atst-features[av]'"
STREAM_BLOCK_FRAMES = 1 << 18  # source frames per read when a file is decoded in blocks
#: Extensions of the files that are audio (case-insensitive): the formats libsndfile decodes, the
#: one list that folder runs (``batch.find_inputs``) and training (``train.data.list_audio``) use.
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf", ".w64", ".rf64"}
)
#: Extensions of containers libsndfile does not read, decoded through PyAV (the ``av`` extra) and
#: tried with it first (case-insensitive). Not part of ``AUDIO_EXTENSIONS``: folder runs do not
#: look for them.
AV_EXTENSIONS = frozenset(
    {".m4a", ".m4b", ".mp4", ".aac", ".3gp", ".mka", ".mkv", ".webm", ".wma", ".asf", ".ac3", ".amr"}
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


def _extension(source) -> str:
    """The lower-case extension of a path or of a file object's name ("" when there is none)."""
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", None)
    return os.path.splitext(name)[1].lower() if isinstance(name, str) else ""


def _reason(error: Exception) -> str:
    """A decoder's reason for failing, without its own prefix; libsndfile's misleading "(possibly a
    pipe?)" for a regular file it cannot read is said plainly."""
    reason = getattr(error, "error_string", None) or getattr(error, "strerror", None) or str(error)
    if "possibly a pipe" in reason:
        return "damaged, truncated, or not in a format libsndfile reads"
    return reason.rstrip(".")


_SF_OTHER_FORMAT = (1, 4)  # libsndfile's "unrecognised format" and "unsupported encoding": FFmpeg may read it


class DecodeError(ValueError):
    """Contents a decoder cannot read; ``reason`` is the decoder's, without its own prefix."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"cannot decode {what} as audio ({reason})")
        self.reason = reason


def _cannot_decode(what: str, error: Exception | str) -> DecodeError:
    """The one error for contents a decoder cannot read."""
    return DecodeError(what, error if isinstance(error, str) else _reason(error))


def _pyav():
    """The ``av`` module (PyAV, which bundles FFmpeg), or ``None`` when the ``av`` extra is not installed."""
    try:
        import av
    except ImportError:
        return None
    return av


class _AVFile:
    """What this module uses of ``soundfile.SoundFile`` (``frames``, ``samplerate``, ``channels``,
    ``read``, ``with``) over PyAV: the first audio stream, decoded to float32 (n, channels) blocks.

    ``frames`` comes from the container's duration (counted by decoding when it has none), so for
    compressed formats it may differ from the decoded count by a few milliseconds.
    """

    def __init__(self, av, source: str | BinaryIO, what: str):
        self._av, self._source, self._what = av, source, what
        try:
            self._container = av.open(source)
        except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
            raise _cannot_decode(what, f"FFmpeg: {_reason(e)}") from None
        if not self._container.streams.audio:
            self._container.close()
            raise _cannot_decode(what, "it has no audio stream")
        stream = self._container.streams.audio[0]
        codec = stream.codec_context
        self.samplerate = int(codec.sample_rate or stream.rate or 0)
        if self.samplerate <= 0:  # e.g. an empty file FFmpeg guessed the format of from its name
            self._container.close()
            raise _cannot_decode(what, "FFmpeg: no sample rate; the file is empty or damaged")
        self._blocks = self._decode(stream, codec.layout if codec.channels else None)
        self._pending: list[np.ndarray] = []  # decoded (n, C) blocks not yet read
        if codec.channels:
            self.channels = int(codec.channels)
        else:  # a raw stream: its layout shows in its first frame
            self._pending = [next(self._blocks, np.zeros((0, 1), np.float32))]
            self.channels = self._pending[0].shape[1]
        seconds = None
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        elif self._container.duration:
            seconds = self._container.duration / av.time_base
        self._frames = None if seconds is None else round(seconds * self.samplerate)

    def _decode(self, stream, layout) -> Iterator[np.ndarray]:
        resampler = self._av.AudioResampler(format="fltp", layout=layout, rate=self.samplerate)
        try:
            for frame in self._container.decode(stream):
                for out in resampler.resample(frame):
                    yield out.to_ndarray().T  # (n, C) float32
            for out in resampler.resample(None):
                yield out.to_ndarray().T
        except self._av.FFmpegError as e:
            raise _cannot_decode(self._what, f"FFmpeg: {_reason(e)}") from None

    @property
    def frames(self) -> int:
        if self._frames is None:
            if isinstance(self._source, str):
                with _AVFile(self._av, self._source, self._what) as other:
                    self._frames = sum(b.shape[0] for b in other._blocks)
            else:  # bytes or a file object: decoded once, kept for read()
                self._pending = [self.read()]
                self._frames = self._pending[0].shape[0]
        return self._frames

    def read(self, frames: int = -1, dtype: str = "float32", always_2d: bool = True) -> np.ndarray:
        """(n, C) float32: the next ``frames`` frames (all that are left for -1; fewer at the end)."""
        held = sum(b.shape[0] for b in self._pending)
        while frames < 0 or held < frames:
            block = next(self._blocks, None)
            if block is None:
                break
            self._pending.append(block)
            held += block.shape[0]
        data = np.concatenate(self._pending) if self._pending else np.zeros((0, self.channels), np.float32)
        cut = data.shape[0] if frames < 0 else frames
        self._pending = [data[cut:]] if data.shape[0] > cut else []
        return data[:cut]

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "_AVFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(source: AudioSource) -> tuple[sf.SoundFile | _AVFile, str]:
    """An open decoder of a path, bytes or binary file object, and its label for errors.

    libsndfile first, except for ``AV_EXTENSIONS``; PyAV (when installed) for what libsndfile
    cannot open. The errors name the ``av`` extra when it would help and is missing.
    """
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
    av = _pyav()
    extension = _extension(source)
    if extension in AV_EXTENSIONS:
        if av is None:
            raise DecodeError(what, f"{extension} files are decoded by FFmpeg through PyAV; {AV_EXTRA}")
        return _AVFile(av, source, what), what
    start = source.tell() if getattr(source, "seekable", lambda: False)() else None
    try:
        return sf.SoundFile(source), what
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:  # empty, truncated and unknown files alike
        sf_reason = _reason(e)
        other_format = getattr(e, "code", None) in _SF_OTHER_FORMAT or "possibly a pipe" in str(e)
    if av is None and other_format:
        raise DecodeError(
            what, f"{sf_reason}; m4a/AAC, MP4, WebM, WMA and other formats libsndfile does not read are "
            f"decoded by FFmpeg through PyAV: {AV_EXTRA}"
        )
    if av is None:
        raise _cannot_decode(what, sf_reason)
    if not isinstance(source, str):
        if start is None:
            raise _cannot_decode(what, sf_reason)
        source.seek(start)
    try:
        return _AVFile(av, source, what), what
    except DecodeError as e:
        raise _cannot_decode(what, f"libsndfile: {sf_reason}; {e.reason}") from None


def audio_info(source: AudioSource) -> AudioInfo:
    """The header of an audio file (path, encoded bytes or binary file object), without decoding it.

    For containers decoded through PyAV the frames come from the container's duration (counted by
    decoding when it states none). Raises the errors of ``read_audio`` (``FileNotFoundError``, ``ValueError``).
    """
    f, _ = _open(source)
    with f:
        return AudioInfo(frames=f.frames, sample_rate=f.samplerate, channels=f.channels)


def read_audio(source: AudioSource) -> tuple[np.ndarray, int]:
    """Decode audio to a mono float32 waveform at its own rate.

    Args:
        source: a path, the encoded contents of a file (``bytes``), or a binary file object, in any
            format soundfile (libsndfile) reads: wav, flac, ogg/vorbis, opus, mp3, aiff, ...; with
            the ``av`` extra also what FFmpeg reads: m4a/AAC, MP4, WebM, WMA, ... (``AV_EXTENSIONS``).

    Returns:
        ((N,) float32 numpy array, full scale +-1, channels averaged; sample rate in Hz).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a directory, contents that cannot be decoded (the message says how to install
            PyAV when that would help), or no samples.
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
    """Decode a file block by block to mono float32 at 16 kHz, as ``load_audio`` would (soxr HQ;
    PyAV for the formats it decodes).

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
    """Validate a sample rate in Hz: a finite number from 1 kHz to 768 kHz (a rate given in kHz, such
    as 16 or 44.1, is refused rather than upsampled a thousandfold)."""
    if sample_rate is None:
        raise ValueError("sample_rate is required for arrays and tensors (in Hz, e.g. sample_rate=16000)")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"sample_rate must be a number in Hz, got {type(sample_rate).__name__}")
    if not math.isfinite(sample_rate) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        in_khz = MIN_SAMPLE_RATE <= sample_rate * 1000 <= MAX_SAMPLE_RATE
        hint = f"; a rate in kHz? pass Hz, e.g. sample_rate={sample_rate * 1000:g}" if in_khz else ""
        raise ValueError(
            f"sample_rate={sample_rate:g} Hz is outside {MIN_SAMPLE_RATE // 1000} kHz .. {MAX_SAMPLE_RATE // 1000} kHz"
            f"{hint}"
        )
    return float(sample_rate)


def check_dense(x: torch.Tensor, what: str = "audio") -> None:
    """Refuse tensors that hold no samples to read: meta tensors and sparse (or other non-strided) layouts."""
    if x.is_meta:
        raise ValueError(f"{what} is a meta tensor, which holds no samples; pass a tensor with data")
    if x.layout != torch.strided:
        raise ValueError(f"{what} is a {x.layout} tensor; pass a dense one (x.to_dense())")


def to_float_waveform(x: np.ndarray | torch.Tensor, what: str = "audio") -> np.ndarray | torch.Tensor:
    """Scale a waveform of an accepted dtype to float32 (+-1 full scale); torch stays torch, numpy stays
    numpy (native byte order, and a copy when the array's strides are negative)."""
    if isinstance(x, torch.Tensor):
        check_dense(x, what)
        if x.dtype not in _TORCH_TO_NUMPY:
            raise TypeError(f"audio tensors must be {ACCEPTED_DTYPES}, got {x.dtype}")
        if x.dtype in (torch.int16, torch.int32):
            return x.float() / _INT_SCALE[np.dtype(_TORCH_TO_NUMPY[x.dtype])]
        return x.float()
    x = np.asarray(x)
    if x.dtype.byteorder not in "=|":  # big- or little-endian where the machine is not: same values, native order
        x = x.astype(x.dtype.newbyteorder("="))
    if x.dtype in _INT_SCALE:
        return x.astype(np.float32) / _INT_SCALE[x.dtype]
    if x.dtype in _FLOAT_DTYPES:
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf, refused as such
            x = x.astype(np.float32, copy=False)
        return x if all(s >= 0 for s in x.strides) else np.ascontiguousarray(x)
    raise TypeError(f"audio arrays must be {ACCEPTED_DTYPES}, got dtype {x.dtype}")


def loud_peak(x: np.ndarray | torch.Tensor) -> float | None:
    """The peak |sample| of a float waveform (any shape) when it is above ``LOUD_PEAK``, far beyond
    full scale (+-1), as int16-valued floats are; ``None`` otherwise and for integer PCM (scaled)."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point() or x.numel() == 0 or x.is_meta or x.layout != torch.strided:
            return None
        peak = float(x.detach().abs().max())
    else:
        x = np.asarray(x)
        if x.dtype.kind != "f" or x.size == 0:
            return None
        peak = float(np.abs(x).max())
    return peak if peak > LOUD_PEAK else None  # NaN is no peak: refused later as non-finite


def warn_loud(loud: list[tuple[str, float]]) -> None:
    """One warning for the inputs (name, peak) whose float samples peak far above full scale."""
    if not loud:
        return
    (what, peak), more = loud[0], len(loud) - 1
    others = f" (and {more} more input{'s' if more > 1 else ''})" if more else ""
    warnings.warn(
        f"{what}{others} peaks at {peak:g}, far above full scale (+-1): int16-scaled? divide by 32768 "
        "(or pass the int16 array itself, which is scaled for you)",
        UserWarning,
        stacklevel=4,  # the caller of embed_clip / embed_frames
    )


def pad_short(audio: torch.Tensor, min_samples: int = MIN_SAMPLES, what: str = "audio") -> torch.Tensor:
    """(..., N >= 1) samples zero-padded at the end to at least ``min_samples`` (by default the front
    end's minimum, so that sounds of any length can be embedded); ``ValueError`` for N = 0."""
    if audio.shape[-1] == 0:
        raise ValueError(f"{what} holds sounds of 0 samples (shape {tuple(audio.shape)}); pass at least 1 sample each")
    short = min_samples - audio.shape[-1]
    return torch.nn.functional.pad(audio, (0, short)) if short > 0 else audio


def prepare_waveform(x: np.ndarray | torch.Tensor, sample_rate, what: str = "audio") -> torch.Tensor:
    """Turn one 1-D waveform of any accepted dtype and rate into a checked float32 16 kHz CPU tensor.

    Raises ``TypeError`` for a dtype that is not audio, ``ValueError`` for a meta or sparse tensor,
    a rate outside 1 .. 768 kHz, an empty, too short or non-finite waveform (finiteness is checked
    after the cast to float32, so float64 values beyond its range count as Inf; the message names
    ``what`` and says what is accepted).
    """
    sr = check_sample_rate(sample_rate)
    x = to_float_waveform(x, what)
    if x.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D waveform, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} is empty (0 samples)")
    finite = torch.isfinite(x).all() if isinstance(x, torch.Tensor) else np.isfinite(x).all()
    if not bool(finite):
        raise ValueError(f"{what} contains NaN or Inf samples (or values beyond float32's range); pass finite values in +-1")
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
