"""Shared fixtures: the official reference tensors and the tiny reference encoders, loaded through the public API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import atst_features as af

DATA = Path(__file__).parent / "data"
CLIPS = ["short_0.37s", "chirp_3s", "exact_10s", "two_chunks_13.3s", "long_25s"]
TINY_HEADS = 3  # the tiny reference encoders: embed_dim 48, 3 heads (not inferable from the width)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "tiny48_reference.safetensors"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """The official tiny encoders converted to model directories with ``af.convert_checkpoint``."""
    root = tmp_path_factory.mktemp("tiny48")
    return {
        family: af.convert_checkpoint(DATA / f"tiny48_{family}_weights.safetensors", root / family, num_heads=TINY_HEADS)
        for family in ("frame", "clip")
    }


@pytest.fixture(scope="session")
def frame_model(tiny_dirs) -> af.ATSTModel:
    return af.load(tiny_dirs["frame"])


@pytest.fixture(scope="session")
def clip_model(tiny_dirs) -> af.ATSTModel:
    return af.load(tiny_dirs["clip"])


@pytest.fixture(scope="module")
def scan_cache(tmp_path_factory):
    """The cache (and so training's data-scan cache) of a module's runs in a temporary directory, not ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("ATST_FEATURES_CACHE", str(cache))
        yield cache
