"""Decoding in ``torch.utils.data.DataLoader`` workers: files -> pieces (``pieces.Piece``) in groups.

A file of at most ``stream_seconds`` is decoded whole (``audio.load_audio``) and becomes one
piece; a longer one is decoded in blocks (``audio.stream_blocks``), twice, and becomes windows of
whole chunks (``pieces.streamed_pieces``), so memory stays bounded. A file that cannot be decoded
becomes a ``Failure`` carrying its error; a worker never raises for a bad file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .. import audio, frontend, pieces
from ..pieces import Piece, Plan

GROUP_FILES = 8  # decoded files a worker sends at once (one transfer, one copy to the device)
GROUP_SAMPLES = 1 << 22  # ... or fewer, when their samples reach this


@dataclass
class Failure:
    """Input ``idx`` could not be decoded, for the reason ``error``."""

    idx: int
    error: str


def decode_file(idx: int, path: Path, plan: Plan, stream_seconds: float, window_frames: int) -> Iterator[Piece | Failure]:
    """One file -> its pieces (windows of at most ``window_frames`` mel frames when it is longer
    than ``stream_seconds``), or a ``Failure`` carrying the error (never raises)."""
    try:
        header = audio.audio_info(path)
        info = {"duration": header.duration, "sample_rate": header.sample_rate, "channels": header.channels}
        if header.duration <= stream_seconds:
            wav = audio.prepare_waveform(audio.load_audio(path), frontend.SAMPLE_RATE, str(path))
            yield pieces.whole_piece(idx, wav, plan, info)
        else:
            blocks = partial(audio.stream_blocks, path)  # read twice: the peak, then the windows
            yield from pieces.streamed_pieces(idx, blocks, plan, info, window_frames, what=repr(str(path)))
    except (ValueError, TypeError, FileNotFoundError) as e:  # messages that say what was wrong
        yield Failure(idx, str(e))
    except Exception as e:
        yield Failure(idx, f"{type(e).__name__}: {e}")


@dataclass
class Group:
    """What a worker sends: pieces and failures of a few files, in order, with the pieces' samples
    back to back in one tensor (one transfer between processes, one pinned copy to the device)."""

    samples: torch.Tensor  # (S,) float32, 16 kHz
    spans: list[tuple[int, int]]  # (offset, length) of each piece's segment in ``samples``
    items: list[Piece | Failure]  # pieces' segments are detached while in transit

    @classmethod
    def pack(cls, items: list[Piece | Failure]) -> Group:
        """Move the pieces' segments into one tensor (the pieces keep ``segment=None``)."""
        found = [x for x in items if isinstance(x, Piece)]
        lengths = [p.segment.shape[0] for p in found]
        offsets = np.cumsum([0, *lengths[:-1]]).tolist()
        samples = torch.from_numpy(np.concatenate([p.segment.numpy() for p in found] or [np.zeros(0, np.float32)]))
        for p in found:
            p.segment = None
        return cls(samples, list(zip(offsets, lengths)), items)

    def pin_memory(self) -> Group:
        """Called by the DataLoader (``pin_memory=True``) in its pinning thread."""
        self.samples = self.samples.pin_memory()
        return self

    def unpack(self, device: torch.device) -> list[Piece | Failure]:
        """The items; each piece's segment a view of the samples moved to ``device`` (non-blocking from pinned memory)."""
        samples = self.samples.to(device, non_blocking=True)
        spans = iter(self.spans)
        for item in self.items:
            if isinstance(item, Piece):
                offset, length = next(spans)
                item.segment = samples[offset : offset + length]
        return self.items


class DecodeDataset(torch.utils.data.IterableDataset):
    """Decodes files into groups of pieces; worker k of W takes files k, k + W, ... (sorted by size).

    Args:
        files: (input index, path) per file, in the order to decode them.
        plan, stream_seconds, window_frames: as ``decode_file``.
    """

    def __init__(self, files: list[tuple[int, Path]], plan: Plan, stream_seconds: float, window_frames: int):
        self.files, self.plan = files, plan
        self.stream_seconds, self.window_frames = stream_seconds, window_frames

    def __iter__(self) -> Iterator[Group]:
        worker = torch.utils.data.get_worker_info()
        k, n = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        items: list[Piece | Failure] = []
        files = samples = 0
        for idx, path in self.files[k::n]:
            files += 1
            for item in decode_file(idx, path, self.plan, self.stream_seconds, self.window_frames):
                items.append(item)
                samples += item.segment.shape[0] if isinstance(item, Piece) else 0
                if samples >= GROUP_SAMPLES:  # a long file's windows go one by one
                    yield Group.pack(items)
                    items, files, samples = [], 0, 0
            if files >= GROUP_FILES:
                yield Group.pack(items)
                items, files, samples = [], 0, 0
        if items:
            yield Group.pack(items)
