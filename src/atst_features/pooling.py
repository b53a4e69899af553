"""Official chunking and pooling rules, as pure functions on frame counts and block outputs.

Units: mel frames (10 ms each) for lengths, tokens (4 frames = 40 ms) for the encoder's outputs.

ATST-Frame (``frame_chunks`` + ``pool_clip_vectors``): the mel is cut into chunks of 1001 frames
(10.01 s, the positional table's length), each encoded alone; a chunk gives floor(frames / 4)
tokens, so one frame per full chunk is dropped. The clip vector is, per block, the sum of the
chunk's normed tokens divided by (tokens + 1e-6), then the plain mean over chunks.

ATST-Clip (``clip_chunks`` + ``pool_clip_vectors``): chunks of 601 frames (6.01 s) starting at
0, 601, ...; chunk j "remains" r_j = L - 601 j frames. Chunk 0 always counts; a later chunk counts
only when r_j > 300. Per block: the normed [CLS] output, and the sum of the normed patch tokens
divided by (floor(r_j / 4) + 1e-6) -- for every chunk but the last this divisor is larger than
the chunk's own token count (an official quirk, reproduced) -- each averaged over counted chunks.
Output: [cls of every block | avg of every block].

One deliberate deviation from the official code: a chunk with no token (a tail of 1-3 mel
frames) is skipped, where the official ATST-Frame code averages a zero vector into the clip vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .frontend import FRAMES_PER_S

POOL_EPS = 1e-6  # added to every pooling divisor, as the official code does


# ---------------------------------------------------------------------------- token geometry
# Derived here once: a token is ``patch_w`` mel frames, a mel frame 1 / FRAMES_PER_S seconds.


def token_seconds(patch_w: int) -> float:
    """Duration of one token in seconds (0.04 s for the released models' 4 frames)."""
    return patch_w / FRAMES_PER_S


def token_centre_offset(patch_w: int) -> float:
    """Seconds from a token's start (its first mel-frame centre) to its centre, the middle of its
    ``patch_w`` mel-frame centres: 15 ms for 4 frames."""
    return (patch_w - 1) / FRAMES_PER_S / 2


@dataclass(frozen=True)
class Chunk:
    """One encoder pass over frames [start, start + frames) of item ``item``.

    ``divisor_tokens`` is the token count the pooled average divides by (the official quirk for
    ATST-Clip; the chunk's own token count otherwise). ``keep`` is the range [lo, hi) of the
    chunk's tokens that are frame embeddings of the item (all of them, except for overlapping
    windows, where each token is kept from one window only).
    """

    item: int
    index: int
    start: int
    frames: int
    tokens: int
    divisor_tokens: int
    keep: tuple[int, int] | None = None

    @property
    def kept(self) -> tuple[int, int]:
        """[lo, hi) of the tokens kept as frame embeddings."""
        return self.keep if self.keep is not None else (0, self.tokens)

    @property
    def n_kept(self) -> int:
        lo, hi = self.kept
        return hi - lo


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
    """(T',) float64 seconds: the start of each kept token of ``chunks`` in order, i.e. the centre
    of the first of its mel frames (token k of a chunk starting at frame s: frame s + patch_w * k)."""
    frames = [c.start + patch_w * torch.arange(*c.kept, dtype=torch.float64) for c in chunks]
    return (torch.cat(frames) if frames else torch.zeros(0, dtype=torch.float64)) / FRAMES_PER_S


# ---------------------------------------------------------------------------- official pooling


def masked_token_sum(tokens: torch.Tensor, n_tokens: Sequence[int]) -> torch.Tensor:
    """Sum of each chunk's valid tokens in float32: tokens (C, L, P, D), n_tokens (C,) -> (C, L, D).

    Sums in place of a mask, so no (C, L, P, D) temporary is made."""
    counts = [int(n) for n in n_tokens]
    if all(n == tokens.shape[2] for n in counts):
        return tokens.sum(dim=2, dtype=torch.float32)
    return torch.stack([tokens[j, :, :n].sum(dim=1, dtype=torch.float32) for j, n in enumerate(counts)])


def pool_clip_vectors(
    chunks: list[Chunk], token_sums: torch.Tensor, cls: torch.Tensor | None = None, items: list[int] | None = None
) -> torch.Tensor:
    """The official clip vectors of items from their chunks' outputs; works with and without gradients.

    Args:
        chunks: the counted chunks (``frame_chunks`` or ``clip_chunks``), any items, any order.
        token_sums: (C, L, D) sum of each chunk's normed patch tokens (``masked_token_sum``).
        cls: (C, L, D) each chunk's normed [CLS] output (ATST-Clip), or ``None`` (ATST-Frame).
        items: the items to pool, in output order (default 0 .. the largest ``chunk.item``).

    Returns:
        (len(items), L * D) for ATST-Frame, (len(items), 2 * L * D) = [cls of each block | avg of each
        block] for ATST-Clip: per block the mean over an item's chunks of sum / (divisor + 1e-6)
        (and of the [CLS] outputs), blocks in order.
    """
    device = token_sums.device
    items = list(range(max(c.item for c in chunks) + 1)) if items is None else items
    row = {item: r for r, item in enumerate(items)}
    n_items = len(items)
    items = torch.tensor([row[c.item] for c in chunks], device=device)
    divisor = torch.tensor([c.divisor_tokens + POOL_EPS for c in chunks], dtype=torch.float32, device=device)
    count = torch.bincount(items, minlength=n_items).clamp(min=1).to(torch.float32)[:, None, None]  # (n_items, 1, 1)
    avg = token_sums.float() / divisor[:, None, None]  # (C, L, D): the official per-chunk average
    shape = (n_items, *token_sums.shape[1:])
    pooled = token_sums.new_zeros(shape, dtype=torch.float32).index_add(0, items, avg) / count  # (n_items, L, D)
    if cls is None:
        return pooled.flatten(1)
    cls_mean = cls.new_zeros(shape, dtype=torch.float32).index_add(0, items, cls.float()) / count
    return torch.cat([cls_mean.flatten(1), pooled.flatten(1)], dim=1)


# ---------------------------------------------------------------------------- overlapping frame windows
# Not an official rule: an option of ``embed_frames(hop_s=...)`` for long audio. Windows of the
# encoder's full length (250 tokens) start every ``hop_tokens`` tokens on one token grid (token j
# = mel frames 4j..4j+3 of the whole clip), the last one aligned to the clip's end; each token is
# then taken from the window where it lies farthest from a cut (a window edge inside the clip).


def frame_windows(item: int, n_frames: int, window_frames: int, patch_w: int, hop_tokens: int) -> list[Chunk]:
    """Overlapping ATST-Frame windows of an item of ``n_frames`` mel frames, ``hop_tokens`` tokens apart.

    Each window keeps (``Chunk.keep``) the tokens for which it is the central window
    (``central_window``); windows that keep none are dropped. A clip of at most one window
    (``window_frames // patch_w`` tokens) gets the single chunk ``frame_chunks`` gives it, so the
    result equals the default chunking there.
    """
    n_tokens, window = n_frames // patch_w, window_frames // patch_w
    if n_tokens <= window:
        return [Chunk(item, 0, 0, min(n_frames, window_frames), n_tokens, n_tokens)]
    starts = list(range(0, n_tokens - window, hop_tokens)) + [n_tokens - window]  # in tokens
    windows = [Chunk(item, k, s * patch_w, window * patch_w, window, window) for k, s in enumerate(starts)]
    which, offset = central_window(windows, n_tokens, patch_w)
    out = []
    for k, w in enumerate(windows):
        kept = offset[which == k]
        if kept.numel():
            lo, hi = int(kept.min()), int(kept.max()) + 1
            if hi - lo != kept.numel():  # central windows are monotone in time, so each keeps a run
                raise AssertionError("a window keeps tokens that are not contiguous")
            out.append(replace(w, keep=(lo, hi)))
    return out


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
