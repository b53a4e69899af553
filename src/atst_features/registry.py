"""The registry of published checkpoints: ``weights_manifest.json`` as typed, read-only data.

One entry per checkpoint: its name, family and architecture (``config``, an ``ATSTConfig`` dict),
the front-end contract, the embedding sizes, the classification head, where the official file
is (URL, trusted and third-party hashes), its licence and papers, and the converted files on the
Hugging Face Hub when they are published. Each entry becomes a frozen ``ModelSpec``; the entry
as written stays available as ``ModelSpec.raw`` for fields the dataclasses do not name.

The packaged manifest is read once per process; a manifest given as a path or a dict is parsed
when asked for. Pure data: this module imports nothing else of the package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

MANIFEST_PATH = Path(__file__).with_name("weights_manifest.json")

#: What a manifest argument may be: a manifest file, its content already loaded, or ``None``
#: for the packaged manifest.
ManifestSource = str | os.PathLike | Mapping[str, Any] | None

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _frozen(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only view of a mapping (``None`` -> an empty one)."""
    return MappingProxyType(dict(value)) if value else _EMPTY


@dataclass(frozen=True)
class Reported:
    """Values a third party reported for an official file: unverified, so a mismatch only warns."""

    sha256: str | None = None
    size: int | None = None  # bytes
    verified: bool = False
    by: str | None = None


@dataclass(frozen=True)
class SourceSpec:
    """Where the official file is and what it must hash to.

    Attributes:
        url: the download URL (Google Drive through gdown, or plain HTTP).
        page: a page to download it from by hand, when that differs from ``url``.
        filename: the file's name as published.
        format: its layout (a name of ``convert.LAYOUTS``).
        size, sha256: trusted values (bytes, 64 hex digits); a mismatch is an error. ``None``: unknown.
        reported: third-party values (unverified), or ``None``.
    """

    url: str | None = None
    page: str | None = None
    drive_id: str | None = None
    filename: str | None = None
    format: str | None = None
    size: int | None = None
    sha256: str | None = None
    reported: Reported | None = None
    published_in: str | None = None

    @property
    def page_or_url(self) -> str | None:
        """Where a person downloads the file by hand."""
        return self.page or self.url


@dataclass(frozen=True)
class HubSpec:
    """Converted files on the Hugging Face Hub: repository, pinned 40-hex revision, file -> sha256."""

    repo_id: str | None = None
    revision: str | None = None
    files: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    @property
    def published(self) -> bool:
        return bool(self.repo_id and self.revision and self.files)


@dataclass(frozen=True)
class HeadSpec:
    """The classification head of a fine-tuned checkpoint: "clip" or "frame" level, classes, BatchNorm."""

    level: str | None = None
    num_classes: int | None = None
    norm: bool | None = None
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Licence:
    """The licence the authors state (``spdx`` is ``None`` when they state none)."""

    spdx: str | None = None
    holder: str | None = None
    url: str | None = None
    statement: str | None = None
    attribution: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One manifest entry.

    Attributes:
        name: the name ``load`` accepts.
        family: "clip" or "frame".
        arch: "small" or "base" (``None`` when not stated).
        config: the ``ATSTConfig`` fields (read-only mapping; ``ATSTConfig.from_dict(dict(spec.config))``).
        frontend: the audio contract (sample rate, STFT and mel parameters, ...), read-only.
        outputs: embedding sizes (``clip_dim`` / ``frame_dim`` per layer choice, ``token_s``, ...), read-only.
        head: the classification head, or ``None``.
        source: the official file, or ``None`` for an entry without one.
        hub: the converted files on the Hub (``hub.published`` is False when there are none).
        raw: the entry as written in the manifest (read-only at the top level; do not change it).
    """

    name: str
    family: str | None = None
    arch: str | None = None
    description: str = ""
    config: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    frontend: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    outputs: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    head: HeadSpec | None = None
    source: SourceSpec | None = None
    licence: Licence | None = None
    papers: tuple[Mapping[str, Any], ...] = ()
    hub: HubSpec = HubSpec()
    notes: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> ModelSpec:
        """Parse one manifest entry (a dict with at least ``name``); absent fields become ``None`` / empty."""
        source = entry.get("source")
        head = entry.get("head")
        licence = entry.get("licence")
        return cls(
            name=entry["name"],
            family=entry.get("family"),
            arch=entry.get("arch"),
            description=entry.get("description") or "",
            config=_frozen(entry.get("config")),
            frontend=_frozen(entry.get("frontend")),
            outputs=_frozen(entry.get("outputs")),
            head=_head(head) if head else None,
            source=_source(source) if source else None,
            licence=Licence(**{k: licence.get(k) for k in _LICENCE_FIELDS}) if licence else None,
            papers=tuple(_frozen(p) for p in entry.get("papers") or ()),
            hub=_hub(entry.get("hub")),
            notes=tuple(entry.get("notes") or ()),
            raw=MappingProxyType(dict(entry)),
        )


_LICENCE_FIELDS = ("spdx", "holder", "url", "statement", "attribution")
_SOURCE_FIELDS = ("url", "page", "drive_id", "filename", "format", "size", "sha256", "published_in")


def _source(source: Mapping[str, Any]) -> SourceSpec:
    reported = source.get("reported")
    return SourceSpec(
        **{k: source.get(k) for k in _SOURCE_FIELDS},
        reported=(
            Reported(reported.get("sha256"), reported.get("size"), bool(reported.get("verified")), reported.get("by"))
            if reported
            else None
        ),
    )


def _hub(hub: Mapping[str, Any] | None) -> HubSpec:
    hub = hub or {}
    return HubSpec(hub.get("repo_id"), hub.get("revision"), _frozen(hub.get("files")))


def _head(head: Mapping[str, Any]) -> HeadSpec:
    labels = head.get("labels")
    return HeadSpec(head.get("level"), head.get("num_classes"), head.get("norm"), tuple(labels) if labels else None)


# ---------------------------------------------------------------------------- reading


def _parse(data: Mapping[str, Any]) -> dict[str, ModelSpec]:
    return {entry["name"]: ModelSpec.from_entry(entry) for entry in data["models"]}


def _read(path: str | os.PathLike) -> dict[str, ModelSpec]:
    with open(path, encoding="utf-8") as f:
        return _parse(json.load(f))


@lru_cache(maxsize=1)
def _packaged() -> dict[str, ModelSpec]:
    """The packaged manifest, read on first use and kept."""
    return _read(MANIFEST_PATH)


def _specs(source: ManifestSource) -> dict[str, ModelSpec]:
    if source is None:
        return dict(_packaged())  # a copy: callers may change their dict, not the cached one
    if isinstance(source, Mapping):
        return _parse(source)
    return _read(source)


def manifest(path_or_dict: ManifestSource = None) -> dict[str, ModelSpec]:
    """The registry of published checkpoints, name -> ``ModelSpec``, in manifest order.

    Args:
        path_or_dict: a manifest file (``{"models": [...]}``), such a dict already loaded, or
            ``None`` for the manifest shipped with the package (read once per process).
    """
    return _specs(path_or_dict)


def list_models(path_or_dict: ManifestSource = None) -> list[str]:
    """Names of the published checkpoints that ``load`` accepts, sorted."""
    return sorted(_specs(path_or_dict))


def get(name: str, manifest: ManifestSource = None) -> ModelSpec:
    """The entry called ``name``.

    Raises:
        KeyError: for an unknown name, listing the known ones.
    """
    specs = _specs(manifest)
    if name not in specs:
        raise KeyError(f"{name!r} is not a known model; known names: {', '.join(sorted(specs))}")
    return specs[name]


def hub_published(spec: ModelSpec | Mapping[str, Any]) -> bool:
    """Whether an entry (a ``ModelSpec`` or a raw manifest dict) lists converted files on the Hub
    (repository, pinned revision and files)."""
    hub = spec.hub if isinstance(spec, ModelSpec) else _hub(spec.get("hub"))
    return hub.published
