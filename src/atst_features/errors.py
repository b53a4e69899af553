"""The errors the loader raises, under one base: ``LoadError``.

``load``, ``download``, ``convert_checkpoint`` and the reading of model directories, manifests and
official files raise only these for problems of their input (plus ``OSError`` for the file
system), so a caller, and the command line, catches one class and prints one message:

    try:
        model = atst_features.load(name)
    except atst_features.weights.LoadError as e:
        sys.exit(f"atst-features: {e}")

Each class also derives from the built-in exception it used to be (``ValueError``,
``RuntimeError``, ``FileNotFoundError``, ``KeyError``), so older ``except`` clauses still work.
This module imports nothing.
"""

from __future__ import annotations


class LoadError(Exception):
    """Base of every error of loading a model: names, manifests, downloads, files, checks, arguments."""


class ManifestError(LoadError, ValueError):
    """A manifest entry that cannot be used as written (a name or file name that is not a plain
    name, a malformed hash or size, an unpinned Hub revision)."""


class CheckpointError(LoadError, ValueError):
    """A checkpoint or model directory that does not hold a complete, well-shaped ATST encoder in a
    known layout (or whose config is out of range)."""


class IntegrityError(LoadError, RuntimeError):
    """A file whose size or sha256 is not the one recorded or pinned for it, or a file that is
    loaded without being listed in its directory's ``checksums.json``."""


class DownloadError(LoadError, RuntimeError):
    """A named model that is not cached and cannot be fetched (offline, no network, server error,
    timeout, a refused or stalled transfer, a lock held too long)."""


class ModelNotFoundError(LoadError, FileNotFoundError):
    """A source that is neither a known name, nor an existing directory or file (or a directory
    without the files of a converted model)."""


class UnknownModelError(LoadError, KeyError):
    """A name that is not in the manifest (the message lists the known names)."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class LoadArgumentError(LoadError, ValueError):
    """An argument of ``load`` that cannot be used (a device that is not available, an unknown dtype)."""
