"""The in-memory side of a folder run: ``Embedder`` embeds decoded waveforms with a run's settings."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .. import audio, frontend
from ..chunks import EmbedResult, Engine, Job, Request, run_waveforms
from ..dtypes import STORAGE_DTYPES, resolve_dtype
from ..embed import ATSTModel, Layers, check_batch_size, resolve_layers

WHAT = ("clip", "frames")  # the outputs a run writes by default, in this order
SCORES = "scores"  # the frame-level head's scores (T', classes) instead of embeddings: `detect`


def check_what(what: str | Sequence[str]) -> tuple[str, ...]:
    """``"clip"``, ``"frames"``, ``"clip,frames"``, ``"scores"`` or a sequence of them -> the names in order."""
    items = tuple(w.strip() for w in what.split(",")) if isinstance(what, str) else tuple(what)
    if items == (SCORES,):
        return items
    if not items or any(w not in WHAT for w in items):
        raise ValueError(
            f"what={what!r} is not understood; use 'clip', 'frames', both ('clip,frames'), or 'scores' alone "
            "(a frame-level head's scores)"
        )
    return tuple(w for w in WHAT if w in items)


class Embedder:
    """Embeds decoded 16 kHz waveforms with the settings of a folder run, chunks of many inputs per batch.

    ``embed_folder`` writes exactly what this returns; the Ray Data integration and the benchmarks
    use it directly.

    Args:
        model: a loaded ``ATSTModel`` (its device and dtype are used as they are).
        what: "clip", "frames" or both (a comma-separated string or a sequence).
        clip_layers: blocks of the clip vector ("all" by default, the official embedding).
        frame_layers: blocks of the frame embeddings ("last" by default).
        frames_dtype: storage dtype of frames, "float16" (default) or "float32".
        batch_size: chunks (of up to 10.01 s) per encoder pass.
        hop_s: overlapping windows for the frames (``ATSTModel.embed_frames(hop_s=...)``), or ``None``.

    With ``what="scores"`` the frames are the model's frame-level head's scores of the last block
    (``ATSTModel.tag``), stored as ``scores``.
    """

    def __init__(
        self,
        model: ATSTModel,
        *,
        what: str | Sequence[str] = WHAT,
        clip_layers: Layers = "all",
        frame_layers: Layers = "last",
        frames_dtype: str | torch.dtype = "float16",
        batch_size: int = 16,
        hop_s: float | None = None,
    ):
        check_batch_size(batch_size)
        self.model = model
        self.what = check_what(what)
        self.clip_layers = resolve_layers(clip_layers, model.config.depth)
        self.frame_layers = resolve_layers(frame_layers, model.config.depth)
        self.frames_dtype = resolve_dtype(frames_dtype, STORAGE_DTYPES, "frames_dtype")
        self.batch_size = batch_size
        self.hop_tokens = None if hop_s is None else model._hop_tokens(hop_s)
        self.head = None
        if SCORES in self.what:
            self.head, self.frame_layers = model.frame_head("what='scores'"), [model.config.depth - 1]
        if self.hop_tokens is not None and "clip" in self.what:
            raise ValueError("hop_s gives frame embeddings (or scores) only; leave 'clip' out of what")

    @property
    def request(self) -> Request:
        """What the engine computes for every input."""
        return Request(
            clip_layers=tuple(self.clip_layers) if "clip" in self.what else None,
            frame_layers=tuple(self.frame_layers) if "frames" in self.what or self.head is not None else None,
            frames_dtype=self.frames_dtype,
            hop_tokens=self.hop_tokens,
            frame_head=self.head,
        )

    def engine(self, on_done: Callable[[Job, str | None], None], log: Callable[[str], None] = lambda m: None) -> Engine:
        """An engine with these settings that calls ``on_done(job, error)`` once per item (a folder run drives it)."""
        return Engine(self.model, self.request, self.batch_size, on_done, log)

    def embed(self, waveforms: Sequence[np.ndarray | torch.Tensor]) -> list[EmbedResult]:
        """Embed mono float waveforms at 16 kHz (each (N,), N >= 513 samples, +-1 full scale).

        Returns:
            one ``EmbedResult`` per waveform, in order.

        Raises:
            ValueError / TypeError: a waveform that is not a finite 1-D float or PCM array of at least 513 samples.
            RuntimeError: the encoder failed (e.g. out of GPU memory with a batch of one chunk).
        """
        wavs = [audio.prepare_waveform(w, frontend.SAMPLE_RATE, f"waveform {i}") for i, w in enumerate(waveforms)]
        return run_waveforms(self.model, wavs, self.request, self.batch_size, label="waveform")
