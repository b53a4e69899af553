"""Publishing converted models on the Hugging Face Hub (for maintainers), with their model card.

``publish`` uploads a converted model directory with a model card (``model_card``: source,
licence, citation) and returns the ``hub`` block to pin in ``weights_manifest.json``
(repository, commit, sha256 of every file). ``atst-features publish`` (``cli.py``) drives it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import artifacts, registry, weights
from .registry import ModelSpec

PUBLISHED_FILES = (artifacts.CONFIG_NAME, artifacts.WEIGHTS_NAME, artifacts.HEAD_NAME, artifacts.LABELS_NAME)
CARD_NAME = "README.md"
LIBRARY = "atst-features"


# ---------------------------------------------------------------------------- model cards


def bibtex(paper: Mapping[str, Any]) -> str:
    """A BibTeX entry for a manifest ``papers`` item (title, authors, venue, year, doi, url)."""
    first = paper["authors"][0].split()[-1].lower()
    word = "".join(ch for ch in paper["title"].split()[0].lower() if ch.isalnum())
    kind = "article" if "Transactions" in paper.get("venue", "") else "inproceedings"
    venue_field = "journal" if kind == "article" else "booktitle"
    fields = {
        "title": paper["title"],
        "author": " and ".join(paper["authors"]),
        venue_field: paper.get("venue"),
        "year": paper.get("year"),
        "doi": paper.get("doi"),
        "url": paper.get("url"),
    }
    body = ",\n".join(f"  {k} = {{{v}}}" for k, v in fields.items() if v is not None)
    return f"@{kind}{{{first}{paper.get('year', '')}{word},\n{body}\n}}"


def hub_licence_id(spdx: str | None) -> str:
    """The Hub's ``license`` id of an SPDX identifier (``CC-BY-4.0`` -> ``cc-by-4.0``); ``other`` for
    none or for an expression of several licences."""
    return spdx.lower() if spdx and " " not in spdx else "other"


def model_card(
    entry: ModelSpec | Mapping[str, Any] | None, config: Mapping[str, Any], files: Mapping[str, str]
) -> str:
    """The Hub model card (``README.md``) of a converted model.

    Args:
        entry: the manifest entry the weights were converted from (source, licence, papers), as a
            ``ModelSpec`` or as written in the manifest, or ``None`` for weights of unknown provenance.
        config: the model's ``config.json``.
        files: published file name -> sha256.
    """
    from huggingface_hub import ModelCardData

    spec = entry if entry is None or isinstance(entry, ModelSpec) else ModelSpec.from_entry(entry)
    licence = (spec.licence if spec else None) or registry.Licence()
    data = ModelCardData(
        license=hub_licence_id(licence.spdx),
        library_name=LIBRARY,
        tags=["audio", "feature-extraction", "self-supervised", "atst", f"atst-{config['family']}"],
        pipeline_tag="feature-extraction",
    )
    title = spec.name if spec else f"ATST-{config['family'].capitalize()} (converted)"
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {title}", ""]
    if spec:
        lines += [spec.description, ""]
    lines += [
        f"ATST-{config['family'].capitalize()} encoder weights converted to safetensors for the "
        f"`{LIBRARY}` Python package, which reproduces the official embeddings.",
        "",
        "```python",
        "import atst_features as af",
        f'model = af.load("{spec.name if spec else "hf://ORG/REPO@REVISION"}")',
        "emb = model.embed_clip(waveform, 16000)",
        "```",
        "",
        "## Source",
        "",
    ]
    if spec and spec.source:
        src = spec.source
        lines += [
            f"- Official file: {src.page_or_url}" + (f" (`{src.filename}`)" if src.filename else ""),
            f"- Published in: {src.published_in}",
            f"- Layout: {src.format or 'recognised at conversion'}; only "
            + ("the encoder and its classification head are" if spec.head else "the encoder is")
            + " kept, unchanged up to the renaming of keys.",
        ]
    else:
        lines.append("- Provenance not recorded.")
    lines += ["", "## Licence", ""]
    if licence.spdx:
        link = f"{licence.licence_url}; " if licence.licence_url else ""
        as_of = f" (as of {licence.as_of})" if licence.as_of else ""
        lines.append(f'{licence.spdx} ({link}statement: {licence.url}{as_of}). The authors state: "{licence.statement}".')
    else:
        lines.append(f"Not stated by the authors: {licence.statement or 'unknown'}.")
    if licence.attribution:
        lines += ["", f"Attribution: {licence.attribution}"]
    lines += ["", "## Citation", ""]
    papers = spec.papers if spec else ()
    for paper in papers:
        lines += ["```bibtex", bibtex(paper), "```", ""]
    if not papers:
        lines += ["Cite the ATST paper: https://arxiv.org/abs/2306.04186", ""]
    lines += ["## Files", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| `{f}` | `{h}` |" for f, h in files.items()]
    lines += ["", "## Config", "", "```json", json.dumps(dict(config), indent=2), "```", ""]
    return "\n".join(lines)


def _provenance_name(directory: Path) -> str | None:
    record = artifacts.read_checksums(directory)
    return ((record or {}).get("source") or {}).get("name")


def publish(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    name: str | None = None,
    manifest: registry.ManifestSource = None,
    private: bool = False,
    token: str | None = None,
    api: Any = None,
) -> dict:
    """Upload a converted model directory to the Hub with a model card; returns the manifest ``hub`` block.

    Args:
        directory: a converted model directory (``atst-features convert`` / ``download`` output).
        repo_id: the Hub repository, ``org/name`` (created if missing).
        name: the manifest entry the weights come from (read from ``checksums.json`` when omitted).
        manifest: a manifest file or dict instead of the packaged one.
        private: create the repository private.
        token: a Hub token (default: the logged-in user's).
        api: a ``huggingface_hub.HfApi`` (made here when omitted).

    Returns:
        ``{"repo_id", "revision" (the 40-hex commit), "files": {name: sha256}}``.
    """
    directory = Path(directory)
    weights.load_converted(directory)  # the directory must load (and match its checksums) before it goes out
    name = name or _provenance_name(directory)
    entry = registry.manifest(manifest).get(name) if name else None
    if name and entry is None:
        raise KeyError(f"{name!r} is not in the manifest; pass name= of a known model")
    files = {f: artifacts.sha256_file(directory / f) for f in PUBLISHED_FILES if (directory / f).is_file()}
    config = json.loads((directory / artifacts.CONFIG_NAME).read_text(encoding="utf-8"))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        for f in files:
            shutil.copyfile(directory / f, Path(staging) / f)
        (Path(staging) / CARD_NAME).write_text(model_card(entry, config, files), encoding="utf-8")
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            commit_message=f"Upload {name or 'converted ATST model'} ({LIBRARY})",
        )
    return {"repo_id": repo_id, "revision": info.oid, "files": files}
