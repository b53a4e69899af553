"""Command-line subcommands for weights (``convert``, ``download``, ``list``, ``publish``) and Hub publishing.

``publish`` is for maintainers: it uploads a converted model directory to the Hugging Face Hub
with a model card (source, licence, citation) and prints the ``hub`` block to pin in
``weights_manifest.json`` (repository, commit, sha256 of every file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import weights

PUBLISHED_FILES = (weights.CONFIG_NAME, weights.WEIGHTS_NAME, weights.HEAD_NAME, weights.LABELS_NAME)
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


def model_card(entry: Mapping[str, Any] | None, config: Mapping[str, Any], files: Mapping[str, str]) -> str:
    """The Hub model card (``README.md``) of a converted model.

    Args:
        entry: the manifest entry the weights were converted from (source, licence, papers), or
            ``None`` for weights of unknown provenance.
        config: the model's ``config.json``.
        files: published file name -> sha256.
    """
    from huggingface_hub import ModelCardData

    licence = (entry or {}).get("licence") or {}
    spdx = licence.get("spdx")
    data = ModelCardData(
        license=spdx.lower() if spdx else "other",
        library_name=LIBRARY,
        tags=["audio", "feature-extraction", "self-supervised", "atst", f"atst-{config['family']}"],
        pipeline_tag="feature-extraction",
    )
    title = entry["name"] if entry else f"ATST-{config['family'].capitalize()} (converted)"
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {title}", ""]
    if entry:
        lines += [entry.get("description", ""), ""]
    lines += [
        f"ATST-{config['family'].capitalize()} encoder weights converted to safetensors for the "
        f"`{LIBRARY}` Python package, which reproduces the official embeddings.",
        "",
        "```python",
        "import atst_features as af",
        f'model = af.load("{entry["name"] if entry else "hf://ORG/REPO@REVISION"}")',
        "emb = model.embed_clip(waveform, 16000)",
        "```",
        "",
        "## Source",
        "",
    ]
    if entry:
        src = entry["source"]
        lines += [
            f"- Official file: {src.get('page') or src['url']}"
            + (f" (`{src['filename']}`)" if src.get("filename") else ""),
            f"- Published in: {src.get('published_in')}",
            f"- Layout: {src.get('format') or 'recognised at conversion'}; only "
            + ("the encoder and its classification head are" if entry.get("head") else "the encoder is")
            + " kept, unchanged up to the renaming of keys.",
        ]
    else:
        lines.append("- Provenance not recorded.")
    lines += ["", "## Licence", ""]
    if spdx:
        lines.append(f'{spdx} ({licence.get("url")}). The authors state: "{licence.get("statement")}".')
    else:
        lines.append(f"Not stated by the authors: {licence.get('statement', 'unknown')}.")
    if licence.get("attribution"):
        lines += ["", f"Attribution: {licence['attribution']}"]
    lines += ["", "## Citation", ""]
    for paper in (entry or {}).get("papers", []):
        lines += ["```bibtex", bibtex(paper), "```", ""]
    if not (entry or {}).get("papers"):
        lines += ["Cite the ATST paper: https://arxiv.org/abs/2306.04186", ""]
    lines += ["## Files", "", "| file | sha256 |", "|---|---|"]
    lines += [f"| `{f}` | `{h}` |" for f, h in files.items()]
    lines += ["", "## Config", "", "```json", json.dumps(dict(config), indent=2), "```", ""]
    return "\n".join(lines)


def _provenance_name(directory: Path) -> str | None:
    record = directory / weights.CHECKSUMS_NAME
    if not record.is_file():
        return None
    source = json.loads(record.read_text(encoding="utf-8")).get("source") or {}
    return source.get("name")


def publish(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    name: str | None = None,
    manifest: str | os.PathLike | Mapping[str, Any] | None = None,
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
    entry = weights.manifest(manifest).get(name) if name else None
    if name and entry is None:
        raise KeyError(f"{name!r} is not in the manifest; pass name= of a known model")
    files = {f: weights.sha256_file(directory / f) for f in PUBLISHED_FILES if (directory / f).is_file()}
    config = json.loads((directory / weights.CONFIG_NAME).read_text(encoding="utf-8"))
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


# ---------------------------------------------------------------------------- CLI


def _convert(args: argparse.Namespace) -> int:
    from . import convert

    try:
        converted = convert.convert(
            weights.read_checkpoint(args.input),
            family=args.family,
            num_heads=args.num_heads,
            head_level=args.head_level,
        )
        out = weights.write_converted(converted, Path(args.input), args.out_dir, args.labels)
    except (convert.CheckpointError, ValueError, OSError) as e:
        print(f"atst-features convert: {e}", file=sys.stderr)
        return 1
    print(converted.summary())
    print(f"wrote {out}")
    return 0


def _download(args: argparse.Namespace) -> int:
    try:
        path = weights.download(
            args.name, cache_dir=args.cache_dir, manifest=args.manifest, progress=not args.quiet, force=args.force
        )
    except (KeyError, weights.DownloadError, weights.IntegrityError, ValueError) as e:
        print(f"atst-features download: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _list(args: argparse.Namespace) -> int:
    entries = weights.manifest(args.manifest)
    if args.json:
        print(json.dumps(list(entries.values()), indent=2))
        return 0
    rows = [("name", "family", "arch", "clip dim", "frame dim", "head", "cached", "source")]
    for name, e in entries.items():
        out, head = e.get("outputs") or {}, e.get("head") or {}
        cached = weights.is_cached(name, cache_dir=args.cache_dir, manifest=args.manifest)
        host = "hub" if weights.hub_published(e) else e["source"]["url"].split("/")[2]
        rows.append(
            (
                name,
                e["family"],
                e.get("arch") or "?",
                str((out.get("clip_dim") or {}).get("all", "?")),
                str((out.get("frame_dim") or {}).get("all", "?")),
                f"{head['level']} x{head['num_classes']}" if head else "-",
                "yes" if cached else "no",
                host,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _publish(args: argparse.Namespace) -> int:
    try:
        block = publish(
            args.dir, args.repo_id, name=args.name, manifest=args.manifest, private=args.private, token=args.token
        )
    except (KeyError, FileNotFoundError, weights.IntegrityError) as e:
        print(f"atst-features publish: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"hub": block}, indent=2))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``convert``, ``download``, ``list`` and ``publish`` on the ``atst-features`` command."""
    p = sub.add_parser("convert", help="convert an official ATST checkpoint to a model directory")
    p.add_argument("input", help="official checkpoint (.ckpt / .pth / .safetensors)")
    p.add_argument("out_dir", help="directory to write (config.json, model.safetensors, ...)")
    p.add_argument("--family", choices=["clip", "frame"], help="model family (default: read off the keys)")
    p.add_argument("--num-heads", type=int, help="attention heads (default: from the file's arch or the width)")
    p.add_argument("--head-level", choices=["clip", "frame"], help="level of a classification head (default: inferred)")
    p.add_argument("--labels", help="class names of the head: a JSON list or a text file with one name per line")
    p.set_defaults(func=_convert)

    p = sub.add_parser("download", help="download, check and convert a published model into the cache")
    p.add_argument("name", help="a model name (see `atst-features list`)")
    p.add_argument("--cache-dir", help="cache directory (default: $ATST_FEATURES_CACHE or ~/.cache/atst-features)")
    p.add_argument("--manifest", help="a weights manifest to use instead of the packaged one")
    p.add_argument("--force", action="store_true", help="discard a cached copy and fetch it again")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_download)

    p = sub.add_parser("list", help="list the published models and whether they are cached")
    p.add_argument("--cache-dir", help="cache directory (default: $ATST_FEATURES_CACHE or ~/.cache/atst-features)")
    p.add_argument("--manifest", help="a weights manifest to use instead of the packaged one")
    p.add_argument("--json", action="store_true", help="print the manifest entries as JSON")
    p.set_defaults(func=_list)

    p = sub.add_parser("publish", help="(maintainers) upload a converted model to the Hugging Face Hub")
    p.add_argument("dir", help="converted model directory")
    p.add_argument("--repo-id", required=True, help="Hub repository, org/name")
    p.add_argument("--name", help="the manifest entry it was converted from (default: recorded in checksums.json)")
    p.add_argument("--manifest", help="a weights manifest to use instead of the packaged one")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", help="Hub token (default: the logged-in user's)")
    p.set_defaults(func=_publish)
