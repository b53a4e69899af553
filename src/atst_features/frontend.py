"""The ATST log-mel front end in pure torch.

waveform (16 kHz, +-1) -> power STFT -> HTK mel filterbank -> dB -> 80 dB floor -> min-max scale.

It reproduces the official torchaudio pipeline (``MelSpectrogram`` + ``AmplitudeToDB(top_db=80)``
+ ``MinMax``) to float32 rounding without importing torchaudio. Every function is batched,
follows the device of its input and computes in float32.

Batches of different lengths are exact: each item is reflect-padded by itself before the
frames are cut (what ``center=True`` does to a lone clip), and the 80 dB floor is taken over
that item's own valid frames, so zero padding in a batch changes nothing in the valid frames.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

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


def normalise(db: torch.Tensor, peak_db: torch.Tensor) -> torch.Tensor:
    """Floor at each item's peak - TOP_DB, then the official min-max scaling: (B, N_MELS, T) dB, (B,) peaks."""
    db = torch.maximum(db, peak_db[:, None, None] - TOP_DB)
    return (db - DB_MIN) / (DB_MAX - DB_MIN) * 2.0 - 1.0


def peak_db(db: torch.Tensor, n_frames: torch.Tensor) -> torch.Tensor:
    """Each item's loudest mel bin in dB over its first ``n_frames`` frames: (B, N_MELS, T), (B,) -> (B,)."""
    valid = torch.arange(db.shape[-1], device=db.device)[None, :] < n_frames.to(db.device)[:, None]  # (B, T)
    return db.masked_fill(~valid[:, None, :], -math.inf).amax(dim=(1, 2))


def log_mel(waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised log-mel spectrograms of a batch of 16 kHz waveforms.

    Args:
        waveforms: (B, N) float waveforms at 16 kHz, full scale +-1, zero-padded on the right.
        lengths: (B,) valid samples per item (each >= ``MIN_SAMPLES``); ``None`` means all N.

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

    # center=True, one item at a time: reflect-pad each item's own samples, then zero-pad to one width.
    pad = N_FFT // 2
    if all(n == width for n in lengths_list):
        padded = F.pad(waveforms[:, None, :], (pad, pad), mode="reflect")[:, 0]
    else:
        padded = waveforms.new_zeros(batch, width + 2 * pad)
        for i, n in enumerate(lengths_list):
            padded[i, : n + 2 * pad] = F.pad(waveforms[i : i + 1, None, :n], (pad, pad), mode="reflect")[0, 0]
    db = mel_db(padded)  # (B, N_MELS, T)
    n_frames = torch.tensor([num_frames(n) for n in lengths_list], dtype=torch.long)
    out = normalise(db, peak_db(db, n_frames))
    valid = torch.arange(db.shape[-1], device=db.device)[None, :] < n_frames.to(db.device)[:, None]  # (B, T)
    return out.masked_fill(~valid[:, None, :], 0.0), n_frames
