"""Where weights come from: a converted directory, an official checkpoint file, the Hub, or a name.

A converted model is a directory with ``config.json`` (an ``ATSTConfig``) and ``model.safetensors``
(our parameter names). Everything else is turned into that by ``convert.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import convert
from .embed import ATSTModel
from .model import ATSTConfig, ATSTEncoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_PATH = Path(__file__).with_name("weights_manifest.json")
HF_SCHEME = "hf://"


def manifest() -> dict:
    """The registry of published checkpoints (``weights_manifest.json``), keyed by name."""
    with open(MANIFEST_PATH, encoding="utf-8") as f:
        return {entry["name"]: entry for entry in json.load(f)["models"]}


# ---------------------------------------------------------------------------- reading official files


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read an official checkpoint (a torch pickle or a safetensors file) without running arbitrary code.

    Torch pickles are read with ``weights_only=True`` plus an allow-list of the few plain globals
    that the official files contain (``argparse.Namespace`` and NumPy scalars/dtypes).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    import argparse

    import numpy as np

    allowed = [argparse.Namespace, np.dtype, np.core.multiarray.scalar] if hasattr(np, "core") else [argparse.Namespace]
    allowed += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # the pickle error names the global that is not allowed
        raise convert.CheckpointError(f"cannot read {str(path)!r} as an ATST checkpoint: {e}") from None


def official_to_converted(
    ckpt: dict, family: str | None = None, num_heads: int | None = None
) -> tuple[ATSTConfig, dict[str, torch.Tensor]]:
    """A loaded official checkpoint (any supported layout) -> (config, our encoder state dict)."""
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt.get("hyper_parameters"), dict) else {}
    sd = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
    arch = hparams.get("arch")
    for prefix in ("model.teacher.encoder.", ""):
        enc = convert.strip_prefix(sd, prefix) if prefix else dict(sd)
        if prefix and not enc:
            continue
        return convert.convert_encoder(enc, family=family, num_heads=num_heads, arch=arch)
    raise convert.CheckpointError("no ATST encoder found in the checkpoint")


def save_converted(cfg: ATSTConfig, state_dict: dict[str, torch.Tensor], out_dir: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` to ``out_dir`` (created); returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
    return out


def convert_checkpoint(
    src: str | os.PathLike, out_dir: str | os.PathLike, family: str | None = None, num_heads: int | None = None
) -> Path:
    """Convert an official ATST checkpoint file to ``out_dir/config.json`` + ``out_dir/model.safetensors``.

    Args:
        src: the official file (.ckpt / .pth / .safetensors).
        out_dir: directory to write (created).
        family: "clip" or "frame"; inferred from the keys when omitted.
        num_heads: attention heads; inferred from the checkpoint's arch or width when omitted.
    """
    cfg, sd = official_to_converted(read_checkpoint(src), family=family, num_heads=num_heads)
    return save_converted(cfg, sd, out_dir)


# ---------------------------------------------------------------------------- building models


def build(cfg: ATSTConfig, state_dict: dict[str, torch.Tensor], name: str | None = None) -> ATSTModel:
    """An ``ATSTModel`` from a config and our state dict (strict load)."""
    encoder = ATSTEncoder(cfg)
    encoder.load_state_dict(state_dict, strict=True)
    return ATSTModel(encoder, name=name)


def load_converted(directory: str | os.PathLike) -> ATSTModel:
    """Load a converted model directory (``config.json`` + ``model.safetensors``)."""
    directory = Path(directory)
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / fname).is_file():
            raise FileNotFoundError(f"{str(directory)!r} has no {fname}; a converted model directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    cfg = ATSTConfig.from_json(directory / CONFIG_NAME)
    return build(cfg, load_file(str(directory / WEIGHTS_NAME)), name=str(directory))


def _load_hub(spec: str) -> ATSTModel:
    """``hf://org/repo[@revision]`` -> the converted model stored in that Hub repository."""
    from huggingface_hub import hf_hub_download

    repo, _, revision = spec[len(HF_SCHEME) :].partition("@")
    paths = [hf_hub_download(repo, f, revision=revision or None) for f in (CONFIG_NAME, WEIGHTS_NAME)]
    return load_converted(Path(paths[0]).parent)


def cache_dir() -> Path:
    """Where converted models are cached: ``$ATST_FEATURES_CACHE``, else ``$XDG_CACHE_HOME/atst-features``."""
    if os.environ.get("ATST_FEATURES_CACHE"):
        return Path(os.environ["ATST_FEATURES_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atst-features"


def _load_named(name: str) -> ATSTModel:
    """A manifest name -> its converted copy in the cache."""
    local = cache_dir() / name
    if (local / CONFIG_NAME).is_file():
        model = load_converted(local)
        model.name = name
        return model
    url = manifest()[name].get("source", {}).get("url")
    raise FileNotFoundError(
        f"model {name!r} is not in the cache ({local}); download the official file from {url} and run "
        f"`atst-features convert FILE {local}`"
    )


def load(
    source: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ATSTModel:
    """Load an ATST encoder for embedding, in ``eval()`` mode.

    Args:
        source: a name from the manifest (``atst_features.list_models()``), a converted directory,
            an official checkpoint file (converted on the fly), or ``"hf://org/repo[@revision]"``.
        device: where the encoder runs (never chosen for you).
        dtype: encoder precision (float32, or bfloat16 / float16 for speed); the front end and
            LayerNorm statistics stay float32.
    """
    if isinstance(source, str) and source.startswith(HF_SCHEME):
        model = _load_hub(source)
    elif Path(source).is_dir():
        model = load_converted(source)
    elif Path(source).is_file():
        model = build(*official_to_converted(read_checkpoint(source)), name=str(source))
    elif isinstance(source, str) and source in manifest():
        model = _load_named(source)
    else:
        raise FileNotFoundError(
            f"{str(source)!r} is not a model name, a directory or a file; known names: {', '.join(sorted(manifest()))}"
        )
    return model.to(device=device, dtype=dtype)
