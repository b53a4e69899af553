"""atst-features: exact, fast embeddings from the ATST audio transformers (ATST-Clip, ATST-Frame, ATST-C2F)."""

from .audio import load_audio
from .api import embed_clip, embed_frames
from .embed import ATSTModel, FrameEmbeddings
from .model import ATSTConfig, ATSTEncoder
from .weights import convert_checkpoint, download, list_models, load

from .version import __version__


def read_embeddings(out, what: str = "clip"):
    """The embeddings an ``atst-features embed`` run wrote to ``out``: (paths, (N, C) float32 clip
    matrix) for ``what="clip"``, (paths, lazy per-file frames) for ``"frames"``. See
    ``atst_features.batch.read.read_embeddings`` (imported on first call)."""
    from .batch.read import read_embeddings as read

    return read(out, what)

__all__ = [
    "ATSTConfig",
    "ATSTEncoder",
    "ATSTModel",
    "FrameEmbeddings",
    "convert_checkpoint",
    "download",
    "embed_clip",
    "embed_frames",
    "list_models",
    "load",
    "load_audio",
    "read_embeddings",
    "__version__",
]
