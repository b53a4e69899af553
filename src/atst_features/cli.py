"""The ``atst-features`` command: a thin argparse layer over the library.

Each subcommand registers itself through an ``add_parser(subparsers)``-style function that sets
``func`` (returning an exit status); the ``embed`` subcommand (over ``batch.embed_folder``, imported
only when it runs) and the weights subcommands (``convert``, ``download``, ``list``, ``publish``) are
defined here.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atst-features", description="ATST audio embeddings: embed, convert, download.")
    parser.add_argument("--version", action="version", version=f"atst-features {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_embed_parser(sub)
    add_weights_parsers(sub)
    train = sub.add_parser("train", help="pretrain or fine-tune ATST models (needs the [train] extra)", add_help=False)
    train.add_argument("args", nargs=argparse.REMAINDER)
    train.set_defaults(func=_train)
    return parser


def _train(args: argparse.Namespace) -> int:
    try:
        from .train.__main__ import main as train_main
    except ImportError as e:
        print(f"atst-features train needs the training extra: pip install 'atst-features[train]' ({e})", file=sys.stderr)
        return 2
    return train_main(args.args)


# ---- embed subcommand (atst_features.batch, imported when the command runs)

_MAX_FAILURES_SHOWN = 20  # failed files printed by `embed`; the index lists them all


def _layers_arg(text: str) -> str | list[int]:
    """CLI layers: "all", "last", or comma-separated 0-based block indices ("11", "0,5,11", "-1")."""
    if text in ("all", "last"):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use all, last, or block indices like 11 or 0,5,11") from None


def add_embed_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``atst-features embed`` (``batch.embed_folder``)."""
    from .dtypes import COMPUTE_DTYPES, STORAGE_DTYPES
    from .embed import DEFAULT_MODEL

    p = sub.add_parser(
        "embed",
        help="embed a folder, file or list of audio files into .npz files (resumable)",
        description=(
            "Embed every audio file under INPUT into OUT/<relative path>.npz (arrays clip, frames, timestamps), "
            "with OUT/index.jsonl (one row per input: ok / skipped / failed) and OUT/metadata.json. "
            "A rerun skips what is up to date. The exit status is 1 when a file failed."
        ),
    )
    p.add_argument(
        "input", metavar="INPUT", help="a folder (recursive), an audio file, or a list of paths (@FILE or .txt/.lst/.list)"
    )
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME|DIR|FILE", help=f"model to load (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument("--dtype", choices=list(COMPUTE_DTYPES), help="encoder precision (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--what", default="clip,frames", help="clip, frames or clip,frames (default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (pays off on long GPU runs)")
    p.add_argument("--layers", type=_layers_arg, help="blocks for both clip and frames (all, last, or indices like 0,5,11)")
    p.add_argument("--clip-layers", type=_layers_arg, default="all", help="blocks of the clip vector (default all)")
    p.add_argument("--frame-layers", type=_layers_arg, default="last", help="blocks of the frame embeddings (default last)")
    p.add_argument("--frames-dtype", choices=list(STORAGE_DTYPES), default="float16", help="storage of frames (default float16)")
    p.add_argument("--batch-size", type=int, help="chunks of up to 10 s per encoder pass (default 64 on CUDA, 16 on CPU)")
    p.add_argument("--workers", type=int, help="decoding processes (default min(8, CPUs - 1); 0 = none)")
    p.add_argument("--shard", metavar="i/N", help="embed only shard i of N (0-based), e.g. one per node")
    p.add_argument("--force", action="store_true", help="recompute outputs that are up to date")
    p.add_argument("--stream-seconds", type=float, default=600.0, help="decode files longer than this in blocks (default 600)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_embed)
    return p


def _embed(args: argparse.Namespace) -> int:
    import torch

    from .batch import embed_folder

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    try:
        summary = embed_folder(
            args.input,
            args.out,
            model=args.model,
            device=device,
            dtype=dtype,
            what=args.what,
            clip_layers=args.layers if args.layers is not None else args.clip_layers,
            frame_layers=args.layers if args.layers is not None else args.frame_layers,
            frames_dtype=args.frames_dtype,
            batch_size=args.batch_size,
            workers=args.workers,
            shard=args.shard,
            force=args.force,
            progress=not args.no_progress,
            stream_seconds=args.stream_seconds,
            compile=args.compile,
        )
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"atst-features embed: {e}", file=sys.stderr)
        return 2
    for rel, error in summary.failures[:_MAX_FAILURES_SHOWN]:
        print(f"failed: {rel}: {error}", file=sys.stderr)
    if len(summary.failures) > _MAX_FAILURES_SHOWN:
        more = len(summary.failures) - _MAX_FAILURES_SHOWN
        print(f"... and {more} more failures (see {summary.index_path})", file=sys.stderr)
    print(summary, file=sys.stderr)
    return summary.exit_status


# ---- end of embed subcommand


# ---- weights subcommands (convert, download, list, publish)


def add_weights_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``convert``, ``download``, ``list`` and ``publish`` on the ``atst-features`` command."""
    p = sub.add_parser("convert", help="convert an official ATST checkpoint to a model directory")
    p.add_argument("input", help="official checkpoint (.ckpt / .pth / .safetensors)")
    p.add_argument("out_dir", help="directory to write (config.json, model.safetensors, ...)")
    p.add_argument("--family", choices=["clip", "frame"], help="model family (default: read off the keys)")
    p.add_argument("--num-heads", type=int, help="attention heads (default: from the file's arch or the width)")
    p.add_argument("--head-level", choices=["clip", "frame"], help="level of a classification head (default: inferred)")
    p.add_argument("--labels", help="class names of the head: a JSON list or a text file with one name per line")
    p.set_defaults(func=_convert)

    cache_help = "cache directory (default: $ATST_FEATURES_CACHE or ~/.cache/atst-features)"
    manifest_help = "a weights manifest to use instead of the packaged one"
    p = sub.add_parser("download", help="download, check and convert a published model into the cache")
    p.add_argument("name", help="a model name (see `atst-features list`)")
    p.add_argument("--cache-dir", help=cache_help)
    p.add_argument("--manifest", help=manifest_help)
    p.add_argument("--force", action="store_true", help="discard a cached copy and fetch it again")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_download)

    p = sub.add_parser("list", help="list the published models and whether they are cached")
    p.add_argument("--cache-dir", help=cache_help)
    p.add_argument("--manifest", help=manifest_help)
    p.add_argument("--json", action="store_true", help="print the manifest entries as JSON")
    p.set_defaults(func=_list)

    p = sub.add_parser("publish", help="(maintainers) upload a converted model to the Hugging Face Hub")
    p.add_argument("dir", help="converted model directory")
    p.add_argument("--repo-id", required=True, help="Hub repository, org/name")
    p.add_argument("--name", help="the manifest entry it was converted from (default: recorded in checksums.json)")
    p.add_argument("--manifest", help=manifest_help)
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", help="Hub token (default: the logged-in user's)")
    p.set_defaults(func=_publish)


def _convert(args: argparse.Namespace) -> int:
    from . import artifacts, convert

    try:
        converted = convert.convert(
            artifacts.read_checkpoint(args.input),
            family=args.family,
            num_heads=args.num_heads,
            head_level=args.head_level,
        )
        out = artifacts.write_converted(converted, args.input, args.out_dir, args.labels)
    except (convert.CheckpointError, ValueError, OSError) as e:
        print(f"atst-features convert: {e}", file=sys.stderr)
        return 1
    print(converted.summary())
    print(f"wrote {out}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from . import weights

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
    from . import registry, weights

    specs = registry.manifest(args.manifest)
    if args.json:
        print(json.dumps([dict(s.raw) for s in specs.values()], indent=2))
        return 0
    rows = [("name", "family", "arch", "clip dim", "frame dim", "head", "cached", "source")]
    for name, s in specs.items():
        cached = weights.is_cached(name, cache_dir=args.cache_dir, manifest=args.manifest)
        host = "hub" if s.hub.published else s.source.url.split("/")[2]
        rows.append(
            (
                name,
                s.family,
                s.arch or "?",
                str((s.outputs.get("clip_dim") or {}).get("all", "?")),
                str((s.outputs.get("frame_dim") or {}).get("all", "?")),
                f"{s.head.level} x{s.head.num_classes}" if s.head else "-",
                "yes" if cached else "no",
                host,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _publish(args: argparse.Namespace) -> int:
    from . import hub, weights

    try:
        block = hub.publish(
            args.dir, args.repo_id, name=args.name, manifest=args.manifest, private=args.private, token=args.token
        )
    except (KeyError, FileNotFoundError, weights.IntegrityError) as e:
        print(f"atst-features publish: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"hub": block}, indent=2))
    return 0


# ---- end of weights subcommands


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
