"""Official chunking and pooling rules, as pure functions on frame counts and block outputs.

Units: mel frames (10 ms each) for lengths, tokens (4 frames = 40 ms) for the encoder's outputs.

ATST-Frame (``frame_chunks`` + ``frame_clip_vector``): the mel is cut into chunks of 1001 frames
(10.01 s, the positional table's length), each encoded alone; a chunk gives floor(frames / 4)
tokens, so one frame per full chunk is dropped. The clip vector is, per block, the sum of the
chunk's normed tokens divided by (tokens + 1e-6), then the plain mean over chunks.

ATST-Clip (``clip_chunks`` + ``clip_clip_vector``): chunks of 601 frames (6.01 s) starting at
0, 601, ...; chunk j "remains" r_j = L - 601 j frames. Chunk 0 always counts; a later chunk counts
only when r_j > 300. Per block: the normed [CLS] output, and the sum of the normed patch tokens
divided by (floor(r_j / 4) + 1e-6) -- for every chunk but the last this divisor is larger than
the chunk's own token count (an official quirk, reproduced) -- each averaged over counted chunks.
Output: [cls of every block | avg of every block].

One deliberate deviation from the official code: a chunk with no token (a tail of 1-3 mel
frames) is skipped, where the official ATST-Frame code averages a zero vector into the clip vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .frontend import HOP_LENGTH, SAMPLE_RATE

POOL_EPS = 1e-6  # added to every pooling divisor, as the official code does


@dataclass(frozen=True)
class Chunk:
    """One encoder pass over frames [start, start + frames) of item ``item``.

    ``divisor_tokens`` is the token count the pooled average divides by (the official quirk for
    ATST-Clip; the chunk's own token count otherwise).
    """

    item: int
    index: int
    start: int
    frames: int
    tokens: int
    divisor_tokens: int


def frame_chunks(item: int, n_frames: int, chunk_frames: int, patch_w: int) -> list[Chunk]:
    """ATST-Frame chunks of an item of ``n_frames`` mel frames; chunks without a token are skipped."""
    out = []
    for index, start in enumerate(range(0, n_frames, chunk_frames)):
        frames = min(chunk_frames, n_frames - start)
        tokens = frames // patch_w
        if tokens > 0:
            out.append(Chunk(item, index, start, frames, tokens, tokens))
    return out


def clip_chunks(item: int, n_frames: int, chunk_frames: int, patch_w: int) -> list[Chunk]:
    """The counted ATST-Clip chunks of an item of ``n_frames`` mel frames (see module docstring)."""
    out = []
    for index in range(n_frames // chunk_frames + 1):
        start = index * chunk_frames
        remaining = n_frames - start
        counted = remaining > 0 if index == 0 else remaining > chunk_frames // 2
        if counted:
            frames = min(chunk_frames, remaining)
            out.append(Chunk(item, index, start, frames, frames // patch_w, remaining // patch_w))
    return out


def token_times(chunks: list[Chunk], patch_w: int) -> torch.Tensor:
    """(T',) float64 seconds: the start of each token of ``chunks`` in order, i.e. the centre of the
    first of its mel frames (token k of a chunk starting at frame s: frame s + patch_w * k)."""
    frames = [c.start + patch_w * torch.arange(c.tokens, dtype=torch.float64) for c in chunks]
    return (torch.cat(frames) if frames else torch.zeros(0, dtype=torch.float64)) * HOP_LENGTH / SAMPLE_RATE


def token_mean(token_sum: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """The official per-chunk average: sum of normed tokens / (divisor tokens + 1e-6); (L, D) in, (L, D) out."""
    return token_sum / (chunk.divisor_tokens + POOL_EPS)


def frame_clip_vector(token_sums: list[torch.Tensor], chunks: list[Chunk]) -> torch.Tensor:
    """ATST-Frame clip vector from per-chunk token sums (each (L, D)): (L * D,), blocks in order."""
    means = torch.stack([token_mean(s, c) for s, c in zip(token_sums, chunks)])  # (C, L, D)
    return means.mean(dim=0).flatten()


def clip_clip_vector(cls: list[torch.Tensor], token_sums: list[torch.Tensor], chunks: list[Chunk]) -> torch.Tensor:
    """ATST-Clip clip vector from per-chunk [CLS] outputs and token sums (each (L, D)): (2 * L * D,)."""
    cls_mean = torch.stack(cls).mean(dim=0)  # (L, D)
    avg_mean = torch.stack([token_mean(s, c) for s, c in zip(token_sums, chunks)]).mean(dim=0)  # (L, D)
    return torch.cat([cls_mean.flatten(), avg_mean.flatten()])


# ---------------------------------------------------------------------------- overlapping frame windows
# Not an official rule: an option of ``embed_frames(hop_s=...)`` for long audio. Windows of the
# encoder's full length (250 tokens) start every ``hop_tokens`` tokens on one token grid (token j
# = mel frames 4j..4j+3 of the whole clip), the last one aligned to the clip's end; each token is
# then taken from the window where it lies farthest from a cut (a window edge inside the clip).


def frame_windows(item: int, n_frames: int, window_frames: int, patch_w: int, hop_tokens: int) -> list[Chunk]:
    """Overlapping ATST-Frame windows of an item of ``n_frames`` mel frames, ``hop_tokens`` tokens apart.

    A clip of at most one window (``window_frames // patch_w`` tokens) gets the single chunk
    ``frame_chunks`` gives it, so the result equals the default chunking there.
    """
    n_tokens, window = n_frames // patch_w, window_frames // patch_w
    if n_tokens <= window:
        return [Chunk(item, 0, 0, min(n_frames, window_frames), n_tokens, n_tokens)]
    starts = list(range(0, n_tokens - window, hop_tokens)) + [n_tokens - window]  # in tokens
    return [Chunk(item, k, s * patch_w, window * patch_w, window, window) for k, s in enumerate(starts)]


def central_window(windows: list[Chunk], n_tokens: int, patch_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the clip's ``n_tokens`` tokens: the window it is taken from and its index there.

    The chosen window is the one where the token is farthest from a cut (a window edge that is
    not the clip's start or end); ties go to the earlier window. Returns two (n_tokens,) int64 tensors.
    """
    j = torch.arange(n_tokens)[:, None]  # (T, 1)
    start = torch.tensor([w.start // patch_w for w in windows])[None, :]  # (1, K) in tokens
    stop = start + torch.tensor([w.tokens for w in windows])[None, :]
    inside = (j >= start) & (j < stop)  # (T, K)
    big = n_tokens + 1  # a clip edge is no cut
    left = torch.where(start > 0, j - start, big)
    right = torch.where(stop < n_tokens, stop - 1 - j, big)
    margin = torch.where(inside, torch.minimum(left, right), -1)  # (T, K)
    which = margin.argmax(dim=1)  # first maximum: the earlier window on ties
    return which, j[:, 0] - start[0, which]
