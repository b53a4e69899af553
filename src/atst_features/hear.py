"""The HEAR 2021 API (https://hearbenchmark.com/hear-api.html) over an ATST model.

    from atst_features import hear
    model = hear.load_model("atst-frame-base")          # a name, directory or checkpoint file
    scene = hear.get_scene_embeddings(audio, model)    # (n_sounds, scene_embedding_size)
    emb, ts = hear.get_timestamp_embeddings(audio, model)  # (n_sounds, T, timestamp_embedding_size), (n_sounds, T) ms

``audio`` is a float32 tensor (n_sounds, n_samples) of equal-length 16 kHz mono sounds.
Embeddings are those of ``ATSTModel.embed_clip`` / ``embed_frames`` with every block
(``layers="all"``, the official choice): scene 12 * D for ATST-Frame (2 * 12 * D for ATST-Clip),
timestamp 12 * D. The declared sizes are the real output sizes (the official module declares a
scene size twice too large). Timestamps are the centre of each 40 ms token in milliseconds:
the middle of its 4 mel-frame centres, t_k + 15 ms with t_k the token's start as in
``embed_frames``. Outputs are on the model's device (``model.to(device)`` moves it, as the HEAR
harness does).
"""

from __future__ import annotations

import torch
from torch import nn

from .embed import DEFAULT_MODEL, ATSTModel, Layers
from .frontend import SAMPLE_RATE
from .pooling import token_centre_offset

__all__ = ["HEARModel", "get_scene_embeddings", "get_timestamp_embeddings", "load_model"]


class HEARModel(nn.Module):
    """An ATST encoder with the attributes the HEAR API requires.

    Attributes:
        sample_rate: 16000 (Hz).
        scene_embedding_size: length of a ``get_scene_embeddings`` row.
        timestamp_embedding_size: length of a ``get_timestamp_embeddings`` frame.
        atst: the wrapped ``ATSTModel`` (its encoder is this module's submodule, so ``.to()`` moves it).
        layers: the blocks used; hop_s: ``embed_frames`` long-audio option (``None`` = official chunks).
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, atst: ATSTModel, layers: Layers = "all", hop_s: float | None = None):
        super().__init__()
        self.atst = atst
        self.encoder = atst.encoder  # registered so that .to(), .cuda() and state_dict() see it
        self.layers = layers
        self.hop_s = hop_s
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
    hop_s: float | None = None,
) -> HEARModel:
    """Load an ATST model for the HEAR API.

    Args:
        model_file_path: a manifest name, a converted model directory, an official checkpoint
            file or ``hf://org/repo``; "" (default) loads ``"atst-frame-base"``.
        device: where the model runs (default CPU; never picked for you).
        layers: blocks to use (default "all", the official HEAR embedding).
        hop_s: ``None`` (default) for the official 10.01 s chunks of long audio, or a hop in
            seconds for overlapping windows on one 40 ms grid (see ``ATSTModel.embed_frames``).
    """
    from .weights import load

    atst = load(model_file_path or DEFAULT_MODEL, device=device)
    return HEARModel(atst, layers=layers, hop_s=hop_s).eval()


def _check(audio: torch.Tensor, model: HEARModel) -> None:
    if not isinstance(model, HEARModel):
        raise TypeError(f"model must come from atst_features.hear.load_model, got {type(model).__name__}")
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2:
        shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
        raise ValueError(f"audio must be a (n_sounds, n_samples) tensor of 16 kHz sounds, got {shape}")


def get_scene_embeddings(audio: torch.Tensor, model: HEARModel) -> torch.Tensor:
    """One embedding per sound.

    Args:
        audio: (n_sounds, n_samples) float32 tensor, 16 kHz mono, +-1 full scale.
        model: from ``load_model``.

    Returns:
        (n_sounds, model.scene_embedding_size) float32 tensor on the model's device.
    """
    _check(audio, model)
    out = model.atst.embed_clip(audio, SAMPLE_RATE, layers=model.layers)  # (n_sounds, size) on CPU
    return out.to(model.atst.device)


def get_timestamp_embeddings(audio: torch.Tensor, model: HEARModel) -> tuple[torch.Tensor, torch.Tensor]:
    """One embedding per 40 ms token.

    Args:
        audio: (n_sounds, n_samples) float32 tensor, 16 kHz mono, +-1 full scale.
        model: from ``load_model``.

    Returns:
        embeddings: (n_sounds, n_timestamps, model.timestamp_embedding_size) float32.
        timestamps: (n_sounds, n_timestamps) float32 milliseconds, the centre of each token.
        Both on the model's device.
    """
    _check(audio, model)
    frames = model.atst.embed_frames(audio, SAMPLE_RATE, layers=model.layers, hop_s=model.hop_s)
    # A token's mel frames are centred at t_k, t_k + 10, ..., t_k + 30 ms: its centre is their middle.
    centres = (frames.timestamps + token_centre_offset(model.atst.config.patch_w)) * 1000.0  # (T,) float64 ms
    timestamps = centres.float()[None, :].expand(audio.shape[0], -1).contiguous()
    device = model.atst.device
    return frames.embeddings.to(device), timestamps.to(device)
