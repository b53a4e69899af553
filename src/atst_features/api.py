"""The one-liners: ``embed_clip`` / ``embed_frames`` with a model loaded once and cached.

They sit above both the embedding API (``embed``) and the loader (``weights``) they join.
"""

from __future__ import annotations

from functools import lru_cache

from .embed import DEFAULT_MODEL, ATSTModel, AudioInput, Layers
from .weights import load


@lru_cache(maxsize=4)
def _cached_model(source: str, device: str) -> ATSTModel:
    return load(source, device=device)


def _model_for(model: str | ATSTModel, device: str | None) -> ATSTModel:
    if isinstance(model, ATSTModel):
        return model
    return _cached_model(str(model), str(device or "cpu"))


def embed_clip(
    audio: AudioInput | list,
    sample_rate: float | None = None,
    *,
    model: str | ATSTModel = DEFAULT_MODEL,
    device: str | None = None,
    layers: Layers = "all",
    batch_size: int = 16,
):
    """``ATSTModel.embed_clip`` with ``model`` (a name, directory or file, loaded once and cached; default
    ``"atst-frame-base"``) on ``device`` (default CPU). Arguments and returns as ``ATSTModel.embed_clip``."""
    return _model_for(model, device).embed_clip(audio, sample_rate, layers=layers, batch_size=batch_size)


def embed_frames(
    audio: AudioInput | list,
    sample_rate: float | None = None,
    *,
    model: str | ATSTModel = DEFAULT_MODEL,
    device: str | None = None,
    layers: Layers = "all",
    batch_size: int = 16,
    hop_s: float | None = None,
):
    """``ATSTModel.embed_frames`` with ``model`` (a name, directory or file, loaded once and cached; default
    ``"atst-frame-base"``) on ``device`` (default CPU). Arguments and returns as ``ATSTModel.embed_frames``."""
    return _model_for(model, device).embed_frames(
        audio, sample_rate, layers=layers, batch_size=batch_size, hop_s=hop_s
    )
