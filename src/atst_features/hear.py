"""The HEAR 2021 API (https://hearbenchmark.com/hear-api.html) over an ATST model.

    from atst_features import hear
    model = hear.load_model("atst-frame-base")          # a name, directory or checkpoint file
    scene = hear.get_scene_embeddings(audio, model)    # (n_sounds, scene_embedding_size)
    emb, ts = hear.get_timestamp_embeddings(audio, model)  # (n_sounds, T, timestamp_embedding_size), (n_sounds, T) ms

``audio`` is a float32 tensor (n_sounds, n_samples) of equal-length 16 kHz mono sounds, of any
length from 1 sample: sounds shorter than the front end's minimum (``frontend.MIN_SAMPLES``, 513
samples = 32.1 ms) are zero-padded at the end to it, and give one timestamp.
Embeddings are those of ``ATSTModel.embed_clip`` / ``embed_frames`` with every block
(``layers="all"``, the official choice): scene 12 * D for ATST-Frame (2 * 12 * D for ATST-Clip),
timestamp 12 * D. The declared sizes are the real output sizes (the official module declares a
scene size twice too large).

Timestamps lie on one regular 40 ms grid for any length: by default (``hop_s=DEFAULT_HOP_S``)
audio longer than one 10 s window is embedded in overlapping windows ``DEFAULT_HOP_S`` apart,
each token taken from the window where it lies farthest from a cut (``embed_frames(hop_s=...)``),
so there are no 10.01 s chunk seams and token j is at j * 40 ms. There are mel frames // 4 tokens,
so they cover the audio to at most 3 mel frames (30 ms) before its last frame. A timestamp is the centre of its
40 ms token in milliseconds: the middle of its 4 mel-frame centres, t_j + 15 ms. Audio of at most
10.01 s gives the same embeddings as the official chunking. ``hop_s=None`` restores the official
non-overlapping 10.01 s chunks, whose seams leave one 50 ms step per chunk in the timestamps.
Outputs are on the model's device (``model.to(device)`` moves it, as the HEAR harness does).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .audio import pad_short
from .embed import DEFAULT_MODEL, ATSTModel, Layers
from .frontend import SAMPLE_RATE
from .pooling import token_centre_offset

__all__ = ["DEFAULT_HOP_S", "HEARModel", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]

#: Seconds between the starts of the overlapping 10 s windows that keep every token on one 40 ms
#: grid (the HEAR default; also that of the X-ARES and lhotse adapters): each token is then at
#: least 2.5 s from a window's cut, for twice the encoder work of non-overlapping chunks.
DEFAULT_HOP_S = 5.0


def check_hop_s(hop_s, atst: ATSTModel | None = None) -> float | None:
    """``hop_s`` of the overlapping windows: ``None`` or a positive finite number of seconds; with
    ``atst``, also from one token to one window of its encoder (``ATSTModel.embed_frames``)."""
    if hop_s is None:
        return None
    number = isinstance(hop_s, (int, float, np.integer, np.floating)) and not isinstance(hop_s, bool)
    if not number or not math.isfinite(hop_s) or hop_s <= 0:
        raise ValueError(
            f"hop_s must be a positive number of seconds (default {DEFAULT_HOP_S:g}), or None for the "
            f"official non-overlapping chunks; got {hop_s!r}"
        )
    if atst is not None:
        atst._hop_tokens(hop_s)  # the same rule as embed_frames, or a ValueError now
    return float(hop_s)


class HEARModel(nn.Module):
    """An ATST encoder with the attributes the HEAR API requires.

    Attributes:
        sample_rate: 16000 (Hz).
        scene_embedding_size: length of a ``get_scene_embeddings`` row.
        timestamp_embedding_size: length of a ``get_timestamp_embeddings`` frame.
        atst: the wrapped ``ATSTModel`` (its encoder is this module's submodule, so ``.to()`` moves it).
        layers: the blocks used; hop_s: seconds between overlapping windows (``None`` = official chunks).

    Built directly, it defaults to the official chunks (``hop_s=None``); ``load_model``, what the
    HEAR harness calls, defaults to ``DEFAULT_HOP_S``. Raises ``ValueError`` for ``layers`` or
    ``hop_s`` the model cannot use.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, atst: ATSTModel, layers: Layers = "all", hop_s: float | None = None):
        super().__init__()
        self.atst = atst
        self.encoder = atst.encoder  # registered so that .to(), .cuda() and state_dict() see it
        self.layers = layers
        self.hop_s = check_hop_s(hop_s, atst)
        self.scene_embedding_size = atst.clip_dim(layers)
        self.timestamp_embedding_size = atst.frame_dim(layers)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Same as ``get_scene_embeddings(audio, self)``."""
        return get_scene_embeddings(audio, self)


def load_model(
    model_file_path: str = "",
    device: str | torch.device = "cpu",
    *,
    layers: Layers = "all",
    hop_s: float | None = DEFAULT_HOP_S,
) -> HEARModel:
    """Load an ATST model for the HEAR API.

    Args:
        model_file_path: a manifest name, a converted model directory, an official checkpoint
            file or ``hf://org/repo``; "" (default) loads ``"atst-frame-base"``.
        device: where the model runs (default CPU; ``"auto"`` for CUDA when available).
        layers: blocks to use (default "all", the official HEAR embedding).
        hop_s: seconds between the overlapping 10 s windows of long audio (default
            ``DEFAULT_HOP_S``: one regular 40 ms grid of timestamps at any length), from one token
            (0.04 s) to one window (10 s); ``None`` for the official 10.01 s chunks.

    Raises:
        ValueError: ``hop_s``, ``layers`` or ``device`` are not usable (checked here, before any
            audio; ``hop_s`` and ``device`` before anything is downloaded).
    """
    from .weights import load

    hop_s = check_hop_s(hop_s)
    atst = load(model_file_path or DEFAULT_MODEL, device=device)
    return HEARModel(atst, layers=layers, hop_s=hop_s).eval()


def _check(audio: torch.Tensor, model: HEARModel) -> torch.Tensor:
    """The audio, checked and padded to the front end's minimum length."""
    if not isinstance(model, HEARModel):
        raise TypeError(f"model must come from atst_features.hear.load_model, got {type(model).__name__}")
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2:
        shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
        raise ValueError(f"audio must be a (n_sounds, n_samples) tensor of 16 kHz sounds, got {shape}")
    return pad_short(audio)


def get_scene_embeddings(audio: torch.Tensor, model: HEARModel) -> torch.Tensor:
    """One embedding per sound.

    Args:
        audio: (n_sounds, n_samples >= 1) float32 tensor, 16 kHz mono, +-1 full scale (sounds under
            513 samples are zero-padded at the end to 513).
        model: from ``load_model``.

    Returns:
        (n_sounds, model.scene_embedding_size) float32 tensor on the model's device.
    """
    audio = _check(audio, model)
    out = model.atst.embed_clip(audio, SAMPLE_RATE, layers=model.layers)  # (n_sounds, size) on CPU
    return out.to(model.atst.device)


def get_timestamp_embeddings(audio: torch.Tensor, model: HEARModel) -> tuple[torch.Tensor, torch.Tensor]:
    """One embedding per 40 ms token, on one regular grid (with the default ``hop_s``).

    Args:
        audio: (n_sounds, n_samples >= 1) float32 tensor, 16 kHz mono, +-1 full scale (sounds under
            513 samples are zero-padded at the end to 513).
        model: from ``load_model``.

    Returns:
        embeddings: (n_sounds, n_timestamps, model.timestamp_embedding_size) float32.
        timestamps: (n_sounds, n_timestamps) float32 milliseconds, the centre of each token:
            15, 55, 95, ... (n_timestamps = mel frames // 4 = (n_samples // 160 + 1) // 4).
        Both on the model's device.
    """
    audio = _check(audio, model)
    frames = model.atst.embed_frames(audio, SAMPLE_RATE, layers=model.layers, hop_s=model.hop_s)
    # A token's mel frames are centred at t_k, t_k + 10, ..., t_k + 30 ms: its centre is their middle.
    centres = (frames.timestamps + token_centre_offset(model.atst.config.patch_w)) * 1000.0  # (T,) float64 ms
    timestamps = centres.float()[None, :].expand(audio.shape[0], -1).contiguous()
    device = model.atst.device
    return frames.embeddings.to(device), timestamps.to(device)
