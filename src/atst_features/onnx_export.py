"""CPU deployment: the encoder as an ONNX graph, run by ONNX Runtime behind ``ATSTModel.encode``.

- ``export_onnx(encoder, path)`` writes one graph of the encoder: inputs ``mel`` (B, n_mels, T)
  float32 and ``n_tokens`` (B,) int64 (valid tokens per chunk; the padding mask is built inside
  the graph), output ``features`` (B, L, N, D): the normed output of every exported block, N = P
  (+1 for ATST-Clip's [CLS], first). B and T are dynamic (T <= ``spec_w``). ``int8=True``
  quantizes its matrix multiplications with constant weights to int8 (ONNX Runtime's dynamic
  quantization, per output channel); attention scores and norms stay float32. The config, the
  exported blocks and the weights' sha256 are stored in the graph's metadata.
- ``OnnxForward(graph)`` runs a graph in an ONNX Runtime session with the signature and result of
  ``ATSTEncoder.forward_intermediates``: the hook ``ATSTModel.encode`` passes to the one chunk
  engine, so chunking, batching by width and pooling stay the engine's.
- ``attach_backend(model, "onnxruntime" | "onnxruntime-int8" | "torch")`` exports once, caches the graph (in
  ``onnx/`` beside the converted weights, keyed by the weights' sha256, config, blocks, opset and
  int8, and checked against its recorded sha256 on every use) and installs its forward.

onnx, onnxruntime and onnxscript are the ``[onnx]`` extra; they are imported when used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .artifacts import sha256_file
from .atomic import atomic_write, write_text_atomic
from .model import ATSTConfig, ATSTEncoder, Intermediates

if TYPE_CHECKING:
    from .embed import ATSTModel

BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")  # what ATSTModel.encode can run on; "torch" is the encoder itself
DEFAULT_OPSET = 18
GRAPH_FORMAT = 1  # bump when the exported graph changes: cached graphs of another format are redone
GRAPH_DIR = "onnx"  # beside the converted weights: <model dir>/onnx/<key>.onnx + <key>.json
INPUTS, OUTPUT = ("mel", "n_tokens"), "features"
_META = "atst_features."  # prefix of the graph's metadata keys
_EXTRA = "pip install 'atst-features[onnx]'"


def _require(module: str):
    """Import an optional dependency of the ``[onnx]`` extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"the ONNX backend needs {module.split('.')[0]}: {_EXTRA} ({e})") from e


def require_runtime() -> None:
    """Raise ``ImportError`` naming the ``onnx`` extra unless its packages can be imported."""
    for module in ("onnxruntime", "onnx", "onnxscript"):
        _require(module)


def check_backend(backend: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """A backend name of ``BACKENDS``, checked against where the encoder runs: the ONNX backends
    run float32 (or int8) graphs on the CPU."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; use one of {', '.join(BACKENDS)}")
    if backend != "torch" and (torch.device(device).type != "cpu" or dtype != torch.float32):
        raise ValueError(
            f"backend={backend!r} runs on the CPU in float32 (int8 inside the graph); got device={str(device)!r}, "
            f"dtype={dtype}. Use device='cpu', dtype=torch.float32, or backend='torch'"
        )
    return backend


# ============================================================================ export


class _Graph(nn.Module):
    """What is exported: (mel, n_tokens) -> the normed outputs of ``blocks``, (B, L, N, D)."""

    def __init__(self, encoder: ATSTEncoder, blocks: list[int]):
        super().__init__()
        self.encoder, self.blocks = encoder, blocks

    def forward(self, mel: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(mel, n_tokens, self.blocks)


@contextlib.contextmanager
def _quiet():
    """The exporter's and quantizer's warnings and progress logs, silenced for one export (the
    logging setup is restored; onnxruntime's quantizer logs through the root logger, which would
    otherwise install a handler there)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    root, null = logging.getLogger(), logging.NullHandler()

    def from_elsewhere(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname

    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        root.addHandler(null)
        root.addFilter(from_elsewhere)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(from_elsewhere)
        root.removeHandler(null)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(
    encoder: ATSTEncoder,
    path: str | os.PathLike,
    *,
    blocks: list[int] | None = None,
    opset: int = DEFAULT_OPSET,
    int8: bool = False,
    weights_sha256: str | None = None,
) -> Path:
    """Write ``encoder`` as an ONNX graph (see the module docstring); returns ``path``.

    Args:
        encoder: a float32 ``ATSTEncoder`` on the CPU.
        path: the ``.onnx`` file to write (in one step; its folder must exist).
        blocks: 0-based blocks the graph outputs, in this order (default: all of them).
        opset: ONNX opset of the graph.
        int8: quantize the weight matrix multiplications to int8 (dynamic, per channel).
        weights_sha256: recorded in the graph's metadata (provenance).
    """
    cfg = encoder.cfg
    blocks = list(range(cfg.depth)) if blocks is None else [int(b) for b in blocks]
    if not blocks or min(blocks) < 0 or max(blocks) >= cfg.depth or len(set(blocks)) != len(blocks):
        raise ValueError(f"blocks must be distinct 0-based indices below {cfg.depth}, got {blocks}")
    if encoder.pos_embed.dtype != torch.float32 or encoder.pos_embed.device.type != "cpu":
        raise ValueError(f"export a float32 encoder on the CPU, got {encoder.pos_embed.dtype} on {encoder.pos_embed.device}")
    _require("onnxscript")
    onnx = _require("onnx")
    batch = torch.export.Dim("batch", min=1)
    frames = torch.export.Dim("frames", min=cfg.patch_w, max=cfg.spec_w)
    example = (torch.zeros(2, cfg.n_mels, cfg.spec_w), torch.tensor([cfg.max_tokens, 1]))
    was_training = encoder.training
    encoder.eval()
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                _Graph(encoder, blocks).eval(), example, dynamo=True, verbose=False, opset_version=opset,
                input_names=list(INPUTS), output_names=[OUTPUT],
                dynamic_shapes={"mel": {0: batch, 2: frames}, "n_tokens": {0: batch}},
            )
    finally:
        encoder.train(was_training)
    graph = program.model_proto
    meta = {"format": GRAPH_FORMAT, "config": cfg.to_dict(), "blocks": blocks, "int8": bool(int8), "opset": opset}
    meta["weights_sha256"] = weights_sha256
    for key, value in meta.items():
        graph.metadata_props.add(key=_META + key, value=json.dumps(value))
    if not int8:
        return atomic_write(path, lambda tmp: onnx.save(graph, str(tmp)))
    quantization = _require("onnxruntime.quantization")
    with tempfile.TemporaryDirectory(prefix="atst-onnx-") as tmp_dir:
        fp32 = Path(tmp_dir) / "fp32.onnx"
        onnx.save(graph, str(fp32))
        with _quiet():
            return atomic_write(
                path,
                lambda tmp: quantization.quantize_dynamic(
                    fp32, tmp, weight_type=quantization.QuantType.QInt8, per_channel=True
                ),
            )


def graph_metadata(path: str | os.PathLike) -> dict:
    """What ``export_onnx`` recorded in a graph: format, config, blocks, int8, opset, weights_sha256."""
    onnx = _require("onnx")
    graph = onnx.load(str(path), load_external_data=False)
    return {p.key[len(_META) :]: json.loads(p.value) for p in graph.metadata_props if p.key.startswith(_META)}


# ============================================================================ the ONNX Runtime forward


class OnnxForward:
    """An exported graph in an ONNX Runtime session, called like ``ATSTEncoder.forward_intermediates``.

    Args:
        graph: an ``export_onnx`` file.
        threads: intra-op threads (default ``torch.get_num_threads()``, the encoder's).

    Attributes:
        config: the encoder's ``ATSTConfig``; blocks: the blocks the graph outputs; int8: whether
        it is quantized (all read from the graph's metadata).
    """

    def __init__(self, graph: str | os.PathLike, threads: int | None = None):
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        stored = self.session.get_modelmeta().custom_metadata_map
        meta = {k[len(_META) :]: json.loads(v) for k, v in stored.items() if k.startswith(_META)}
        if meta.get("format") != GRAPH_FORMAT:
            raise ValueError(f"{str(graph)!r} is not a graph of this version's export_onnx (format {GRAPH_FORMAT})")
        self.config = ATSTConfig.from_dict(meta["config"])
        self.blocks: list[int] = meta["blocks"]
        self.int8: bool = meta["int8"]

    def __call__(
        self, mel: torch.Tensor, n_tokens: torch.Tensor | None = None, blocks: list[int] | None = None
    ) -> Intermediates:
        """mel (B, n_mels, T), n_tokens (B,) or ``None`` (every token valid), blocks (default the
        last) -> ``Intermediates`` (cls (B, L, D) or ``None``, tokens (B, L, P, D)), float32 CPU tensors."""
        cfg = self.config
        blocks = [cfg.depth - 1] if blocks is None else list(blocks)
        missing = [b for b in blocks if b not in self.blocks]
        if missing:
            raise ValueError(f"blocks {missing} were not exported; this graph gives blocks {self.blocks}")
        x = np.ascontiguousarray(mel.detach().cpu().numpy(), dtype=np.float32)  # (B, M, T)
        if n_tokens is None:
            n = np.full(x.shape[0], x.shape[-1] // cfg.patch_w, dtype=np.int64)
        else:
            n = n_tokens.detach().cpu().numpy().astype(np.int64)
        (out,) = self.session.run([OUTPUT], {INPUTS[0]: x, INPUTS[1]: n})  # (B, L_graph, N, D)
        positions = [self.blocks.index(b) for b in blocks]
        out = torch.from_numpy(out if positions == list(range(out.shape[1])) else out[:, positions])  # (B, L, N, D)
        if not cfg.has_cls:
            return Intermediates(None, out)
        return Intermediates(out[:, :, 0], out[:, :, 1:])


# ============================================================================ the cache and the backend


def _state_sha256(encoder: ATSTEncoder) -> str:
    """The sha256 of an encoder's tensors (names, shapes, dtypes, values): the key of a model
    that was not read from a file."""
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def graph_key(config: ATSTConfig, weights_sha256: str, blocks: list[int], opset: int, int8: bool) -> str:
    """The cache key of a graph: sha256 of what it is made from (24 hex digits)."""
    parts = {"format": GRAPH_FORMAT, "config": config.to_dict(), "weights_sha256": weights_sha256}
    parts |= {"blocks": blocks, "opset": opset, "int8": int8}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cached_graph(
    model: ATSTModel,
    folder: str | os.PathLike,
    *,
    int8: bool = False,
    blocks: list[int] | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """The graph of ``model`` in ``folder`` (``KEY.onnx`` with ``KEY.json``, its record): reused
    when its sha256 matches the record, else exported anew. Keyed by ``graph_key`` (the weights'
    sha256 is ``model.weights_sha256``, or the hash of the encoder's tensors when unknown)."""
    cfg = model.config
    blocks = list(range(cfg.depth)) if blocks is None else [int(b) for b in blocks]
    weights = model.weights_sha256 or _state_sha256(model.encoder)
    key = graph_key(cfg, weights, blocks, opset, int8)
    folder = Path(folder)
    graph, record = folder / f"{key}.onnx", folder / f"{key}.json"
    if graph.is_file() and record.is_file():
        try:
            if json.loads(record.read_text(encoding="utf-8")).get("sha256") == sha256_file(graph):
                return graph
        except (OSError, ValueError):
            pass  # an unreadable record: export anew
    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(model.encoder, graph, blocks=blocks, opset=opset, int8=int8, weights_sha256=weights)
    entry = {"sha256": sha256_file(graph), "weights_sha256": weights, "config": cfg.to_dict()}
    entry |= {"blocks": blocks, "opset": opset, "int8": int8, "format": GRAPH_FORMAT, "model": model.name}
    write_text_atomic(record, json.dumps(entry, indent=2) + "\n")
    return graph


def default_graph_dir(model: ATSTModel) -> Path | None:
    """Where ``attach_backend`` caches graphs by default: ``onnx/`` in the converted directory the
    model was read from, or ``None`` (a model from a checkpoint file or built in memory)."""
    if model.source is not None and Path(model.source).is_dir():
        return Path(model.source) / GRAPH_DIR
    return None


def attach_backend(
    model: ATSTModel,
    backend: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    blocks: list[int] | None = None,
    opset: int = DEFAULT_OPSET,
    threads: int | None = None,
) -> ATSTModel:
    """Run ``model``'s encoder passes on ``backend``; returns ``model``.

    Args:
        model: a float32 CPU ``ATSTModel`` (for the ONNX backends).
        backend: "onnxruntime" (the float32 graph in ONNX Runtime), "onnxruntime-int8" (its
            matrix multiplications in int8) or "torch" (the encoder itself, eager).
        cache_dir: the folder of cached graphs (default ``default_graph_dir(model)``: ``onnx/``
            beside the converted weights; with neither, the graph is exported to a temporary
            folder each time).
        blocks: the blocks the graph computes (default all); others then raise in ``encode``.
        opset: ONNX opset of the graph.
        threads: ONNX Runtime intra-op threads (default ``torch.get_num_threads()``).
    """
    check_backend(backend, model.device, model.dtype)
    if backend == "torch":
        model.choices.pop("backend", None)
        return model.use_forward(None, "torch")
    int8 = backend == "onnxruntime-int8"
    folder = Path(cache_dir) if cache_dir is not None else default_graph_dir(model)
    if folder is not None:
        try:
            graph = cached_graph(model, folder, int8=int8, blocks=blocks, opset=opset)
            model.choices["backend"] = f"{backend}: {graph}"
            return model.use_forward(OnnxForward(graph, threads), backend)
        except OSError:  # a read-only model directory, say
            warnings.warn(f"cannot write graphs into {str(folder)!r}; exporting to a temporary folder", stacklevel=2)
    with tempfile.TemporaryDirectory(prefix="atst-onnx-") as tmp_dir:
        forward = OnnxForward(cached_graph(model, tmp_dir, int8=int8, blocks=blocks, opset=opset), threads)
    model.choices["backend"] = f"{backend}: a graph exported for this process (no cache folder)"
    return model.use_forward(forward, backend)
