"""The registry of published checkpoints: ``weights_manifest.json`` as typed, read-only data.

One entry per checkpoint: its name, family and architecture (``config``, an ``ATSTConfig`` dict),
the front-end contract, the embedding sizes, the classification head, where the official file
is (``source``: URL, pinned size and sha256 and who recorded them) and its second sources
(``mirrors``), its licence and papers, and the converted files on the Hugging Face Hub when they
are published. Each entry becomes a frozen ``ModelSpec``; the entry as written stays available as
``ModelSpec.raw`` for fields the dataclasses do not name.

Entries are checked when parsed (``ManifestError``): names and file names are plain names
(``NAME_RE``: they become paths in the cache), hashes are 64 hex digits, sizes positive, Hub
revisions 40-hex commits.

The packaged manifest is read once per process; a manifest given as a path or a dict is parsed
when asked for. Pure data: this module imports nothing else of the package but its errors.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import labelsets
from .errors import ManifestError, UnknownModelError

MANIFEST_PATH = Path(__file__).with_name("weights_manifest.json")
#: What a model name and a file name of the manifest must look like (they become paths in the cache).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HUB_FILES = ("config.json", "model.safetensors", "head.safetensors", "labels.json")

#: What a manifest argument may be: a manifest file, its content already loaded, or ``None``
#: for the packaged manifest.
ManifestSource = str | os.PathLike | Mapping[str, Any] | None

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _frozen(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only view of a mapping (``None`` -> an empty one)."""
    return MappingProxyType(dict(value)) if value else _EMPTY


@dataclass(frozen=True)
class SourceSpec:
    """Where a file of the model is and what it must be.

    Attributes:
        url: the download URL (Google Drive through gdown, or plain HTTP(S)).
        page: a page to download it from by hand, when that differs from ``url``.
        filename: the file's name as published (a plain name; ``None``: ``NAME.ckpt``).
        format: its layout (a name of ``convert.LAYOUTS``); ``None`` when not known in advance.
        possible_formats: the layouts it may have when ``format`` is ``None``.
        size, sha256: the pinned size (bytes) and sha256 (64 hex digits), enforced: a mismatch is
            an error. ``None``: not known in advance; the first verified download pins it (trust on
            first use, recorded in the cache).
        pinned_by: who recorded the pinned values, and from what.
        published_in: where the authors (or the host) publish the link.
    """

    url: str | None = None
    page: str | None = None
    drive_id: str | None = None
    filename: str | None = None
    format: str | None = None
    possible_formats: tuple[str, ...] = ()
    size: int | None = None
    sha256: str | None = None
    pinned_by: str | None = None
    published_in: str | None = None

    @property
    def page_or_url(self) -> str | None:
        """Where a person downloads the file by hand."""
        return self.page or self.url

    @property
    def pinned(self) -> bool:
        """Whether the manifest pins this file (size and sha256)."""
        return self.sha256 is not None and self.size is not None

    @property
    def formats(self) -> tuple[str, ...]:
        """The layouts the file may have (empty: any)."""
        return (self.format,) if self.format else self.possible_formats


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
    """The classification head of a fine-tuned checkpoint: "clip" or "frame" level, classes, BatchNorm.

    ``labels``: the class names in score order (a list in the manifest, or the name of a bundled
    label set, ``labelsets``); ``use``: which of the file's heads it is (``convert(use_head=...)``,
    e.g. PretrainedSED's "weak"), ``None`` for the file's main head.
    """

    level: str | None = None
    num_classes: int | None = None
    norm: bool | None = None
    labels: tuple[str, ...] | None = None
    use: str | None = None


@dataclass(frozen=True)
class Licence:
    """The licence the authors state (``spdx`` is ``None`` when they state none).

    ``url``: where the statement is; ``statement``: its words; ``as_of``: the revision of that
    text; ``licence_url``: the licence itself; ``attribution``: the credit to give with copies.
    """

    spdx: str | None = None
    holder: str | None = None
    url: str | None = None
    statement: str | None = None
    attribution: str | None = None
    licence_url: str | None = None
    as_of: str | None = None


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
        mirrors: second sources of the model (another host, maybe another layout), each pinned
            on its own; tried in turn when a source cannot be reached.
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
    mirrors: tuple[SourceSpec, ...] = ()
    licence: Licence | None = None
    papers: tuple[Mapping[str, Any], ...] = ()
    hub: HubSpec = HubSpec()
    notes: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    @property
    def sources(self) -> tuple[SourceSpec, ...]:
        """The files the model can be downloaded from, in the order they are tried: pinned ones
        first (their bytes are known in advance), then the others, each group in manifest order."""
        every = [s for s in (self.source, *self.mirrors) if s is not None and s.url]
        return tuple(sorted(every, key=lambda s: not s.pinned))

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> ModelSpec:
        """Parse one manifest entry (a dict with at least ``name``); absent fields become ``None`` / empty.

        Raises:
            ManifestError: a name, file name, hash, size or Hub revision that cannot be used.
        """
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ManifestError(f"a manifest entry must be an object with a 'name', got {entry!r:.80}")
        name = _plain_name(entry["name"], "model name")
        source = entry.get("source")
        head = entry.get("head")
        licence = entry.get("licence")
        return cls(
            name=name,
            family=entry.get("family"),
            arch=entry.get("arch"),
            description=entry.get("description") or "",
            config=_frozen(entry.get("config")),
            frontend=_frozen(entry.get("frontend")),
            outputs=_frozen(entry.get("outputs")),
            head=_head(head, name) if head else None,
            source=_source(source, name) if source else None,
            mirrors=tuple(_source(m, name) for m in entry.get("mirrors") or ()),
            licence=Licence(**{k: licence.get(k) for k in _LICENCE_FIELDS}) if licence else None,
            papers=tuple(_frozen(p) for p in entry.get("papers") or ()),
            hub=_hub(entry.get("hub"), name),
            notes=tuple(entry.get("notes") or ()),
            raw=MappingProxyType(dict(entry)),
        )


_LICENCE_FIELDS = ("spdx", "holder", "url", "statement", "attribution", "licence_url", "as_of")
_SOURCE_FIELDS = ("url", "page", "drive_id", "filename", "format", "size", "sha256", "pinned_by", "published_in")


def _plain_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ManifestError(
            f"the manifest's {what} {value!r} is not a plain name (letters, digits, '.', '_', '-', not starting with "
            "'.' or '-'); it would be used as a path"
        )
    return value


def _source(source: Mapping[str, Any], name: str) -> SourceSpec:
    if not isinstance(source, Mapping):
        raise ManifestError(f"{name}: a source must be an object, got {source!r:.80}")
    spec = SourceSpec(
        **{k: source.get(k) for k in _SOURCE_FIELDS},
        possible_formats=tuple(source.get("possible_formats") or ()),
    )
    if spec.filename is not None:
        _plain_name(spec.filename, f"file name of {name!r}")
    if spec.sha256 is not None and not (isinstance(spec.sha256, str) and _SHA256.fullmatch(spec.sha256)):
        raise ManifestError(f"{name}: sha256 must be 64 lowercase hex digits or null, got {spec.sha256!r}")
    if spec.size is not None and (isinstance(spec.size, bool) or not isinstance(spec.size, int) or spec.size < 1):
        raise ManifestError(f"{name}: size must be a positive number of bytes or null, got {spec.size!r}")
    if (spec.sha256 is None) != (spec.size is None):
        raise ManifestError(f"{name}: a source pins both its size and its sha256, or neither")
    if spec.url is not None and not (isinstance(spec.url, str) and spec.url.startswith(("https://", "http://"))):
        raise ManifestError(f"{name}: the source URL must be http(s), got {spec.url!r}")
    return spec


def _hub(hub: Mapping[str, Any] | None, name: str) -> HubSpec:
    hub = hub or {}
    spec = HubSpec(hub.get("repo_id"), hub.get("revision"), _frozen(hub.get("files")))
    if spec.repo_id is not None:
        if not (isinstance(spec.revision, str) and _COMMIT.fullmatch(spec.revision)):
            raise ManifestError(f"{name}: the Hub revision must be a 40-hex commit, got {spec.revision!r}")
        for fname, sha in spec.files.items():
            if fname not in _HUB_FILES or not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
                raise ManifestError(f"{name}: the Hub files must be {_HUB_FILES} with their sha256, got {fname!r}: {sha!r}")
    return spec


def _head(head: Mapping[str, Any], name: str) -> HeadSpec:
    labels, n_classes = head.get("labels"), head.get("num_classes")
    if isinstance(labels, str):
        try:
            labels = labelsets.label_set(labels)
        except KeyError as e:
            raise ManifestError(f"{name}: the head's labels: {e.args[0]}") from None
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise ManifestError(f"{name}: the head's labels must be a list of names or a bundled label set's name")
    if labels and n_classes is not None and len(labels) != n_classes:
        raise ManifestError(f"{name}: the head has {n_classes} classes but {len(labels)} labels")
    use = head.get("use")
    if use is not None and not isinstance(use, str):
        raise ManifestError(f"{name}: the head's 'use' must be the name of one of the file's heads, got {use!r}")
    return HeadSpec(head.get("level"), n_classes, head.get("norm"), tuple(labels) if labels else None, use)


# ---------------------------------------------------------------------------- reading


def _parse(data: Mapping[str, Any]) -> dict[str, ModelSpec]:
    if not isinstance(data, Mapping) or not isinstance(data.get("models"), list):
        raise ManifestError('a manifest must be {"models": [entry, ...]}')
    specs: dict[str, ModelSpec] = {}
    for entry in data["models"]:
        spec = ModelSpec.from_entry(entry)
        if spec.name in specs:
            raise ManifestError(f"the manifest lists {spec.name!r} twice")
        specs[spec.name] = spec
    return specs


def _read(path: str | os.PathLike) -> dict[str, ModelSpec]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{str(path)!r} is not a JSON manifest: {e}") from None
    return _parse(data)


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
        UnknownModelError: (a ``KeyError``) for an unknown name, listing the known ones.
    """
    specs = _specs(manifest)
    if name not in specs:
        raise UnknownModelError(f"{name!r} is not a known model; known names: {', '.join(sorted(specs))}")
    return specs[name]


def hub_published(spec: ModelSpec | Mapping[str, Any]) -> bool:
    """Whether an entry (a ``ModelSpec`` or a raw manifest dict) lists converted files on the Hub
    (repository, pinned revision and files)."""
    hub = spec.hub if isinstance(spec, ModelSpec) else _hub(spec.get("hub"), str(spec.get("name")))
    return hub.published
