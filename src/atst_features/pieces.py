"""Samples -> pieces: windows of a waveform, each with the encoder chunks that start in it.

A piece holds the samples that mel frames [first_frame, first_frame + n_frames) are computed
from (``frontend.frame_segment``: the frames' samples plus the STFT context, reflected at the
file's edges) and the chunks (``pooling.Chunk``) to encode from those frames. Whether a waveform
sits in memory or is decoded from a file block by block, it becomes pieces here, so that the
engine (``chunks.Engine``) sees one kind of input and memory is bounded by the window, not by
the audio's length:

- audio of at most one window is one piece whose 80 dB floor comes from its own frames;
- longer audio is read twice: a first pass finds the loudest mel frame (the floor is taken over
  the whole file), a second yields windows of whole chunks with that peak.

The result equals the front end on the whole waveform to float rounding.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from . import frontend, pooling


@dataclass(frozen=True)
class Plan:
    """How an item of a given length is cut into encoder chunks.

    ``frame_plan``: chunks of the frame embeddings (also those an ATST-Frame clip vector is pooled
    from); ``clip_plan``: ATST-Clip's own clip-pooling chunks; ``hop_tokens``: overlapping frame
    windows ``hop_tokens`` tokens apart instead of the official non-overlapping chunks.
    """

    spec_w: int
    patch_w: int
    clip_chunk_frames: int
    frame_plan: bool
    clip_plan: bool
    hop_tokens: int | None = None

    def chunks(self, idx: int, n_mel_frames: int) -> tuple[list[pooling.Chunk], list[pooling.Chunk]]:
        """(frame chunks, clip chunks) of item ``idx`` with ``n_mel_frames`` mel frames."""
        frame: list[pooling.Chunk] = []
        if self.frame_plan and self.hop_tokens is None:
            frame = pooling.frame_chunks(idx, n_mel_frames, self.spec_w, self.patch_w)
        elif self.frame_plan:
            frame = pooling.frame_windows(idx, n_mel_frames, self.spec_w, self.patch_w, self.hop_tokens)
        clip = pooling.clip_chunks(idx, n_mel_frames, self.clip_chunk_frames, self.patch_w) if self.clip_plan else []
        return frame, clip


@dataclass
class SourceInfo:
    """What is known of a decoded item; travels with its first piece."""

    duration: float  # seconds, at the file's own rate
    sample_rate: int  # Hz, the file's own
    channels: int
    n_samples: int  # at 16 kHz, mono
    frame_chunks: list[pooling.Chunk]
    clip_chunks: list[pooling.Chunk]

    @property
    def n_tokens(self) -> int:
        """Frame embeddings (rows) of the item."""
        return sum(c.n_kept for c in self.frame_chunks)


@dataclass
class Piece:
    """A window of a decoded item: samples for mel frames [first_frame, first_frame + n_frames)."""

    idx: int
    segment: torch.Tensor  # (HOP_LENGTH * (n_frames - 1) + N_FFT,) float32, 16 kHz
    first_frame: int
    n_frames: int
    peak_db: float | None  # the whole item's loudest dB; None when the piece is the whole item
    chunks: list[tuple[str, pooling.Chunk]]  # ("frame" | "clip", chunk) encoded from this piece
    info: SourceInfo | None = None  # on the item's first piece


def windows(
    frame_chunks: list[pooling.Chunk], clip_chunks: list[pooling.Chunk], window_frames: int
) -> list[tuple[int, int, list[tuple[str, pooling.Chunk]]]]:
    """Group chunks into windows by start frame: [(first frame, frames, chunks)], in order.

    Window w holds the chunks starting in [w * window_frames, (w + 1) * window_frames) and
    spans their frames (a chunk may reach past the window's end).
    """
    groups: dict[int, list[tuple[str, pooling.Chunk]]] = defaultdict(list)
    for kind, chunks in (("frame", frame_chunks), ("clip", clip_chunks)):
        for c in chunks:
            groups[c.start // window_frames].append((kind, c))
    out = []
    for w in sorted(groups):
        first = min(c.start for _, c in groups[w])
        end = max(c.start + c.frames for _, c in groups[w])
        out.append((first, end - first, groups[w]))
    return out


class SampleBuffer:
    """Consecutive 16 kHz samples of a stream, from global position ``start``."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self.start = 0
        self.end = 0

    def append(self, block: np.ndarray) -> None:
        self.blocks.append(block)
        self.end += block.shape[0]

    def take(self, idx: np.ndarray) -> np.ndarray:
        if len(self.blocks) > 1:
            self.blocks = [np.concatenate(self.blocks)]
        if idx.size and (idx.min() < self.start or idx.max() >= self.end):
            raise RuntimeError(f"samples {idx.min()}..{idx.max()} are not buffered ({self.start}..{self.end})")
        return self.blocks[0][idx - self.start]

    def discard_before(self, pos: int) -> None:
        k = min(max(0, pos - self.start), self.end - self.start)
        if k:
            data = np.concatenate(self.blocks) if len(self.blocks) > 1 else self.blocks[0]
            self.blocks = [data[k:]]
            self.start += k


Blocks = Callable[[], Iterator[np.ndarray]]  # a stream of (n,) float32 16 kHz blocks that can be read again


def stream_peak(blocks: Blocks, window_frames: int, device: torch.device | None = None) -> tuple[int, float]:
    """First pass over a stream: (samples at 16 kHz, loudest mel-frame dB), one window at a time."""
    buf, peak, next_frame = SampleBuffer(), -math.inf, 0

    def window_peak(seg: np.ndarray) -> float:
        return float(frontend.mel_db(torch.from_numpy(seg)[None].to(device or "cpu")).max())

    for block in blocks():
        buf.append(block)
        while buf.end >= frontend.sample_range(next_frame, window_frames)[1]:  # the window is inside the stream
            peak = max(peak, window_peak(buf.take(frontend.reflect_indices(*frontend.sample_range(next_frame, window_frames), None))))
            next_frame += window_frames
            buf.discard_before(frontend.sample_range(next_frame, 1)[0])
    n_samples = buf.end
    if n_samples < frontend.MIN_SAMPLES:
        return n_samples, peak
    n_mel = frontend.num_frames(n_samples)
    while next_frame < n_mel:  # the tail, reflected at the stream's end
        n = min(window_frames, n_mel - next_frame)
        peak = max(peak, window_peak(buf.take(frontend.reflect_indices(*frontend.sample_range(next_frame, n), n_samples))))
        next_frame += n
    return n_samples, peak


def whole_piece(idx: int, wav: torch.Tensor, plan: Plan, info: dict) -> Piece:
    """A (N,) 16 kHz waveform as the single piece of its item; ``info``: duration, sample_rate, channels."""
    n_samples = wav.shape[0]
    n_mel = frontend.num_frames(n_samples)
    frame_chunks, clip_chunks = plan.chunks(idx, n_mel)
    chunks = [("frame", c) for c in frame_chunks] + [("clip", c) for c in clip_chunks]
    source = SourceInfo(n_samples=n_samples, frame_chunks=frame_chunks, clip_chunks=clip_chunks, **info)
    return Piece(idx, frontend.frame_segment(wav, 0, n_mel), 0, n_mel, None, chunks, source)


def streamed_pieces(
    idx: int, blocks: Blocks, plan: Plan, info: dict, window_frames: int, device: torch.device | None = None, what: str = "the audio"
) -> Iterator[Piece]:
    """A stream as windows of whole chunks (two passes, bounded memory); ``what`` names it in errors."""
    n_samples, peak = stream_peak(blocks, window_frames, device)
    if n_samples < frontend.MIN_SAMPLES:
        raise ValueError(f"{what} holds {n_samples} samples at 16 kHz; at least {frontend.MIN_SAMPLES} are needed")
    frame_chunks, clip_chunks = plan.chunks(idx, frontend.num_frames(n_samples))
    source = SourceInfo(n_samples=n_samples, frame_chunks=frame_chunks, clip_chunks=clip_chunks, **info)
    groups = windows(frame_chunks, clip_chunks, window_frames)
    stream, buf = blocks(), SampleBuffer()
    for w, (first, n, chunks) in enumerate(groups):
        idxs = frontend.reflect_indices(*frontend.sample_range(first, n), n_samples)
        while buf.end <= idxs.max():
            block = next(stream, None)
            if block is None:
                raise ValueError(f"{what} changed while it was read (fewer samples on the second pass)")
            buf.append(block)
        yield Piece(idx, torch.from_numpy(buf.take(idxs)), first, n, peak, chunks, source if w == 0 else None)
        if w + 1 < len(groups):
            buf.discard_before(frontend.sample_range(groups[w + 1][0], 1)[0])


def waveform_pieces(idx: int, wav: torch.Tensor, plan: Plan, info: dict, window_frames: int) -> Iterator[Piece]:
    """A (N,) 16 kHz CPU waveform in memory as pieces of at most ``window_frames`` mel frames (plus
    the chunks that reach past a window's end): one piece when it fits, else two passes."""
    if frontend.num_frames(wav.shape[0]) <= window_frames:
        yield whole_piece(idx, wav, plan, info)
        return
    array = wav.numpy()
    yield from streamed_pieces(idx, lambda: iter([array]), plan, info, window_frames)
