"""The ATST log-mel front end in pure torch.

waveform (16 kHz, +-1) -> power STFT -> HTK mel filterbank -> dB -> 80 dB floor [-> dB clamp] -> min-max scale.

It reproduces the official torchaudio pipeline (``MelSpectrogram`` + ``AmplitudeToDB(top_db=80)``
+ ``MinMax``) to float32 rounding without importing torchaudio. Every function is batched,
follows the device of its input and computes in float32.

The dB clamp is the one front-end parameter that differs between checkpoints: ATST-SED and
PretrainedSED trained their encoders on dB values clamped to [-50, 80] after the floor
(``ATSTConfig.db_clamp``); every other checkpoint has none. The callers pass the model's
``cfg.db_clamp`` through ``db_clamp=``.

Batches of different lengths are exact: each item is reflect-padded by itself before the
frames are cut (what ``center=True`` does to a lone clip), and the 80 dB floor is taken over
that item's own valid frames, so zero padding in a batch changes nothing in the valid frames.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16000  # Hz; every ATST model is trained on 16 kHz mono
N_FFT = 1024  # samples (64 ms)
WIN_LENGTH = 1024  # samples, periodic Hann window
HOP_LENGTH = 160  # samples (10 ms): one mel frame
N_MELS = 64
F_MIN = 60.0  # Hz
F_MAX = 7800.0  # Hz
TOP_DB = 80.0  # dB below each item's peak where the floor sits
AMIN = 1e-10  # power floor before log10
DB_MIN = -79.6482  # AudioSet statistics used by the official MinMax scaling
DB_MAX = 50.6842



def _exact_div(a: int, b: int) -> int:
    if a % b:
        raise ValueError(f"{a} is not a multiple of {b}")
    return a // b


FRAMES_PER_S = _exact_div(SAMPLE_RATE, HOP_LENGTH)  # 100 mel frames per second

#: The shortest waveform the front end takes: the reflect padding of ``N_FFT // 2`` samples
#: on each side needs more samples than it pads (the official code raises below this).
MIN_SAMPLES = N_FFT // 2 + 1


def num_frames(num_samples: int | torch.Tensor) -> int | torch.Tensor:
    """Mel frames of a waveform of ``num_samples`` samples: ``num_samples // HOP_LENGTH + 1``."""
    return num_samples // HOP_LENGTH + 1


def _hz_to_mel(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filterbank(device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """HTK-scale triangular filters without area normalisation, shape (N_FFT // 2 + 1, N_MELS).

    Filter m rises linearly from mel point m to m+1 and falls to m+2, with N_MELS + 2 points
    spaced evenly in mel between F_MIN and F_MAX, evaluated at the STFT bin frequencies.
    """
    bin_hz = torch.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)  # (F,)
    mel_points = torch.linspace(_hz_to_mel(F_MIN), _hz_to_mel(F_MAX), N_MELS + 2)
    edge_hz = _mel_to_hz(mel_points)  # (N_MELS + 2,)
    widths = edge_hz[1:] - edge_hz[:-1]  # (N_MELS + 1,)
    offsets = edge_hz[None, :] - bin_hz[:, None]  # (F, N_MELS + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0)  # (F, N_MELS)
    return weights.to(device)


@lru_cache(maxsize=8)
def _window(device: torch.device) -> torch.Tensor:
    return torch.hann_window(WIN_LENGTH, periodic=True, device=device)


def mel_db(padded: torch.Tensor) -> torch.Tensor:
    """Mel power in dB, before the floor: (B, S) already-padded samples -> (B, N_MELS, (S - N_FFT) // HOP_LENGTH + 1).

    ``padded`` holds each frame's full window: a waveform reflect-padded by ``N_FFT // 2`` on each
    side (what ``center=True`` does), or any run of samples around the wanted frame centres.
    """
    spec = torch.stft(
        padded.float(),
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        win_length=WIN_LENGTH,
        window=_window(padded.device),
        center=False,
        onesided=True,
        return_complex=True,
    )  # (B, F, T)
    mel = torch.matmul(spec.abs().pow(2.0).transpose(1, 2), mel_filterbank(padded.device)).transpose(1, 2)
    return 10.0 * torch.log10(torch.clamp(mel, min=AMIN))  # (B, N_MELS, T)


def sample_range(first_frame: int, n_frames: int) -> tuple[int, int]:
    """Samples [lo, hi) that mel frames [first_frame, first_frame + n_frames) are computed from.

    Frame f is centred at sample f * HOP_LENGTH and spans N_FFT samples, so the range is
    N_FFT // 2 samples wider than the frame centres on each side (lo < 0 or hi > N at the edges,
    where the front end reflects). hi - lo = HOP_LENGTH * (n_frames - 1) + N_FFT.
    """
    half = N_FFT // 2
    return first_frame * HOP_LENGTH - half, (first_frame + n_frames - 1) * HOP_LENGTH + half


def reflect_indices(lo: int, hi: int, n_total: int | None) -> np.ndarray:
    """The reflect-pad rule (``center=True``): indices [lo, hi) of the padded waveform mapped into
    [0, n_total) (sample -i is sample i; sample N - 1 + i is sample N - 1 - i). ``n_total=None``:
    the right edge is not reached yet (a stream whose length is unknown)."""
    idx = np.abs(np.arange(lo, hi, dtype=np.int64))
    if n_total is not None:
        over = idx >= n_total
        idx[over] = 2 * (n_total - 1) - idx[over]
    return idx


def frame_segment(waveform: torch.Tensor, first_frame: int, n_frames: int) -> torch.Tensor:
    """The samples (reflected at the edges) that frames [first_frame, first_frame + n_frames) of a
    whole (N,) waveform are computed from: (HOP_LENGTH * (n_frames - 1) + N_FFT,)."""
    idx = reflect_indices(*sample_range(first_frame, n_frames), waveform.shape[0])
    return waveform[torch.from_numpy(idx).to(waveform.device)]


def normalise(
    db: torch.Tensor, peak_db: torch.Tensor, db_clamp: tuple[float, float] | None = None
) -> torch.Tensor:
    """Floor at each item's peak - TOP_DB, clamp to ``db_clamp`` = (low, high) dB when given (after
    the floor, as ATST-SED does), then the official min-max scaling: (B, N_MELS, T) dB, (B,) peaks."""
    db = torch.maximum(db, peak_db[:, None, None] - TOP_DB)
    if db_clamp is not None:
        db = db.clamp(min=db_clamp[0], max=db_clamp[1])
    return (db - DB_MIN) / (DB_MAX - DB_MIN) * 2.0 - 1.0


def peak_db_of(db: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
    """Each item's loudest mel bin in dB over its first ``n_frames`` frames: (B, N_MELS, T), (B,) -> (B,)."""
    valid = torch.arange(db.shape[-1], device=db.device)[None, :] < n_frames.to(db.device)[:, None]  # (B, T)
    return db.masked_fill(~valid[:, None, :], -math.inf).amax(dim=(1, 2))


def log_mel_segments(
    segments: torch.Tensor,
    n_frames: torch.Tensor,
    peak_db: torch.Tensor | None = None,
    db_clamp: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Normalised log-mel of frame segments (``frame_segment`` / ``sample_range``), batched.

    Args:
        segments: (B, S) samples holding each item's frames with their STFT context, zero-padded
            on the right.
        n_frames: (B,) mel frames per item.
        peak_db: (B,) the loudest dB the 80 dB floor is taken from (a window of a longer file
            uses the whole file's), NaN or ``None`` for an item's own frames. The peak is taken
            before ``db_clamp``.
        db_clamp: (low, high) dB after the floor (the model's ``cfg.db_clamp``), or ``None``.

    Returns:
        (B, N_MELS, T) float32; frames past an item's own count are zero.
    """
    db = mel_db(segments)  # (B, N_MELS, T)
    n_frames = n_frames.to(db.device)
    peak = peak_db_of(db, n_frames)
    if peak_db is not None:
        given = peak_db.to(device=db.device, dtype=peak.dtype)
        peak = torch.where(torch.isnan(given), peak, given)
    valid = torch.arange(db.shape[-1], device=db.device)[None, :] < n_frames[:, None]  # (B, T)
    return normalise(db, peak, db_clamp).masked_fill(~valid[:, None, :], 0.0)


def log_mel(
    waveforms: torch.Tensor, lengths: torch.Tensor | None = None, db_clamp: tuple[float, float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised log-mel spectrograms of a batch of 16 kHz waveforms.

    Args:
        waveforms: (B, N) float waveforms at 16 kHz, full scale +-1, zero-padded on the right.
        lengths: (B,) valid samples per item (each >= ``MIN_SAMPLES``); ``None`` means all N.
        db_clamp: (low, high) dB after the 80 dB floor (the model's ``cfg.db_clamp``), or ``None``.

    Returns:
        mel: (B, N_MELS, T) float32 with T = N // HOP_LENGTH + 1; frames past an item's own
            count are zero.
        n_frames: (B,) int64 valid mel frames per item, ``lengths // HOP_LENGTH + 1``.
    """
    if waveforms.dim() != 2:
        raise ValueError(f"log_mel takes a (batch, samples) tensor, got shape {tuple(waveforms.shape)}")
    waveforms = waveforms.float()
    batch, width = waveforms.shape
    if lengths is None:
        lengths = torch.full((batch,), width, dtype=torch.long)
    lengths_list = [int(n) for n in lengths]
    if min(lengths_list, default=MIN_SAMPLES) < MIN_SAMPLES:
        raise ValueError(f"every waveform needs at least {MIN_SAMPLES} samples, got lengths {lengths_list}")

    # center=True, one item at a time: each item's own samples reflected at its edges (the one
    # reflect rule, ``frame_segment``), zero-padded to one width.
    n_frames = torch.tensor([num_frames(n) for n in lengths_list], dtype=torch.long)
    if all(n == width for n in lengths_list):
        idx = reflect_indices(*sample_range(0, int(n_frames[0])), width)
        padded = waveforms[:, torch.from_numpy(idx).to(waveforms.device)]
    else:
        segments = [frame_segment(waveforms[i, :n], 0, int(f)) for i, (n, f) in enumerate(zip(lengths_list, n_frames))]
        padded = torch.nn.utils.rnn.pad_sequence(segments, batch_first=True)
    return log_mel_segments(padded, n_frames, db_clamp=db_clamp), n_frames
