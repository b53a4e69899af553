"""The precisions the package speaks of, by name: one table for the encoder, one for stored frames.

The front end and LayerNorm statistics are float32 whatever the encoder precision; clip vectors
are always stored in float32.
"""

from __future__ import annotations

import numpy as np
import torch

#: Encoder precisions.
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Storage precisions of frame embeddings in files (numpy has no bfloat16).
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_NUMPY = {torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32)}


def resolve_dtype(dtype: str | torch.dtype, table: dict[str, torch.dtype] = COMPUTE_DTYPES, what: str = "dtype") -> torch.dtype:
    """A torch dtype of ``table`` from its name or itself; a clear ``ValueError`` for anything else."""
    for name, value in table.items():
        if dtype is value or (isinstance(dtype, str) and dtype == name):
            return value
    raise ValueError(f"{what}={dtype!r} is not supported; use one of {', '.join(table)} (a name or torch dtype)")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a storage precision (``STORAGE_DTYPES``)."""
    return _NUMPY[dtype]
