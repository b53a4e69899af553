"""Embedding: inputs -> waveforms -> log-mel -> chunked encoder passes -> pooled results.

``ATSTModel`` wraps a loaded encoder with ``embed_clip`` and ``embed_frames``; the module-level
``embed_clip`` / ``embed_frames`` do the same with a default model loaded once and cached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Union

import numpy as np
import torch

from . import frontend, pooling
from .audio import load_audio, prepare_waveform
from .dtypes import COMPUTE_DTYPES, resolve_dtype
from .heads import ClassificationHead
from .model import ATSTConfig, ATSTEncoder

DEFAULT_MODEL = "atst-frame-base"

AudioInput = Union[str, os.PathLike, np.ndarray, torch.Tensor]
Layers = Union[str, int, Sequence[int]]



def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device from its name, checked: CUDA must be available when asked for."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device (use e.g. 'cpu', 'cuda', 'cuda:1'): {e}") from None
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


def _flatten_inputs(audio, sample_rate) -> tuple[list[torch.Tensor], list[tuple[str, int]], bool]:
    """Inputs -> (1-D 16 kHz waveforms, one (kind, count) per input item, is_list).

    kind is "one" (a file or a 1-D array) or "batch" (a 2-D array of ``count`` clips).
    """
    is_list = isinstance(audio, (list, tuple))
    items = list(audio) if is_list else [audio]
    if is_list and not items:
        raise ValueError("the input list is empty; pass at least one waveform or file path")
    wavs: list[torch.Tensor] = []
    layout: list[tuple[str, int]] = []
    for k, item in enumerate(items):
        what = f"input {k}" if is_list else "audio"
        if _is_path(item):
            wavs.append(prepare_waveform(load_audio(item), frontend.SAMPLE_RATE, f"{what} ({item})"))
            layout.append(("one", 1))
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            if item.ndim == 1:
                wavs.append(prepare_waveform(item, sample_rate, what))
                layout.append(("one", 1))
            elif item.ndim == 2:
                if item.shape[0] == 0:
                    raise ValueError(f"{what} is an empty batch (shape {tuple(item.shape)})")
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
        device, dtype: where and in what precision the encoder runs; the front end is float32.
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
        self._forward = self.encoder  # the encoder, or its torch.compile'd form after compile()

    def compile(self, **kwargs) -> "ATSTModel":
        """Run the encoder through ``torch.compile(encoder, dynamic=True, **kwargs)``; returns self.

        The first calls compile (tens of seconds; again for new batch shapes); results equal the
        eager encoder to float rounding. Worth it for long GPU jobs, not for a few clips.
        """
        kwargs.setdefault("dynamic", True)
        self._forward = torch.compile(self.encoder, **kwargs)
        return self

    def encode(self, mel: torch.Tensor, n_tokens: torch.Tensor | None, blocks: list[int]) -> torch.Tensor:
        """The encoder pass (compiled after ``compile()``): ``ATSTEncoder.forward``.

        mel (B, n_mels, T <= spec_w) on the model's device; n_tokens (B,) valid tokens, or ``None``
        when no item is padded (the fused-attention path); returns (B, len(blocks), N, D).
        """
        return self._forward(mel, n_tokens, blocks)

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
        """Move the encoder (and head) to ``device`` and/or cast it to ``dtype`` (see ``COMPUTE_DTYPES``); returns self."""
        device = None if device is None else resolve_device(device)
        dtype = None if dtype is None else resolve_dtype(dtype)
        self.encoder.to(device=device, dtype=dtype)
        if self.head is not None:
            self.head.to(device=device)
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
        blocks = resolve_layers(layers, self.config.depth)
        clips, _ = self._embed(wavs, blocks, want_clip=True, want_frames=False, batch_size=batch_size)
        return _regroup(clips, layout, is_list, torch.stack)

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
        wavs, layout, is_list = _flatten_inputs(audio, sample_rate)
        blocks = resolve_layers(layers, self.config.depth)
        if hop_s is None:
            _, frames = self._embed(wavs, blocks, want_clip=False, want_frames=True, batch_size=batch_size)
        else:
            frames = self._overlapping_frames(wavs, blocks, hop_s, batch_size)

        def stack(items: list[FrameEmbeddings]) -> FrameEmbeddings:
            return FrameEmbeddings(torch.stack([f.embeddings for f in items]), items[0].timestamps)

        return _regroup(frames, layout, is_list, stack)

    def tag(self, audio: AudioInput | list, sample_rate: float | None = None, *, batch_size: int = 16):
        """Class probabilities from the checkpoint's classification head (``heads.tag``).

        Returns ``heads.Tags``: scores (C,) for a clip-level head, or (T', C) with timestamps (T',)
        seconds for a frame-level head; labels when the checkpoint's class names are known.
        """
        from .heads import tag

        return tag(self, audio, sample_rate, batch_size=batch_size)

    # ---------------------------------------------------------------- internals

    def _embed(self, wavs: list[torch.Tensor], blocks: list[int], want_clip: bool, want_frames: bool, batch_size: int):
        mels, n_frames = self._log_mels(wavs, batch_size)
        cfg = self.config
        clips = frames = None
        if want_frames or (want_clip and not cfg.has_cls):
            plan = [pooling.frame_chunks(i, int(n), cfg.spec_w, cfg.patch_w) for i, n in enumerate(n_frames)]
            outs = self._encode(mels, plan, blocks, batch_size, keep_tokens=want_frames)
            if want_frames:
                frames = [self._frames(chunks, out) for chunks, out in zip(plan, outs)]
            if want_clip and not cfg.has_cls:
                clips = [pooling.frame_clip_vector([o["sum"] for o in out], chunks) for chunks, out in zip(plan, outs)]
        if want_clip and cfg.has_cls:
            plan = [pooling.clip_chunks(i, int(n), cfg.clip_chunk_frames, cfg.patch_w) for i, n in enumerate(n_frames)]
            outs = self._encode(mels, plan, blocks, batch_size, keep_tokens=False)
            clips = [
                pooling.clip_clip_vector([o["cls"] for o in out], [o["sum"] for o in out], chunks)
                for chunks, out in zip(plan, outs)
            ]
        return clips, frames

    def _log_mels(self, wavs: list[torch.Tensor], batch_size: int) -> tuple[list[torch.Tensor], list[int]]:
        """Per item (64, T) log-mel on the model's device, computed in length-sorted padded batches."""
        check_batch_size(batch_size)
        order = sorted(range(len(wavs)), key=lambda i: wavs[i].shape[0])
        mels: list[torch.Tensor | None] = [None] * len(wavs)
        n_frames = [0] * len(wavs)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            lengths = torch.tensor([wavs[i].shape[0] for i in idx])
            batch = torch.nn.utils.rnn.pad_sequence([wavs[i] for i in idx], batch_first=True).to(self.device)
            mel, nf = frontend.log_mel(batch, lengths)
            for j, i in enumerate(idx):
                n_frames[i] = int(nf[j])
                mels[i] = mel[j, :, : n_frames[i]]
        return mels, n_frames

    @torch.inference_mode()
    def _encode(self, mels, plan: list[list[pooling.Chunk]], blocks: list[int], batch_size: int, keep_tokens: bool):
        """Encode every chunk of ``plan`` in length-sorted batches; per chunk keep the normed
        [CLS] output, the sum of the normed tokens and (if asked) the tokens, all float32 (L, ...)."""
        cfg = self.config
        chunks = sorted((c for item in plan for c in item), key=lambda c: -c.frames)
        results: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        skip = int(cfg.has_cls)
        for s in range(0, len(chunks), batch_size):
            group = chunks[s : s + batch_size]
            width = group[0].frames
            mel = mels[0].new_zeros(len(group), cfg.n_mels, width)
            for j, c in enumerate(group):
                mel[j, :, : c.frames] = mels[c.item][:, c.start : c.start + c.frames]
            n_tokens = torch.tensor([c.tokens for c in group], device=self.device)
            padded = any(c.tokens < group[0].tokens for c in group)  # group[0] is the widest
            out = self.encode(mel, n_tokens if padded else None, blocks).float()  # (b, L, N, D)
            patches = out[:, :, skip:]  # (b, L, P, D)
            valid = torch.arange(patches.shape[2], device=out.device)[None, :] < n_tokens[:, None]  # (b, P)
            sums = (patches * valid[:, None, :, None]).sum(dim=2).cpu()  # (b, L, D): one copy per batch
            cls = out[:, :, 0].cpu() if skip else None
            tokens = patches.cpu() if keep_tokens else None
            for j, c in enumerate(group):
                r = {"sum": sums[j]}
                if cls is not None:
                    r["cls"] = cls[j]
                if tokens is not None:
                    r["tokens"] = tokens[j, :, : c.tokens]  # (L, tokens, D)
                results[(c.item, c.index)] = r
        return [[results[(c.item, c.index)] for c in item] for item in plan]

    def _frames(self, chunks: list[pooling.Chunk], outs: list[dict]) -> FrameEmbeddings:
        cfg = self.config
        n_blocks = outs[0]["tokens"].shape[0] if outs else 0
        if not outs:  # unreachable for inputs >= MIN_SAMPLES, kept for clarity
            return FrameEmbeddings(torch.zeros(0, n_blocks * cfg.embed_dim), torch.zeros(0, dtype=torch.float64))
        emb = torch.cat([o["tokens"] for o in outs], dim=1)  # (L, T', D)
        emb = emb.permute(1, 0, 2).reshape(emb.shape[1], -1)  # (T', L * D), block-major features
        return FrameEmbeddings(emb, pooling.token_times(chunks, cfg.patch_w))

    def _overlapping_frames(self, wavs: list[torch.Tensor], blocks: list[int], hop_s, batch_size: int) -> list[FrameEmbeddings]:
        """``embed_frames(hop_s=...)``: overlapping windows on one token grid (``pooling.frame_windows``)."""
        cfg = self.config
        token_s = cfg.patch_w * frontend.HOP_LENGTH / frontend.SAMPLE_RATE
        window = cfg.spec_w // cfg.patch_w
        valid = isinstance(hop_s, (int, float, np.integer, np.floating)) and not isinstance(hop_s, bool)
        hop_tokens = round(float(hop_s) / token_s) if valid and np.isfinite(hop_s) else 0
        if not 1 <= hop_tokens <= window:
            raise ValueError(
                f"hop_s must be a number of seconds between {token_s:g} and {window * token_s:g} (one token to one "
                f"window), or None for the official non-overlapping chunks; got {hop_s!r}"
            )
        mels, n_frames = self._log_mels(wavs, batch_size)
        plan = [pooling.frame_windows(i, n, cfg.spec_w, cfg.patch_w, hop_tokens) for i, n in enumerate(n_frames)]
        outs = self._encode(mels, plan, blocks, batch_size, keep_tokens=True)
        frames = []
        for windows, out, n in zip(plan, outs, n_frames):
            n_tokens = n // cfg.patch_w
            which, offset = pooling.central_window(windows, n_tokens, cfg.patch_w)
            first = torch.tensor([0] + [w.tokens for w in windows[:-1]]).cumsum(0)  # (K,) start in the concatenation
            tokens = torch.cat([o["tokens"] for o in out], dim=1)[:, first[which] + offset]  # (L, T', D)
            emb = tokens.permute(1, 0, 2).reshape(n_tokens, -1)  # (T', L * D), block-major features
            starts = cfg.patch_w * torch.arange(n_tokens, dtype=torch.float64)  # first mel frame of each token
            frames.append(FrameEmbeddings(emb, starts * frontend.HOP_LENGTH / frontend.SAMPLE_RATE))
        return frames


@lru_cache(maxsize=4)
def _cached_model(source: str, device: str) -> ATSTModel:
    from .weights import load

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
