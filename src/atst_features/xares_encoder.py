"""An ATST encoder with the X-ARES audio-encoder contract (the ``xares`` benchmark's ``check_audio_encoder``).

    from atst_features.xares_encoder import ATSTXaresEncoder
    encoder = ATSTXaresEncoder("atst-frame-base")      # a name, directory, checkpoint file or ATSTModel
    frames = encoder(audio)                             # (B, N) 16 kHz -> (B, T, output_dim)

X-ARES asks of an encoder: a ``torch.nn.Module`` whose class name ends in "Encoder", with
``sampling_rate`` (Hz), ``output_dim`` and ``hop_size_in_ms`` attributes, and ``forward(audio)``
taking a (B, N) batch of mono waveforms at ``sampling_rate`` (clips of up to 10 minutes,
zero-padded to one length) and returning (B, T, output_dim). Here T = mel frames // 4 tokens on
one regular 40 ms grid (overlapping 10 s windows ``hop_s`` apart, as the HEAR adapter does), so
``hop_size_in_ms`` is exact at any length.

This module needs nothing beyond the core install; the ``xares`` package itself is not a
dependency (it requires torchaudio).
"""

from __future__ import annotations

import torch
from torch import nn

from .audio import pad_short
from .embed import DEFAULT_MODEL, ATSTModel, Layers
from .frontend import SAMPLE_RATE
from .hear import DEFAULT_HOP_S, check_hop_s
from .pooling import token_seconds

__all__ = ["ATSTXaresEncoder"]


class ATSTXaresEncoder(nn.Module):
    """ATST frame embeddings as an X-ARES encoder.

    Args:
        model: a loaded ``ATSTModel``, or what ``atst_features.load`` takes (a manifest name, a
            converted directory, an official checkpoint file or ``hf://org/repo``).
        device: where a model loaded here runs (default CPU; ``"auto"`` for CUDA when available).
        layers: blocks to use (default ``"last"``: D values per frame, 768 for a base model;
            ``"all"`` gives 12 * D, which X-ARES stores for every frame of every clip).
        hop_s: seconds between the overlapping windows of audio longer than 10 s (default
            ``hear.DEFAULT_HOP_S``); ``None`` for the official 10.01 s chunks, whose seams drop
            one frame per chunk.

    Attributes:
        sampling_rate: 16000 (Hz). hop_size_in_ms: 40.0. output_dim: ``model.frame_dim(layers)``.
        atst: the wrapped ``ATSTModel`` (its encoder is a submodule, so ``.to()`` moves it).
    """

    sampling_rate = SAMPLE_RATE

    def __init__(
        self,
        model: ATSTModel | str = DEFAULT_MODEL,
        *,
        device: str | torch.device = "cpu",
        layers: Layers = "last",
        hop_s: float | None = DEFAULT_HOP_S,
    ):
        super().__init__()
        hop_s = check_hop_s(hop_s)
        if not isinstance(model, ATSTModel):
            from .weights import load

            model = load(model, device=device)
        self.atst = model
        self.encoder = model.encoder  # registered so that .to(), .cuda() and state_dict() see it
        self.layers = layers
        self.hop_s = check_hop_s(hop_s, model)
        self.output_dim = model.frame_dim(layers)
        self.hop_size_in_ms = 1000.0 * token_seconds(model.config.patch_w)
        self.eval()

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, N) float 16 kHz mono, +-1 full scale (or (N,) for one clip) -> (B, T, output_dim)
        float32 on the audio's device, T = (max(N, 513) // 160 + 1) // 4. Clips shorter than 513
        samples are zero-padded at the end to 513 (one frame)."""
        if not isinstance(audio, torch.Tensor) or audio.dim() not in (1, 2):
            shape = tuple(audio.shape) if hasattr(audio, "shape") else type(audio).__name__
            raise ValueError(f"audio must be a (batch, samples) tensor of {SAMPLE_RATE} Hz clips, got {shape}")
        batch = pad_short(audio if audio.dim() == 2 else audio[None])
        frames = self.atst.embed_frames(batch, SAMPLE_RATE, layers=self.layers, hop_s=self.hop_s)
        return frames.embeddings.to(audio.device)  # (B, T, output_dim)
