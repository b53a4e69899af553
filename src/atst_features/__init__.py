"""atst-features: exact, fast embeddings from the ATST audio transformers (ATST-Clip, ATST-Frame, ATST-C2F)."""

from .audio import load_audio
from .api import embed_clip, embed_frames
from .embed import ATSTModel, FrameEmbeddings
from .model import ATSTConfig, ATSTEncoder
from .weights import convert_checkpoint, download, list_models, load

__version__ = "0.1.0"

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
    "__version__",
]
