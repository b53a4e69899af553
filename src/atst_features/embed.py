"""Embedding: inputs -> waveforms -> log-mel -> chunked encoder passes -> pooled results.

``ATSTModel`` wraps a loaded encoder with ``embed_clip``, ``embed_frames`` and ``tag``; every
call goes through the one chunk engine (``chunks.run_waveforms``), which streams long inputs
window by window. The cached one-liners are in ``api.py``; loading is in ``weights.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from . import frontend
from .audio import check_dense, load_audio, loud_peak, prepare_waveform, warn_loud
from .chunks import Request, encode_chunks, run_waveforms
from .cpu import choose_gemm
from .dtypes import resolve_dtype
from .heads import ClassificationHead
from .model import ATSTConfig, ATSTEncoder, Intermediates
from .pooling import token_seconds
from .sed import DEFAULT_DETECT_MODEL, Detection, PerClass, detect_events, detection_settings

DEFAULT_MODEL = "atst-frame-base"

AudioInput = Union[str, os.PathLike, np.ndarray, torch.Tensor]
Layers = Union[str, int, Sequence[int]]



def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device from its name, checked: CUDA must be available when asked for.

    ``"auto"`` means CUDA (the current device) when it is available, else the CPU; it is only
    ever used when asked for, never a default.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device (use e.g. 'cpu', 'cuda', 'cuda:1', 'auto'): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but CUDA is not available here; use device='cpu'")
    return dev


@dataclass
class FrameEmbeddings:
    """Frame embeddings of one clip (or of a batch of equal-length clips).

    Attributes:
        embeddings: (T', L * D) float32, or (B, T', L * D) for a batch; the selected blocks'
            outputs concatenated along features in the order of ``layers``. One row per 40 ms token.
        timestamps: (T',) float64 seconds: the start of each token, i.e. the centre of the first of
            its 4 mel frames (frame f is centred at f * 10 ms). Chunk c starts 10.01 s * c in.
    """

    embeddings: torch.Tensor
    timestamps: torch.Tensor

    def __len__(self) -> int:
        return self.timestamps.shape[0]


@dataclass
class Tags:
    """Class probabilities from a classification head (``ATSTModel.tag``).

    Attributes:
        scores: probabilities (sigmoid, or softmax for a single-label head), (C,) for a clip-level
            head or (T', C) for a frame-level head (one row per 40 ms token); a 2-D batch input
            adds a leading batch axis.
        labels: class names in score order, or ``None`` when the checkpoint's label list is unknown.
        timestamps: (T',) float64 seconds, the start of each token, for frame-level heads; else ``None``.
    """

    scores: torch.Tensor
    labels: list[str] | None
    timestamps: torch.Tensor | None = None

    def top(self, k: int = 5) -> list[tuple[str | int, float]]:
        """The ``k`` best classes of one clip as (label, or class index when labels are unknown, score).

        Frame-level scores are reduced by their maximum over time first.
        """
        per_class = self.scores if self.timestamps is None else self.scores.amax(dim=-2)
        if per_class.ndim != 1:
            raise ValueError("top() needs the scores of one clip; index a batch first")
        values, index = per_class.topk(min(k, per_class.shape[0]))
        names = self.labels
        return [(names[i] if names else i, v) for i, v in zip(index.tolist(), values.tolist())]


def check_batch_size(batch_size) -> int:
    """A batch size (chunks per encoder pass): a positive int."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


def resolve_layers(layers: Layers, depth: int) -> list[int]:
    """``"all"`` | ``"last"`` | int | list of ints -> list of 0-based block indices (negative ints count from the end)."""
    accepted = f'"all", "last", a block index in -{depth}..{depth - 1}, or a list of such indices'
    if isinstance(layers, str):
        if layers == "all":
            return list(range(depth))
        if layers == "last":
            return [depth - 1]
        raise ValueError(f"layers={layers!r} is not understood; use {accepted}")
    items = [layers] if isinstance(layers, (int, np.integer)) else layers
    if isinstance(layers, bool) or not isinstance(items, (list, tuple, range)) or not items:
        raise ValueError(f"layers={layers!r} is not understood; use {accepted}")
    out = []
    for i in items:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -depth <= i < depth:
            raise ValueError(f"layers={layers!r} has an invalid block index {i!r}; use {accepted}")
        out.append(int(i) % depth)
    if len(set(out)) != len(out):
        raise ValueError(f"layers={layers!r} names a block twice")
    return out


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


MAX_CHANNELS = 8  # a 2-D array with at most this many columns (and more rows) is (samples, channels)


def _check_batch(item, what: str) -> None:
    """A 2-D input is a batch (clips, samples): refuse empty ones and the (samples, channels) layout
    that ``soundfile.read`` returns, saying how to downmix."""
    n, c = item.shape
    if n == 0:
        raise ValueError(f"{what} is an empty batch (shape {tuple(item.shape)})")
    if c <= MAX_CHANNELS and n > c:  # rows of <= 8 samples: too short for a clip in any case
        raise ValueError(
            f"{what} has shape {tuple(item.shape)}: that looks like (samples, channels), as soundfile.read returns, "
            "but a 2-D input is a batch (clips, samples). Downmix to mono first: x.mean(axis=1) for numpy, "
            "x.mean(dim=1) for torch (or pass the file path: files are downmixed for you)"
        )


def _flatten_inputs(audio, sample_rate) -> tuple[list[torch.Tensor], list[tuple[str, int]], bool]:
    """Inputs -> (1-D 16 kHz waveforms, one (kind, count) per input item, is_list).

    kind is "one" (a file or a 1-D array) or "batch" (a 2-D array of ``count`` clips). Float arrays
    that peak far above full scale (int16-scaled floats) give one warning per call.
    """
    is_list = isinstance(audio, (list, tuple))
    items = list(audio) if is_list else [audio]
    if is_list and not items:
        raise ValueError("the input list is empty; pass at least one waveform or file path")
    wavs: list[torch.Tensor] = []
    layout: list[tuple[str, int]] = []
    loud: list[tuple[str, float]] = []
    for k, item in enumerate(items):
        what = f"input {k}" if is_list else "audio"
        if _is_path(item):
            wavs.append(prepare_waveform(load_audio(item), frontend.SAMPLE_RATE, f"{what} ({item})"))
            layout.append(("one", 1))
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            if isinstance(item, torch.Tensor):
                check_dense(item, what)
            peak = loud_peak(item)
            if peak is not None:
                loud.append((what, peak))
            if item.ndim == 1:
                wavs.append(prepare_waveform(item, sample_rate, what))
                layout.append(("one", 1))
            elif item.ndim == 2:
                _check_batch(item, what)
                wavs.extend(prepare_waveform(row, sample_rate, f"{what}, row {r}") for r, row in enumerate(item))
                layout.append(("batch", item.shape[0]))
            else:
                raise ValueError(
                    f"{what} has {item.ndim} dimensions (shape {tuple(item.shape)}); pass a 1-D waveform, a 2-D "
                    "(batch, samples) array of equal-length mono clips, or a list of waveforms. Average "
                    "multichannel audio to mono first (files are downmixed for you)."
                )
        else:
            raise TypeError(
                f"{what} is a {type(item).__name__}; pass a file path, a numpy array or torch tensor of samples, "
                "or a list of these"
            )
    warn_loud(loud)
    return wavs, layout, is_list


def _regroup(results: list, layout: list[tuple[str, int]], is_list: bool, stack):
    out, pos = [], 0
    for kind, count in layout:
        out.append(results[pos] if kind == "one" else stack(results[pos : pos + count]))
        pos += count
    return out if is_list else out[0]


class ATSTModel:
    """A loaded ATST encoder with its embedding methods.

    Attributes:
        encoder: the ``ATSTEncoder`` (in ``eval()`` mode).
        config: its ``ATSTConfig``.
        name: what it was loaded as (manifest name, directory, file or ``hf://`` spec).
        head: the classification head of a fine-tuned checkpoint, or ``None``.
        source: where the weights were resolved to (the converted directory, file or Hub
            snapshot actually read), or ``None`` for a model built in memory.
        weights_sha256: sha256 of the weights file that was read, or ``None`` when unknown.
        backend: what ``encode`` runs on: "torch" (the encoder), "onnxruntime" or
            "onnxruntime-int8" (``use_forward``).
        device, dtype: where and in what precision the encoder runs; the front end is float32.
        choices: what ``load`` chose for this machine, each with why: "dtype" (for ``dtype="auto"``),
            "gemm" (the CPU GEMM path, ``cpu.choose_gemm``), "backend" (the ONNX graph used).
    """

    def __init__(
        self,
        encoder: ATSTEncoder,
        name: str | None = None,
        *,
        head: ClassificationHead | None = None,
        source: str | None = None,
        weights_sha256: str | None = None,
    ):
        self.encoder = encoder.eval()
        self.name = name
        self.head = None if head is None else head.eval()
        self.source = source
        self.weights_sha256 = weights_sha256
        self._forward = None  # the torch.compile'd encoder pass after compile(), else the eager one
        self.backend = "torch"  # what encode() runs on: "torch", or an ONNX backend (use_forward)
        self.choices: dict[str, str] = {}  # what load() chose for this machine, and why

    def compile(self, **kwargs) -> "ATSTModel":
        """Run the encoder through ``torch.compile(encoder.forward_intermediates, dynamic=True, **kwargs)``; returns self.

        The first calls compile (tens of seconds; again for new batch shapes); results equal the
        eager encoder to float rounding. Worth it for long GPU jobs, not for a few clips.
        """
        if self.backend != "torch":
            raise ValueError(f"compile() compiles the torch encoder; this model runs on backend {self.backend!r}")
        kwargs.setdefault("dynamic", True)
        self._forward = torch.compile(self.encoder.forward_intermediates, **kwargs)
        return self

    def use_forward(self, forward, backend: str = "torch") -> "ATSTModel":
        """Run every encoder pass through ``forward`` (a callable with ``forward_intermediates``'
        signature and result; ``None``: the eager encoder), on backend ``backend``; returns self.
        ``onnx_export.attach_backend`` installs ONNX Runtime's."""
        self._forward, self.backend = forward, backend
        return self

    def encode(self, mel: torch.Tensor, n_tokens: Sequence[int], blocks: list[int]) -> Intermediates:
        """One encoder pass over a batch of chunks (compiled after ``compile()``): ``chunks.encode_chunks``.

        mel (B, n_mels, T <= spec_w), zero-padded; n_tokens: valid tokens per chunk (the padding
        mask is only built when some chunk is shorter than T // patch_w); returns
        ``Intermediates`` (cls (B, L, D) or ``None``, tokens (B, L, P, D)).
        """
        if self.backend != "torch" and (self.device.type != "cpu" or self.dtype != torch.float32):
            raise ValueError(f"backend {self.backend!r} runs float32 on the CPU; this model was moved to {self.device}, {self.dtype}")
        return encode_chunks(self.encoder, mel, n_tokens, blocks, self._forward)

    @property
    def config(self) -> ATSTConfig:
        return self.encoder.cfg

    @property
    def device(self) -> torch.device:
        return self.encoder.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.pos_embed.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "ATSTModel":
        """Move the encoder (and head) to ``device`` and/or cast it to ``dtype`` (see ``COMPUTE_DTYPES``); returns self.

        The CPU GEMM path is (re)chosen for the resulting device and dtype (``cpu.choose_gemm``,
        measured once per process and shape), and ``choices["gemm"]`` says which.
        """
        device = None if device is None else resolve_device(device)
        dtype = None if dtype is None else resolve_dtype(dtype)
        self.encoder.to(device=device, dtype=dtype)
        if self.head is not None:
            self.head.to(device=device)
        self.choices["gemm"] = choose_gemm(self.encoder)
        return self

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ATSTModel(name={self.name!r}, family={c.family!r}, embed_dim={c.embed_dim}, depth={c.depth}, "
            f"device={str(self.device)!r}, dtype={self.dtype})"
        )

    # ---------------------------------------------------------------- public API

    def clip_dim(self, layers: Layers = "all") -> int:
        """Size of a clip vector for ``layers``: L * D for ATST-Frame, 2 * L * D for ATST-Clip."""
        n = len(resolve_layers(layers, self.config.depth)) * self.config.embed_dim
        return 2 * n if self.config.has_cls else n

    def frame_dim(self, layers: Layers = "all") -> int:
        """Size of a frame embedding for ``layers``: L * D."""
        return len(resolve_layers(layers, self.config.depth)) * self.config.embed_dim

    def embed_clip(
        self, audio: AudioInput | list, sample_rate: float | None = None, *, layers: Layers = "all", batch_size: int = 16
    ):
        """One vector per clip, pooled the official way (see ``pooling``).

        Args:
            audio: a file path; a 1-D waveform (numpy or torch; float16/32/64 or int16/int32 PCM);
                a 2-D (batch, samples) array of equal-length mono clips; or a list of these.
            sample_rate: rate of array inputs in Hz (required for arrays; files use their own).
                Anything other than 16 kHz is resampled.
            layers: "all" (default: every block, the official embedding), "last", a 0-based block
                index, or a list of indices.
            batch_size: chunks (of up to 10.01 s) per encoder pass.

        Returns:
            float32 CPU tensor (L * D,) for ATST-Frame, (2 * L * D,) = [cls per block | avg per block]
            for ATST-Clip; (B, ...) for a 2-D input; a list for a list input.
        """
        wavs, layout, is_list = _flatten_inputs(audio, sample_rate)
        request = Request(clip_layers=tuple(resolve_layers(layers, self.config.depth)), frame_layers=None)
        results = run_waveforms(self, wavs, request, check_batch_size(batch_size))
        return _regroup([torch.from_numpy(r.clip) for r in results], layout, is_list, torch.stack)

    def embed_frames(
        self,
        audio: AudioInput | list,
        sample_rate: float | None = None,
        *,
        layers: Layers = "all",
        batch_size: int = 16,
        hop_s: float | None = None,
    ):
        """One embedding per 40 ms token, with timestamps in seconds.

        Long audio is cut into 10.01 s chunks (1001 mel frames), each encoded alone, and the
        chunks' frames concatenated: T' = sum over chunks of floor(chunk frames / 4).

        Args: as ``embed_clip``, plus
            hop_s: ``None`` (default): the official non-overlapping chunks above. A number of
                seconds: overlapping 10 s windows (250 tokens) that start every ``hop_s`` seconds
                (rounded to whole 40 ms tokens, at most 10 s), the last one ending at the clip's
                end; each token is taken from the window where it lies farthest from a window
                edge, so chunk seams disappear. Then T' = mel frames // 4, on one 40 ms grid
                (token j at j * 0.04 s). Audio of at most 10.01 s gives the same result either way.

        Returns:
            ``FrameEmbeddings`` with embeddings (T', L * D) float32 and timestamps (T',) seconds;
            for a 2-D input embeddings are (B, T', L * D); a list input gives a list.
        """
        blocks = tuple(resolve_layers(layers, self.config.depth))
        hop_tokens = None if hop_s is None else self._hop_tokens(hop_s)
        wavs, layout, is_list = _flatten_inputs(audio, sample_rate)
        request = Request(clip_layers=None, frame_layers=blocks, hop_tokens=hop_tokens)
        results = run_waveforms(self, wavs, request, check_batch_size(batch_size))
        frames = [FrameEmbeddings(torch.from_numpy(r.frames), torch.from_numpy(r.timestamps)) for r in results]

        def stack(items: list[FrameEmbeddings]) -> FrameEmbeddings:
            return FrameEmbeddings(torch.stack([f.embeddings for f in items]), items[0].timestamps)

        return _regroup(frames, layout, is_list, stack)

    def tag(
        self,
        audio: AudioInput | list,
        sample_rate: float | None = None,
        *,
        batch_size: int = 16,
        hop_s: float | None = None,
    ):
        """Class probabilities from the checkpoint's classification head.

        Args: as ``embed_clip``. The head scores the last block: a clip-level head the clip vector
        (``embed_clip(layers="last")``), a frame-level head every token (``embed_frames(layers="last")``,
        scored where the encoder runs). ``hop_s`` (frame-level heads only): overlapping windows, as
        in ``embed_frames``.

        Returns:
            ``Tags`` per input (a list for a list input): scores (C,) for a clip-level head, or
            (T', C) with timestamps (T',) seconds for a frame-level head; labels when known.

        Raises:
            ValueError: the model has no classification head.
        """
        head = self._head("tag")
        if head.level == "clip":
            if hop_s is not None:
                raise ValueError("hop_s is for frame-level heads; this model's head scores whole clips")
            device = next(head.parameters()).device

            @torch.inference_mode()
            def scores(x: torch.Tensor) -> torch.Tensor:
                return head.probabilities(x.to(device=device, dtype=torch.float32)).cpu()

            vectors = self.embed_clip(audio, sample_rate, layers="last", batch_size=batch_size)
            if isinstance(vectors, list):
                return [Tags(scores(v), head.labels) for v in vectors]
            return Tags(scores(vectors), head.labels)
        hop_tokens = None if hop_s is None else self._hop_tokens(hop_s)
        wavs, layout, is_list = _flatten_inputs(audio, sample_rate)
        request = Request(None, (self.config.depth - 1,), hop_tokens=hop_tokens, frame_head=head)
        results = run_waveforms(self, wavs, request, check_batch_size(batch_size))
        tags = [Tags(torch.from_numpy(r.frames), head.labels, torch.from_numpy(r.timestamps)) for r in results]

        def stack(items: list[Tags]) -> Tags:
            return Tags(torch.stack([t.scores for t in items]), head.labels, items[0].timestamps)

        return _regroup(tags, layout, is_list, stack)

    def detect(
        self,
        audio: AudioInput | list,
        sample_rate: float | None = None,
        *,
        threshold: PerClass = 0.5,
        median_filter: PerClass = 0.0,
        hop_s: float | None = None,
        batch_size: int = 16,
    ):
        """Sound events from a frame-level head: ``tag`` -> ``sed.detect_events``.

        Args: as ``embed_clip``, plus
            threshold: a frame is active for a class when its score is >= this; one score in
                [0, 1], or one per class (a sequence in score order or a dict {label: score}).
            median_filter: seconds of the median filter over each class's 0/1 decisions
                (0 = none; rounded to whole 40 ms frames), or one per class.
            hop_s: ``None`` (default): the 10.01 s chunks of ``embed_frames``, the last one
                masked (not zero-padded). A number: overlapping 10 s windows every ``hop_s`` seconds,
                each token scored in the window where it lies farthest from an edge, so events do not
                break at the seams (``embed_frames(hop_s=...)``; 5 is a good choice for long audio).

        Returns:
            a list of ``sed.Detection`` (onset s, offset s, label, peak score) sorted by onset, for
            one input; one such list per input for a list or a 2-D batch.

        Raises:
            ValueError: no frame-level head, or a threshold / median filter out of range.
        """
        classes = self.frame_head("detect()").class_names
        detection_settings(classes, threshold, median_filter)  # checked before any audio is read

        def events(t: torch.Tensor, scores: torch.Tensor) -> list[Detection]:
            return detect_events(scores, t, classes, threshold, median_filter)

        tags = self.tag(audio, sample_rate, batch_size=batch_size, hop_s=hop_s)
        if isinstance(tags, list):
            return [events(t.timestamps, t.scores) for t in tags]
        if tags.scores.ndim == 3:
            return [events(tags.timestamps, s) for s in tags.scores]
        return events(tags.timestamps, tags.scores)

    def _head(self, what: str) -> ClassificationHead:
        if self.head is None:
            raise ValueError(
                f"model {self.name!r} has no classification head; {what}() needs a fine-tuned checkpoint that has "
                "one (for example 'atst-frame-base-strong' for sound events, 'atst-frame-base-weak' for AudioSet tags)"
            )
        return self.head

    def frame_head(self, what: str = "detecting events") -> ClassificationHead:
        """The frame-level head (one score vector per 40 ms token) that ``what`` needs.

        Raises:
            ValueError: the model has no head, or a clip-level one (saying what to use instead).
        """
        if self.head is not None and self.head.level == "frame":
            return self.head
        kind = "no classification head" if self.head is None else (
            "a clip-level head: it scores whole clips, not events in time (tag() gives its clip tags)"
        )
        raise ValueError(
            f"{what} needs a model with a frame-level head, but model {self.name!r} has {kind}; "
            f"for example {DEFAULT_DETECT_MODEL!r}"
        )

    # ---------------------------------------------------------------- internals

    def _hop_tokens(self, hop_s) -> int:
        """``embed_frames(hop_s=...)``: the hop between overlapping windows in whole tokens, checked."""
        cfg = self.config
        token_s = token_seconds(cfg.patch_w)
        window = cfg.max_tokens
        valid = isinstance(hop_s, (int, float, np.integer, np.floating)) and not isinstance(hop_s, bool)
        hop_tokens = round(float(hop_s) / token_s) if valid and np.isfinite(hop_s) else 0
        if not 1 <= hop_tokens <= window:
            raise ValueError(
                f"hop_s must be a number of seconds between {token_s:g} and {window * token_s:g} (one token to one "
                f"window), or None for the official non-overlapping chunks; got {hop_s!r}"
            )
        return hop_tokens
