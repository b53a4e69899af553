"""Augmentations and masks, applied to batches of normalised log-mels on the training device.

Every random decision is drawn from a ``numpy.random.Generator`` owned by the trainer (one per
process, saved in checkpoints), so a resumed run draws the same numbers. Tensors are float32
``(B, n_mels, T)`` mels with ``n_frames`` (B,) valid frames each; frames past an item's length are
zero and stay zero.

- ``block_mask``: spans of 5 patches, as fairseq's static ``compute_mask_indices`` draws them.
- ``MixupMemory``: log-mixup-exp with a memory of earlier examples (BYOL-A style, ratio 0.4),
  rebuilt from the data stream on resume.
- ``random_resize_crop``: crop a random region of a (virtually enlarged) mel, resize it back (bicubic).
- ``mix_batch``: label mixup for fine-tuning (lambda ~ Beta(10, 10)).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def block_mask(batch: int, n_tokens: int, ratio: float, span: int, rng: np.random.Generator, min_spans: int = 2) -> torch.Tensor:
    """Masked patches for frame-level pretraining: (B, n_tokens) bool.

    Per item: ``n = max(min_spans, int(ratio * n_tokens / span + u))`` with u ~ U[0, 1); n distinct
    span starts drawn uniformly from 0 .. n_tokens - span - 1; each masks ``span`` consecutive
    patches. Spans may overlap, so the masked fraction is below ``ratio`` (about 0.50 for 250
    tokens, ratio 0.65, span 5), and the last patch is never masked -- both as in the reference.
    """
    if span < 1 or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask span must be >= 1 and ratio in [0, 1], got span {span}, ratio {ratio}")
    candidates = n_tokens - span
    if candidates < 1:
        raise ValueError(f"cannot place mask spans of {span} patches in {n_tokens} tokens; use longer crops")
    n = np.maximum(min_spans, (ratio * n_tokens / span + rng.random(batch)).astype(np.int64))
    n = np.minimum(n, candidates)  # (B,)
    starts = np.argsort(rng.random((batch, candidates)), axis=1)[:, : int(n.max())]  # distinct starts, (B, n_max)
    used = np.arange(starts.shape[1])[None, :] < n[:, None]  # (B, n_max)
    positions = starts[:, :, None] + np.arange(span)[None, None, :]  # (B, n_max, span)
    mask = np.zeros((batch, n_tokens), dtype=bool)
    rows = np.broadcast_to(np.arange(batch)[:, None, None], positions.shape)
    keep = np.broadcast_to(used[:, :, None], positions.shape)
    mask[rows[keep], positions[keep]] = True
    return torch.from_numpy(mask)


def expected_mask_fraction(n_tokens: int, ratio: float, span: int, min_spans: int = 2) -> float:
    """Exact expected masked fraction of ``block_mask`` (averaged over the number of spans).

    Patch t is covered by a span starting in max(0, t-span+1) .. min(t, n_tokens-span-1); with n
    distinct starts out of C = n_tokens - span, P(uncovered) = C(C - k, n) / C(C, n) for k such starts.
    """
    candidates = n_tokens - span
    base = ratio * n_tokens / span
    lo = int(np.floor(base))
    frac_hi = base - lo  # P(n = lo + 1)
    total = 0.0
    for n_raw, p in ((lo, 1.0 - frac_hi), (lo + 1, frac_hi)):
        if p == 0.0:
            continue
        n = min(max(min_spans, n_raw), candidates)
        covered = 0.0
        for t in range(n_tokens):
            k = min(t, candidates - 1) - max(0, t - span + 1) + 1
            k = max(k, 0)
            uncovered = 1.0
            for i in range(n):  # C(C - k, n) / C(C, n) as a product
                uncovered *= max(candidates - k - i, 0) / (candidates - i)
            covered += 1.0 - uncovered
        total += p * covered / n_tokens
    return total


def _valid(n_frames: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
    return torch.arange(width, device=device)[None, :] < n_frames.to(device)[:, None]  # (B, T)


class MixupMemory:
    """Log-mixup-exp with a memory of earlier examples, on normalised log-mels.

    Each item x is mixed with an example z drawn from the memory (examples of earlier batches of
    this process): ``log((1 - lam) * exp(x) + lam * exp(z))`` with lam ~ U[0, ratio). Only the
    frames both have are mixed. The clean batch then enters the memory, a ring of the latest
    ``size`` examples (write number w goes to row w mod size). An empty memory leaves the batch
    unchanged.

    The memory is a function of the data stream, so checkpoints do not store it: ``state_dict``
    is three integers, and a resumed run rebuilds the rows by ``rewind`` + ``remember`` on the
    batches that filled them (``rows_needed`` says how many writes that is).
    """

    def __init__(self, size: int, ratio: float):
        if size < 0 or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"mixup memory size must be >= 0 and ratio in [0, 1], got {size}, {ratio}")
        self.size = size
        self.ratio = ratio
        self.bank: torch.Tensor | None = None  # (size, n_mels, width)
        self.lengths: torch.Tensor | None = None  # (size,) valid frames
        self.writes = 0  # examples remembered so far (ring position = writes % size)
        self.width = 0  # frames per row (the widest batch so far)

    @property
    def count(self) -> int:
        """Filled rows."""
        return min(self.writes, self.size)

    def __call__(self, mel: torch.Tensor, n_frames: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Mix ``mel`` (B, n_mels, T) with remembered examples, then remember the clean ``mel``."""
        out = mel
        if self.count > 0 and self.ratio > 0:
            b, _, t = mel.shape
            pick = torch.from_numpy(rng.integers(0, self.count, size=b)).to(mel.device)
            lam = torch.from_numpy(self.ratio * rng.random(b)).to(mel.device, torch.float32)[:, None, None]
            z = self.bank[pick]  # (B, n_mels, width)
            z = z[:, :, :t] if z.shape[-1] >= t else F.pad(z, (0, t - z.shape[-1]))
            both = torch.minimum(n_frames.to(mel.device), self.lengths[pick])
            mixed = torch.logaddexp(torch.log1p(-lam) + mel, torch.log(lam) + z)  # lam = 0 -> exactly mel
            out = torch.where(_valid(both, t, mel.device)[:, None, :], mixed, mel)
        self.remember(mel, n_frames)
        return out

    def remember(self, mel: torch.Tensor, n_frames: torch.Tensor) -> None:
        """Write the clean batch ``mel`` (B, n_mels, T) into the ring (its last ``size`` items if B > size)."""
        if self.size == 0:
            return
        b, n_mels, t = mel.shape
        if self.bank is None:
            self.bank = mel.new_zeros(self.size, n_mels, max(t, self.width))
            self.lengths = torch.zeros(self.size, dtype=torch.long, device=mel.device)
        elif self.bank.shape[-1] < t:  # a wider batch than any before: widen the memory, keep its content
            self.bank = F.pad(self.bank, (0, t - self.bank.shape[-1]))
        self.width = self.bank.shape[-1]
        n = min(b, self.size)
        rows = ((self.writes + torch.arange(n)) % self.size).to(mel.device)
        self.bank[rows] = F.pad(mel[-n:].detach(), (0, self.width - t))
        self.lengths[rows] = n_frames[-n:].to(mel.device)
        self.writes += n

    def rows_needed(self, writes_per_call: int) -> int:
        """Writes to replay to rebuild every filled row, for calls of ``writes_per_call`` each."""
        per_call = min(writes_per_call, self.size)
        if per_call == 0:
            return 0
        return min(self.writes, -(-self.size // per_call) * per_call)

    def state_dict(self) -> dict:
        """Where the ring stands (no tensors: the rows are rebuilt from the data on resume)."""
        return {"size": self.size, "writes": self.writes, "width": self.width}

    def load_state_dict(self, state: dict) -> None:
        """Take the ring position of ``state``; the rows stay empty until ``rewind`` + ``remember``."""
        if int(state["size"]) != self.size:
            raise ValueError(f"the checkpoint's mixup memory holds {state['size']} examples, this run {self.size}")
        self.writes, self.width = int(state["writes"]), int(state["width"])
        self.bank = self.lengths = None

    def rewind(self, writes: int) -> int:
        """Go back ``writes`` examples with an empty ring, ready to ``remember`` them again in order;
        returns the position to check against afterwards (the current ``writes``)."""
        target = self.writes
        self.writes -= writes
        self.bank = self.lengths = None
        return target


def random_resize_crop(
    mel: torch.Tensor,
    n_frames: torch.Tensor,
    rng: np.random.Generator,
    virtual_scale: tuple[float, float] = (1.0, 1.5),
    freq_scale: tuple[float, float] = (0.6, 1.5),
    time_scale: tuple[float, float] = (0.6, 1.5),
) -> torch.Tensor:
    """BYOL-A random-resize-crop of each item's valid region; same shape out, bicubic, align_corners.

    Per item with F mel bins and T valid frames: the mel sits centred on a zero canvas of
    (F * virtual_scale[0], T * virtual_scale[1]); a region of (F * u_f, T * u_t) with u_f ~
    U(freq_scale), u_t ~ U(time_scale) (clipped to the canvas, at least 1) is taken at a uniform
    random position and resized back to (F, T). ``virtual_scale=(1, 1)`` with ``time_scale=(1, 1)``
    is the frequency-only crop of ATST-Frame.

    Args:
        mel: (B, F, W) float mels, zero past ``n_frames``.
        n_frames: (B,) valid frames per item.
    Returns:
        (B, F, W) float32, zero past ``n_frames``.
    """
    b, n_bins, width = mel.shape
    t = n_frames.cpu().numpy().astype(np.float64)  # (B,)
    canvas_f = np.full(b, int(n_bins * virtual_scale[0]), dtype=np.float64)
    canvas_t = np.floor(t * virtual_scale[1])
    h = np.floor(np.clip(n_bins * rng.uniform(*freq_scale, size=b), 1, canvas_f))
    w = np.floor(np.clip(t * rng.uniform(*time_scale, size=b), 1, canvas_t))
    top = np.floor(rng.random(b) * (canvas_f - h + 1))
    left = np.floor(rng.random(b) * (canvas_t - w + 1))
    # Output pixel y (0..F-1) reads crop row y * (h-1)/(F-1), i.e. mel row top - offset + that.
    row0 = top - np.floor((canvas_f - n_bins) / 2)
    col0 = left - np.floor((canvas_t - t) / 2)
    row_step = (h - 1) / max(n_bins - 1, 1)
    col_step = np.where(t > 1, (w - 1) / np.maximum(t - 1, 1), 0.0)
    dev = mel.device

    def as_t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(dev, torch.float32)

    rows = as_t(row0)[:, None] + as_t(row_step)[:, None] * torch.arange(n_bins, device=dev)[None, :]  # (B, F)
    cols = as_t(col0)[:, None] + as_t(col_step)[:, None] * torch.arange(width, device=dev)[None, :]  # (B, W)
    # grid_sample with align_corners=True: pixel p -> 2 p / (size - 1) - 1.
    gy = 2.0 * rows / max(n_bins - 1, 1) - 1.0
    gx = 2.0 * cols / max(width - 1, 1) - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, F, W, 2)
    out = F.grid_sample(mel.float()[:, None], grid, mode="bicubic", padding_mode="zeros", align_corners=True)[:, 0]
    return out.masked_fill(~_valid(n_frames, width, dev)[:, None, :], 0.0)


def mix_batch(
    mel: torch.Tensor,
    n_frames: torch.Tensor,
    targets: torch.Tensor,
    rng: np.random.Generator,
    prob: float = 0.5,
    alpha: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label mixup for fine-tuning: with probability ``prob`` mix the batch with itself reversed.

    lam ~ Beta(alpha, alpha); mel = lam * mel + (1 - lam) * mel[::-1] (normalised log-mel units),
    targets likewise, n_frames = the longer of the two.

    Returns:
        (mel (B, F, T), n_frames (B,), targets (B, C)).
    """
    if prob <= 0.0 or rng.random() >= prob:
        return mel, n_frames, targets
    lam = float(rng.beta(alpha, alpha))
    mel = lam * mel + (1.0 - lam) * mel.flip(0)
    targets = lam * targets + (1.0 - lam) * targets.flip(0)
    return mel, torch.maximum(n_frames, n_frames.flip(0)), targets
