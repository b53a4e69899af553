"""Where chunks meet the encoder: one differentiable pass and one no-grad engine.

- ``encode_chunks`` packs chunks of log-mel into one padded batch and runs the encoder with a
  padding mask only when some chunk is shorter than the widest (so unpadded batches take SDPA's
  fused kernels). ``FrameBackbone`` and the training tasks call it with gradients; the engine
  calls it under ``inference_mode``.
- ``Engine`` turns pieces (``pieces.Piece``) of many items into per-item outputs: the mel of a
  group of pieces on the model's device, the chunks of many items in width-sorted encoder passes,
  one pass in flight while the previous one's outputs are handed out (on CUDA through pinned
  memory and non-blocking copies), out-of-memory halving of the batch, frames streamed to each
  item's sink in order, clip vectors pooled the official way (``pooling.pool_clip_vectors``).
  In-memory ``embed_*`` (``run_waveforms``), folder runs, Ray and the HEAR module all use it.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from . import frontend, pooling
from .dtypes import numpy_dtype
from .model import ATSTEncoder, Intermediates
from .pieces import Piece, Plan, SourceInfo, waveform_pieces

if TYPE_CHECKING:
    from .embed import ATSTModel

Forward = Callable[..., Intermediates]  # ATSTEncoder.forward_intermediates, or its compiled form

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
LOOKAHEAD = 2  # chunks queued per kind before a pass, in batches: room to sort them by width
MEL_WINDOW_CHUNKS = 4  # in-memory inputs: chunks whose mel is made at once (40 s: the STFT stays small)


# ============================================================================ the differentiable pass


def pack(mels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chunks of log-mel, each (n_mels, frames_i), zero-padded into one (C, n_mels, max frames) batch."""
    width = max(m.shape[-1] for m in mels)
    out = mels[0].new_zeros(len(mels), mels[0].shape[0], width)
    for j, m in enumerate(mels):
        out[j, :, : m.shape[-1]] = m
    return out


def gather(mel: torch.Tensor, chunks: Sequence[pooling.Chunk]) -> torch.Tensor:
    """The frames of ``chunks`` from a batch's mel (B, n_mels, T) as one (C, n_mels, W) batch; no
    copy when every item is exactly one chunk starting at frame 0."""
    width = max(c.frames for c in chunks)
    if len(chunks) == mel.shape[0] and all(c.start == 0 and c.item == j for j, c in enumerate(chunks)):
        return mel[:, :, :width]
    return pack([mel[c.item, :, c.start : c.start + c.frames] for c in chunks])


def encode_chunks(
    encoder: ATSTEncoder,
    x: torch.Tensor,
    n_tokens: Sequence[int],
    blocks: list[int],
    forward: Forward | None = None,
) -> Intermediates:
    """One encoder pass over a batch of chunks.

    Args:
        encoder: the ``ATSTEncoder`` (its config and device).
        x: (C, n_mels, W) chunks of normalised log-mel, zero-padded on the right.
        n_tokens: valid tokens per chunk (frames // patch_w).
        blocks: 0-based block indices to return, in order.
        forward: the encoder's ``forward_intermediates`` or a compiled form of it (default: the former).

    Returns:
        ``Intermediates``: cls (C, L, D) or ``None``, tokens (C, L, W // patch_w, D); tokens past a
        chunk's own count are padding.
    """
    forward = encoder.forward_intermediates if forward is None else forward
    full = x.shape[-1] // encoder.cfg.patch_w
    padded = any(t < full for t in n_tokens)  # else no mask: SDPA's fused kernels apply
    mask = torch.tensor(list(n_tokens), device=x.device) if padded else None
    return forward(x.to(encoder.pos_embed.device), mask, blocks)


# ============================================================================ what a run asks for


@dataclass(frozen=True)
class Request:
    """The outputs wanted of every item: blocks of the clip vector and of the frames (``None`` = not
    wanted), the dtype frames are handed out in, and overlapping windows (``hop_tokens``) for frames.

    ``frame_head``: a frame-level ``ClassificationHead`` on the model's device; the frames handed
    out are then its scores (T', classes) of the frame layers' rows, computed where the encoder runs.
    """

    clip_layers: tuple[int, ...] | None
    frame_layers: tuple[int, ...] | None
    frames_dtype: torch.dtype = torch.float32
    hop_tokens: int | None = None
    frame_head: Any = field(default=None, compare=False)

    def plan(self, cfg) -> Plan:
        """How items are cut into chunks for this request with an encoder of config ``cfg``."""
        clip_from_frames = self.clip_layers is not None and not cfg.has_cls
        if clip_from_frames and self.hop_tokens is not None:
            raise ValueError("overlapping windows (hop_s) give frame embeddings only, not clip vectors")
        return Plan(
            cfg.spec_w, cfg.patch_w, cfg.clip_chunk_frames,
            frame_plan=self.frame_layers is not None or clip_from_frames,
            clip_plan=self.clip_layers is not None and cfg.has_cls,
            hop_tokens=self.hop_tokens,
        )


@dataclass
class EmbedResult:
    """Outputs of one item.

    Attributes:
        clip: (C,) float32 clip vector (C = L * D for ATST-Frame, 2 * L * D for ATST-Clip), or None.
        frames: (T', L * D) frame embeddings in the request's frames dtype, or None.
        timestamps: (T',) float64 seconds, the start of each 40 ms token, or None.
    """

    clip: np.ndarray | None
    frames: np.ndarray | None
    timestamps: np.ndarray | None


class DiskFull(OSError):
    """Writing an output failed for lack of space: a run stops (a rerun resumes)."""


class MemorySink:
    """Keeps an item's outputs in memory (``result`` once finished)."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.result: EmbedResult | None = None

    def write_frames(self, rows: np.ndarray) -> None:
        self.frames.append(rows)

    def finish(self, clip: np.ndarray | None, frames_dim: int | None, dtype, timestamps: np.ndarray | None) -> None:
        frames = None
        if frames_dim is not None and len(self.frames) == 1:
            frames = self.frames[0]  # one chunk: no copy
        elif frames_dim is not None:
            frames = np.concatenate(self.frames) if self.frames else np.zeros((0, frames_dim), dtype)
        self.frames = []
        self.result = EmbedResult(clip, frames, timestamps)

    def abort(self) -> None:
        self.frames = []


# ============================================================================ the engine


@dataclass
class Job:
    """An item being embedded: its chunks, the results received so far, where its outputs go."""

    idx: int
    info: SourceInfo | None  # None for an item that failed before it was decoded
    sink: object | None  # write_frames(rows), finish(clip, frames_dim, dtype, timestamps), abort(); None until opened
    pending: int  # chunk results still to come
    sums: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (L_clip, D) float32
    cls: dict[int, torch.Tensor] = field(default_factory=dict)
    frames: dict[int, np.ndarray] = field(default_factory=dict)  # chunk index -> rows not yet written
    next_frame_chunk: int = 0  # position in info.frame_chunks of the next rows to write
    failed: bool = False


@dataclass
class _InFlight:
    """An encoder pass whose outputs are on their way to the CPU: (b, P, Lf * D) frames in the
    frames dtype, (b, Lc, D) float32 token sums and [CLS] outputs; ``event`` marks the copies (CUDA)."""

    kind: str
    batch: list[tuple[Job, pooling.Chunk, torch.Tensor]]
    frames: torch.Tensor | None
    sums: torch.Tensor | None
    cls: torch.Tensor | None
    event: "torch.cuda.Event | None"


def is_disk_full(e: OSError) -> bool:
    """Whether a failed write ran out of space (a run stops there) rather than failing one output."""
    return e.errno in _DISK_FULL


def _to_pinned(t: torch.Tensor | None) -> torch.Tensor | None:
    """Start a non-blocking copy of a CUDA tensor into pinned host memory."""
    if t is None:
        return None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def _select(x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Blocks ``positions`` of (b, L, ...) outputs; no copy when they are all of them in order."""
    return x if positions == list(range(x.shape[1])) else x[:, positions]


class Engine:
    """Pieces in, per-item outputs out (see the module docstring).

    ``start(piece, sink)`` registers an item from its first piece; ``add(pieces)`` computes the
    pieces' mel and queues their chunks; ``flush()`` encodes what is queued. ``on_done(job,
    error)`` is called once per item, with ``error=None`` when its sink has been finished.
    """

    def __init__(
        self,
        model: ATSTModel,
        request: Request,
        batch_size: int,
        on_done: Callable[[Job, str | None], None],
        log: Callable[[str], None] = lambda msg: None,
    ):
        self.model, self.cfg, self.request = model, model.config, request
        self.plan = request.plan(self.cfg)
        self.batch_size, self.on_done, self.log = batch_size, on_done, log
        clip_layers = list(request.clip_layers or [])
        frame_layers = list(request.frame_layers or [])
        self.want_clip, self.want_frames = request.clip_layers is not None, request.frame_layers is not None
        clip_from_frames = self.want_clip and not self.cfg.has_cls
        frame_blocks = list(frame_layers)
        frame_blocks += [b for b in (clip_layers if clip_from_frames else []) if b not in frame_blocks]
        # per pool kind: (encoder blocks, positions of the frame layers in them, positions of the clip layers)
        self.kinds = {
            "frame": (frame_blocks, [frame_blocks.index(b) for b in frame_layers],
                      [frame_blocks.index(b) for b in clip_layers] if clip_from_frames else []),
            "clip": (clip_layers, [], list(range(len(clip_layers)))),
        }
        self.frames_dim = len(frame_layers) * self.cfg.embed_dim if self.want_frames else None
        if request.frame_head is not None and self.want_frames:
            if request.frame_head.in_dim != self.frames_dim:
                raise ValueError(f"the frame head takes {request.frame_head.in_dim} inputs, the frames have {self.frames_dim}")
            self.frames_dim = request.frame_head.num_classes
        self.pools: dict[str, list[tuple[Job, pooling.Chunk, torch.Tensor]]] = {"frame": [], "clip": []}
        self.jobs: dict[int, Job] = {}
        self.inflight: _InFlight | None = None

    # ------------------------------------------------------------ intake

    def start(self, piece: Piece, open_sink: Callable[[], object]) -> None:
        """Register an item from its first piece; ``open_sink()`` opens where its outputs go (a
        write error fails the item, a full disk raises ``DiskFull``)."""
        info = piece.info
        job = Job(piece.idx, info, None, pending=len(info.frame_chunks) + len(info.clip_chunks))
        self.jobs[piece.idx] = job
        try:
            job.sink = open_sink()
        except OSError as e:
            self._write_error(job, e)
            return
        if job.pending == 0:  # nothing to encode (cannot happen for inputs >= MIN_SAMPLES)
            self._finish(job)

    def add(self, pieces: list[Piece]) -> None:
        """Compute the mel of ``pieces`` (whose items were started) in one batch and queue their chunks."""
        pieces = [p for p in pieces if p.idx in self.jobs and not self.jobs[p.idx].failed]
        if not pieces:
            return
        device = self.model.device
        try:
            segments = torch.nn.utils.rnn.pad_sequence([p.segment.to(device, non_blocking=True) for p in pieces], batch_first=True)
            peaks = torch.tensor([float("nan") if p.peak_db is None else p.peak_db for p in pieces])
            mel = frontend.log_mel_segments(segments, torch.tensor([p.n_frames for p in pieces]), peaks, db_clamp=self.cfg.db_clamp)  # (B, M, T)
        except torch.OutOfMemoryError:
            if len(pieces) == 1:
                self.fail(pieces[0].idx, "out of GPU memory computing the mel of one window")
                return
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.add(pieces[: len(pieces) // 2])
            self.add(pieces[len(pieces) // 2 :])
            return
        for j, p in enumerate(pieces):
            job = self.jobs[p.idx]
            for kind, c in p.chunks:
                offset = c.start - p.first_frame
                self.pools[kind].append((job, c, mel[j, :, offset : offset + c.frames]))
        for kind in self.pools:
            while len(self.pools[kind]) >= LOOKAHEAD * self.batch_size:
                self._run(kind, self._take(kind))

    def _take(self, kind: str) -> list[tuple[Job, pooling.Chunk, torch.Tensor]]:
        """The next pass of a pool: its widest ``batch_size`` chunks (so padding stays small)."""
        pool = sorted(self.pools[kind], key=lambda e: -e[1].frames)  # stable: items keep their order
        batch, self.pools[kind] = pool[: self.batch_size], pool[self.batch_size :]
        return batch

    def flush(self) -> None:
        """Encode everything queued and hand out every result."""
        for kind in self.pools:
            while self.pools[kind]:
                self._run(kind, self._take(kind))
        self._complete_inflight()

    def fail(self, idx: int, error: str) -> None:
        job = self.jobs.pop(idx, None)
        if job is not None and not job.failed:
            job.failed = True
            if job.sink is not None:
                job.sink.abort()
            self.on_done(job, error)

    def abort_all(self) -> None:
        """Drop every unfinished item (its sink is aborted); no callbacks."""
        for job in self.jobs.values():
            job.failed = True
            if job.sink is not None:
                job.sink.abort()
        self.jobs.clear()
        self.pools = {"frame": [], "clip": []}
        self.inflight = None

    # ------------------------------------------------------------ encoding

    def _run(self, kind: str, batch: list[tuple[Job, pooling.Chunk, torch.Tensor]]) -> None:
        """Queue one encoder pass, then hand out the previous pass's results (on CUDA the GPU
        computes this batch while the CPU writes the previous one)."""
        batch = [e for e in batch if not e[0].failed]
        if not batch:
            return
        try:
            flight = self._launch(kind, batch)
        except torch.OutOfMemoryError:
            self._complete_inflight()
            if len(batch) == 1:
                self.fail(batch[0][0].idx, "out of GPU memory with a batch of one chunk")
                return
            half = len(batch) // 2
            if self.batch_size > half:
                self.batch_size = half
                self.log(f"out of GPU memory: batch size lowered to {half} chunks")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._run(kind, batch[:half])
            self._run(kind, batch[half:])
            return
        except (RuntimeError, ValueError) as e:
            for job, _, _ in batch:
                self.fail(job.idx, f"encoder failed: {type(e).__name__}: {e}")
            return
        self._complete_inflight()
        self.inflight = flight

    def _complete_inflight(self) -> None:
        flight, self.inflight = self.inflight, None
        if flight is None:
            return
        if flight.event is not None:
            flight.event.synchronize()
        frames = flight.frames.numpy() if flight.frames is not None else None
        for j, (job, c, _) in enumerate(flight.batch):
            if not job.failed:
                lo, hi = c.kept
                rows = frames[j, lo:hi] if frames is not None else None
                token_sum = flight.sums[j] if flight.sums is not None else None
                cls = flight.cls[j] if flight.cls is not None else None
                self._receive(flight.kind, job, c, rows, token_sum, cls)

    @torch.inference_mode()
    def _launch(self, kind: str, batch) -> _InFlight:
        """One encoder pass over a batch of chunks; its outputs start their way to the CPU without waiting."""
        device = self.model.device
        blocks, frame_sel, clip_sel = self.kinds[kind]
        n_tokens = [c.tokens for _, c, _ in batch]
        out = self.model.encode(pack([m for _, _, m in batch]), n_tokens, blocks)  # tokens (b, L, P, D)
        frames = sums = cls = None
        if frame_sel:
            frames = _select(out.tokens, frame_sel).permute(0, 2, 1, 3).flatten(2)  # (b, P, Lf * D)
            if self.request.frame_head is not None:
                frames = self.request.frame_head.probabilities(frames.float())  # (b, P, classes)
            frames = frames.to(self.request.frames_dtype)
        if clip_sel:
            sums = pooling.masked_token_sum(_select(out.tokens, clip_sel), n_tokens)  # (b, Lc, D) float32
            if out.cls is not None:
                cls = _select(out.cls, clip_sel).float()  # (b, Lc, D)
        event = None
        if device.type == "cuda":
            frames, sums, cls = (_to_pinned(t) for t in (frames, sums, cls))
            event = torch.cuda.Event()
            event.record()
        else:
            frames, sums, cls = (None if t is None else t.cpu() for t in (frames, sums, cls))
        return _InFlight(kind, batch, frames, sums, cls, event)

    def _receive(self, kind: str, job: Job, chunk: pooling.Chunk, rows, token_sum, cls) -> None:
        try:
            if rows is not None:
                job.frames[chunk.index] = rows
                order = job.info.frame_chunks
                while job.next_frame_chunk < len(order) and order[job.next_frame_chunk].index in job.frames:
                    job.sink.write_frames(job.frames.pop(order[job.next_frame_chunk].index))
                    job.next_frame_chunk += 1
            if token_sum is not None:
                job.sums[(kind, chunk.index)] = token_sum
            if cls is not None:
                job.cls[chunk.index] = cls
            job.pending -= 1
            if job.pending == 0:
                self._finish(job)
        except OSError as e:
            self._write_error(job, e)

    def _write_error(self, job: Job, e: OSError) -> None:
        """A failed write: a full disk stops the run (``DiskFull``), any other error fails the item."""
        if is_disk_full(e):
            raise DiskFull(e.errno, f"disk full while writing outputs ({e})") from e
        self.fail(job.idx, f"cannot write the output: {e}")

    def _finish(self, job: Job) -> None:
        info, clip = job.info, None
        if self.want_clip:
            kind, chunks = ("clip", info.clip_chunks) if self.cfg.has_cls else ("frame", info.frame_chunks)
            if chunks:
                sums = torch.stack([job.sums[(kind, c.index)] for c in chunks])  # (C, Lc, D)
                cls = torch.stack([job.cls[c.index] for c in chunks]) if self.cfg.has_cls else None
                clip = pooling.pool_clip_vectors(chunks, sums, cls, items=[job.idx])[0].numpy()
        timestamps = pooling.token_times(info.frame_chunks, self.cfg.patch_w).numpy() if self.want_frames else None
        dtype = numpy_dtype(self.request.frames_dtype) if self.want_frames else None
        job.sink.finish(clip, self.frames_dim, dtype, timestamps)
        self.jobs.pop(job.idx, None)
        self.on_done(job, None)


# ============================================================================ waveforms in memory


def run_waveforms(
    model: ATSTModel,
    wavs: Sequence[torch.Tensor],
    request: Request,
    batch_size: int,
    window_chunks: int | None = None,
    label: str = "item",
) -> list[EmbedResult]:
    """Embed checked (N,) float32 16 kHz CPU waveforms through the engine; one result per waveform, in order.

    Waveforms are taken shortest first so that similar lengths share passes. The mel is made
    ``window_chunks`` chunks at a time (default ``MEL_WINDOW_CHUNKS``: a long waveform is cut into
    pieces of that many chunks, short ones are grouped up to that many frames), so peak memory is
    bounded by the window and the batch, not by the audio's length. ``label`` names the items in errors.

    Raises:
        RuntimeError: the encoder failed for an item (e.g. out of GPU memory with one chunk).
    """
    errors: dict[int, str] = {}

    def done(job: Job, error: str | None) -> None:
        if error:
            errors[job.idx] = error

    engine = Engine(model, request, batch_size, done)
    window_frames = (window_chunks or MEL_WINDOW_CHUNKS) * model.config.spec_w
    sinks = [MemorySink() for _ in wavs]
    group: list[Piece] = []
    for i in sorted(range(len(wavs)), key=lambda i: wavs[i].shape[0]):
        info = {"duration": wavs[i].shape[0] / frontend.SAMPLE_RATE, "sample_rate": frontend.SAMPLE_RATE, "channels": 1}
        for piece in waveform_pieces(i, wavs[i], engine.plan, info, window_frames):
            if piece.info is not None:
                engine.start(piece, lambda: sinks[i])
            group.append(piece)
            if sum(p.n_frames for p in group) >= window_frames:  # one mel batch of about a window
                engine.add(group)
                group = []
    engine.add(group)
    engine.flush()
    if errors:
        raise RuntimeError("; ".join(f"{label} {i}: {e}" for i, e in sorted(errors.items())))
    return [s.result for s in sinks]


