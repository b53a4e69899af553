"""Embed a folder of audio files: resumable, failure-tolerant, batched, shardable.

``embed_folder(INPUT, OUT)`` (and the ``atst-features embed`` command over it) writes one
``.npz`` per input file under OUT, mirroring the input tree (``a/b.wav`` -> ``OUT/a/b.wav.npz``),
with the arrays

- ``clip``: (C,) float32 clip vector (``ATSTModel.embed_clip`` of the clip layers);
- ``frames``: (T', L * D) frame embeddings, float16 by default (``ATSTModel.embed_frames``);
- ``timestamps``: (T',) float64 seconds, the start of each 40 ms token;

plus ``OUT/index.jsonl`` (one JSON row per input: status ``ok`` | ``skipped`` | ``failed`` and
what is known of it) and ``OUT/metadata.json`` (model, source, weights hash, layers, dtypes, version).

How it stays fast and safe:

- Decoding and resampling run in ``torch.utils.data.DataLoader`` workers; files are processed in
  order of size so neighbours in a batch have similar lengths; chunks of several files share an
  encoder batch; on CUDA the pieces come through pinned memory with non-blocking copies.
- One run writes an output folder at a time (an OS lock, ``folder.FolderLock``; shards of one run
  share it); a second run is refused at once.
- Every output is streamed into a new temporary file beside it (exclusive, no-follow, random name:
  ``atomic.AtomicFile``) and renamed with ``os.replace``, so a killed run never leaves a truncated
  ``.npz`` and no link is written through; the next run removes a killed run's temporary files.
  A rerun skips inputs whose row in the index is ``ok`` with the same size, mtime and settings,
  and whose output is the file the row recorded (size and a digest of its two ends).
- A file that cannot be decoded is recorded as ``failed`` with its error and the run goes on;
  CUDA out-of-memory halves the batch and retries; a full disk stops the run cleanly.
- Files longer than ``stream_seconds`` are decoded in blocks, twice (``pieces.streamed_pieces``):
  a first pass finds the loudest mel frame (the 80 dB floor of the front end is taken over the
  whole file), a second embeds windows of whole 1001-frame chunks, each computed from its samples
  plus the STFT context (``frontend.frame_segment``). Memory stays bounded and the result equals
  the whole-file API.

One job per module:

- ``discovery``: which files (``find_inputs``, ``find_inputs_many`` for several INPUTs), their
  outputs, shards (``parse_shard``, ``shard_of``);
- ``index``: the settings key, ``metadata.json``, ``index.jsonl`` rows, output digests, ``BatchSummary``;
- ``folder``: the output folder's lock, leftovers, output folders and start errors;
- ``embedder``: ``Embedder``, the run's settings on waveforms in memory;
- ``decode``: files -> pieces in DataLoader workers;
- ``sinks``: the streaming ``.npz`` writer (``NpzSink``);
- ``run``: ``embed_folder``;
- ``read``: a run read back (``read_embeddings``) or gathered into one Parquet table (``to_parquet``).

The command line (``atst-features embed``) is in ``atst_features.cli``.
"""

from ..audio import AUDIO_EXTENSIONS, is_audio_path
from ..chunks import EmbedResult
from .discovery import (
    LIST_EXTENSIONS,
    OUTPUT_SUFFIX,
    ContainersSkipped,
    InputFile,
    Inputs,
    find_inputs,
    find_inputs_many,
    parse_shard,
    shard_of,
)
from .embedder import WHAT, Embedder
from .folder import FolderBusy, OutputFolderError
from .index import (
    FORMAT_VERSION,
    INDEX_NAME,
    METADATA_NAME,
    BatchSummary,
    printable,
    read_index,
    weights_sha256,
)
from .read import PARQUET_NAME, Frames, read_embeddings, to_parquet
from .run import embed_folder
from .sinks import PARTIAL_SUFFIX, NpzSink

__all__ = [
    "AUDIO_EXTENSIONS",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "LIST_EXTENSIONS",
    "METADATA_NAME",
    "OUTPUT_SUFFIX",
    "PARQUET_NAME",
    "PARTIAL_SUFFIX",
    "WHAT",
    "BatchSummary",
    "ContainersSkipped",
    "EmbedResult",
    "Embedder",
    "FolderBusy",
    "Frames",
    "InputFile",
    "Inputs",
    "NpzSink",
    "OutputFolderError",
    "embed_folder",
    "find_inputs",
    "find_inputs_many",
    "is_audio_path",
    "parse_shard",
    "printable",
    "read_embeddings",
    "read_index",
    "shard_of",
    "to_parquet",
    "weights_sha256",
]
