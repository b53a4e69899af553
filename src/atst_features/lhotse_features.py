"""ATST frame embeddings as a lhotse feature extractor (``pip install 'atst-features[lhotse]'``).

    from atst_features.lhotse_features import ATSTFeatureConfig, ATSTFeatureExtractor
    extractor = ATSTFeatureExtractor(ATSTFeatureConfig(model="atst-frame-base", layers="last"))
    cuts = cuts.compute_and_store_features(extractor, storage_path="feats/")

Importing this module registers the extractor with lhotse under the name ``"atst"`` (so that
manifests and ``FeatureExtractor.from_dict`` / ``from_yaml`` find it). Features are one row per
40 ms token (``frame_shift`` = 0.04 s) on one regular grid (overlapping 10 s windows
``hop_s`` apart, as the HEAR adapter does), ``feature_dim`` = the model's ``frame_dim(layers)``.

Lhotse expects round(samples / (0.04 s * sampling_rate)) frames; the encoder gives mel frames // 4
tokens, up to one fewer. The audio is zero-padded at the end by at most 10 ms (and to the front
end's minimum of 513 samples at 16 kHz) so that the counts agree. The model is loaded on first
use and is not pickled with the extractor (each worker loads its own).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from . import audio, frontend
from .embed import DEFAULT_MODEL, ATSTModel
from .hear import DEFAULT_HOP_S, check_hop_s
from .pooling import token_seconds

try:
    from lhotse.features.base import FeatureExtractor, register_extractor
    from lhotse.utils import compute_num_frames_from_samples
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(f"atst_features.lhotse_features needs lhotse: pip install 'atst-features[lhotse]' ({e})") from e

__all__ = ["ATSTFeatureConfig", "ATSTFeatureExtractor"]


@dataclass
class ATSTFeatureConfig:
    """What ``ATSTFeatureExtractor`` computes (serialised into lhotse manifests).

    Attributes:
        model: what ``atst_features.load`` takes (a manifest name, a converted directory, an
            official checkpoint file or ``hf://org/repo``).
        device: where the encoder runs ("cpu", "cuda", "auto" for CUDA when available).
        layers: blocks to use ("last" by default: D values per frame; "all", an index or a list).
        hop_s: seconds between overlapping 10 s windows (``hear.DEFAULT_HOP_S``); ``None`` for the
            official 10.01 s chunks, which drop one frame per chunk (lhotse's count then fails).
    """

    model: str = DEFAULT_MODEL
    device: str = "cpu"
    layers: Any = "last"
    hop_s: float | None = DEFAULT_HOP_S

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "ATSTFeatureConfig":
        return ATSTFeatureConfig(**data)


@register_extractor
class ATSTFeatureExtractor(FeatureExtractor):
    """ATST frame embeddings: ``extract(samples (C, N) or (N,), sampling_rate)`` -> (T, feature_dim) float32."""

    name = "atst"
    config_type = ATSTFeatureConfig

    def __init__(self, config: ATSTFeatureConfig | None = None, model: ATSTModel | None = None):
        super().__init__(config)
        check_hop_s(self.config.hop_s, model)
        self._model = model

    @property
    def model(self) -> ATSTModel:
        """The encoder, loaded on first use from ``config.model`` onto ``config.device``."""
        if self._model is None:
            from .weights import load

            self._model = load(self.config.model, device=self.config.device)
            check_hop_s(self.config.hop_s, self._model)
        return self._model

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None}  # workers load their own model

    @property
    def device(self) -> str | torch.device:
        return self.config.device

    @property
    def frame_shift(self) -> float:
        return token_seconds(self.model.config.patch_w)

    def feature_dim(self, sampling_rate: int) -> int:
        return self.model.frame_dim(self.config.layers)

    def extract(self, samples: np.ndarray | torch.Tensor, sampling_rate: int) -> np.ndarray:
        """(C, N) or (N,) samples at ``sampling_rate`` Hz (channels averaged) -> (T, feature_dim) float32,
        T = round(N / (frame_shift * sampling_rate)) as lhotse counts frames."""
        x = audio.to_float_waveform(samples)
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        if x.ndim == 2:
            x = x.mean(axis=0, dtype=np.float32)  # (C, N) -> (N,)
        if x.ndim != 1:
            raise ValueError(f"samples must be (channels, samples) or (samples,), got shape {x.shape}")
        n_rows = compute_num_frames_from_samples(x.shape[0], self.frame_shift, sampling_rate)
        if n_rows < 1:
            raise ValueError(
                f"{x.shape[0]} samples at {sampling_rate} Hz are under half a {1000 * self.frame_shift:g} ms frame; "
                "lhotse counts 0 frames for them"
            )
        wav = audio.resample(x, audio.check_sample_rate(sampling_rate))  # (N16,) at 16 kHz
        patch_w = self.model.config.patch_w
        wanted = frontend.HOP_LENGTH * (patch_w * n_rows - 1)  # samples that give n_rows tokens
        wav = audio.pad_short(torch.from_numpy(wav), max(wanted, frontend.MIN_SAMPLES))
        frames = self.model.embed_frames(wav, frontend.SAMPLE_RATE, layers=self.config.layers, hop_s=self.config.hop_s)
        return frames.embeddings[:n_rows].numpy()
