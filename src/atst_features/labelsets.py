"""Class-name lists shipped with the package (``labels/``), read by name.

A classification head emits its scores in a fixed class order; the manifest and the checkpoint
layouts name the list a head uses (``"audioset-strong-447"``, ``"audioset-527"``), and the list is
only attached to a head whose width matches it. Sources and licences: ``labels/README.md``.
"""

from __future__ import annotations

import csv
import io
from functools import lru_cache
from importlib import resources

# name -> (file in labels/, number of classes it must hold)
LABEL_SETS: dict[str, tuple[str, int]] = {
    "audioset-strong-447": ("audioset_strong_447.txt", 447),
    "audioset-527": ("audioset_527_class_labels_indices.csv", 527),
}


@lru_cache(maxsize=None)
def _read(name: str) -> tuple[str, ...]:
    filename, count = LABEL_SETS[name]
    text = resources.files(__package__).joinpath("labels", filename).read_text(encoding="utf-8")
    if filename.endswith(".csv"):  # index,mid,display_name: names in index order
        rows = list(csv.DictReader(io.StringIO(text)))
        if [int(r["index"]) for r in rows] != list(range(len(rows))):
            raise RuntimeError(f"the bundled {filename} is not in index order")
        names = tuple(r["display_name"] for r in rows)
    else:
        names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != count:  # the package data is damaged
        raise RuntimeError(f"the bundled label set {name!r} holds {len(names)} names, expected {count}")
    return names


def label_set(name: str) -> list[str]:
    """The class names of a bundled label set, in score order (a new list on each call).

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    if name not in LABEL_SETS:
        raise KeyError(f"{name!r} is not a bundled label set; known: {', '.join(sorted(LABEL_SETS))}")
    return list(_read(name))


def label_set_size(name: str) -> int:
    """The number of classes of a bundled label set (without reading it)."""
    if name not in LABEL_SETS:
        raise KeyError(f"{name!r} is not a bundled label set; known: {', '.join(sorted(LABEL_SETS))}")
    return LABEL_SETS[name][1]
