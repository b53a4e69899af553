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

from .version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atst-features", description="ATST audio embeddings: embed, convert, download.")
    parser.add_argument("--version", action="version", version=f"atst-features {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_embed_parser(sub)
    add_detect_parser(sub)
    add_weights_parsers(sub)
    add_export_parser(sub)
    train = sub.add_parser("train", help="pretrain or fine-tune ATST models (needs the [train] extra)", add_help=False)
    train.add_argument("-h", "--help", action=_TrainHelp, help="show the training command's help and exit")
    train.add_argument("args", nargs=argparse.REMAINDER)
    train.set_defaults(func=_train)
    return parser


class _TrainHelp(argparse.Action):
    """``atst-features train --help``: the help of the training command's own parser."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            from .train.__main__ import build_parser as train_parser
        except ImportError as e:
            parser.exit(2, f"atst-features train needs the training extra: pip install 'atst-features[train]' ({e})\n")
        train_parser().print_help()
        parser.exit(0)


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
        help="embed folders, files or lists of audio files into .npz files (resumable)",
        description=(
            "Embed every audio file under the INPUTs into OUT/<relative path>.npz (arrays clip, frames, timestamps), "
            "with OUT/index.jsonl (one row per input: ok / skipped / failed) and OUT/metadata.json. "
            "With several INPUTs, paths are relative to the deepest folder holding them all. "
            "A rerun skips what is up to date. The exit status is 1 when a file failed, or when nothing was "
            "embedded because container files (m4a, mp4, webm, ...) need PyAV (pip install 'atst-features[av]')."
        ),
    )
    p.add_argument(
        "input",
        metavar="INPUT",
        nargs="+",
        help="folders (recursive), audio files, lists of paths (@FILE or .txt/.lst/.list), or - for a list on stdin",
    )
    p.add_argument("--out", required=True, metavar="OUT", help="output folder")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME|DIR|FILE", help=f"model to load (default {DEFAULT_MODEL})")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ... (default auto)")
    p.add_argument(
        "--dtype", choices=[*COMPUTE_DTYPES, "auto"],
        help="encoder precision (default bfloat16 on CUDA, float32 on CPU; auto: bfloat16 on a CPU that computes it natively)",
    )
    p.add_argument(
        "--backend", choices=["torch", "onnxruntime", "onnxruntime-int8"], default="torch",
        help="encoder passes on torch (default) or ONNX Runtime on the CPU, float32 or int8 (needs the [onnx] extra)",
    )
    p.add_argument("--what", default="clip,frames", help="clip, frames or clip,frames (default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (pays off on long GPU runs)")
    p.add_argument("--layers", type=_layers_arg, help="blocks for both clip and frames (all, last, or indices like 0,5,11)")
    p.add_argument("--clip-layers", type=_layers_arg, default="all", help="blocks of the clip vector (default all)")
    p.add_argument("--frame-layers", type=_layers_arg, default="last", help="blocks of the frame embeddings (default last)")
    p.add_argument("--frames-dtype", choices=list(STORAGE_DTYPES), default="float16", help="storage of frames (default float16)")
    p.add_argument("--batch-size", type=int, help="chunks of up to 10 s per encoder pass (default 64 on CUDA, 16 on CPU)")
    p.add_argument("--workers", type=int, help="decoding processes (default min(8, CPUs - 1), 0 with <= 2 CPUs; 0 = none)")
    p.add_argument("--shard", metavar="i/N", help="embed only shard i of N (0-based), e.g. one per node")
    p.add_argument("--force", action="store_true", help="recompute outputs that are up to date")
    p.add_argument("--stream-seconds", type=float, default=600.0, help="decode files longer than this in blocks (default 600)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--format",
        choices=["npz", "parquet"],
        default="npz",
        help="npz (default), or parquet: also gather the outputs into OUT/embeddings.parquet (needs the [parquet] extra)",
    )
    p.set_defaults(func=_embed)
    return p


def _embed(args: argparse.Namespace) -> int:
    import warnings
    from pathlib import Path

    import torch

    from .batch import ContainersSkipped, OutputFolderError, embed_folder, printable
    from .errors import LoadError

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    try:
        model = args.model
        if args.backend != "torch" or dtype == "auto":  # loaded here: embed_folder takes the model as it is
            from .weights import load

            model = load(args.model, device=device, dtype=dtype, backend=args.backend)
            for key, why in model.choices.items():
                print(f"atst-features embed: {key}: {printable(why)}", file=sys.stderr)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ContainersSkipped)
            summary = embed_folder(
                args.input,
                args.out,
                model=model,
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
    except (FileNotFoundError, ValueError, TypeError, OutputFolderError, LoadError, ImportError) as e:  # one line
        print(f"atst-features embed: {printable(str(e))}", file=sys.stderr)
        return 2
    for rel, error in summary.failures[:_MAX_FAILURES_SHOWN]:  # names escaped for the terminal
        print(f"failed: {printable(rel)}: {printable(error)}", file=sys.stderr)
    if len(summary.failures) > _MAX_FAILURES_SHOWN:
        more = len(summary.failures) - _MAX_FAILURES_SHOWN
        print(f"... and {more} more failures (see {printable(str(summary.index_path))})", file=sys.stderr)
    skipped = sum(w.message.count for w in caught if isinstance(w.message, ContainersSkipped))
    for w in caught:
        if isinstance(w.message, ContainersSkipped):
            print(f"atst-features embed: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    print(printable(str(summary)), file=sys.stderr)
    status = summary.exit_status or (1 if skipped and not (summary.ok or summary.skipped) else 0)
    if args.format == "parquet" and summary.aborted is None and (summary.ok or summary.skipped):
        from .batch.read import PARQUET_NAME, to_parquet

        try:
            print(f"wrote {printable(str(to_parquet(args.out, Path(args.out) / PARQUET_NAME)))}", file=sys.stderr)
        except (ImportError, OSError, ValueError) as e:
            print(f"atst-features embed: {printable(str(e))}", file=sys.stderr)
            return 2
    return status


# ---- end of embed subcommand


# ---- detect subcommand (atst_features.detect over the embed engine)


def add_detect_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``atst-features detect`` (``detect.detect_files``)."""
    from .sed import DEFAULT_DETECT_MODEL

    p = sub.add_parser(
        "detect",
        help="detect sound events in audio files with a frame-level head (AudioSet-strong by default)",
        description=(
            "Detect sound events in every audio file under the INPUTs and print them as a table, or write them to "
            "--out (events.csv: file,onset,offset,label,score, one row per event, sorted by file then onset; "
            "events.jsonl: the same fields). The frame scores behind the events are kept in a scores folder "
            "(--scores; by default OUT.scores beside --out): a rerun resumes from it and only re-decodes files "
            "whose scores are up to date, so new thresholds cost no model pass. A file that fails is reported and "
            "skipped (exit status 1)."
        ),
    )
    p.add_argument("input", metavar="INPUT", nargs="+", help="audio files, folders (recursive), lists of paths (@FILE)")
    p.add_argument("--model", default=DEFAULT_DETECT_MODEL, metavar="NAME|DIR|FILE",
                   help=f"a model with a frame-level head (default {DEFAULT_DETECT_MODEL})")
    p.add_argument("--threshold", type=float, default=0.5, help="score a frame needs to be active (default 0.5)")
    p.add_argument("--median-filter", type=float, default=0.0, metavar="S",
                   help="median filter of each class's decisions, in seconds (default 0: none)")
    p.add_argument("--hop-s", type=float, metavar="S",
                   help="overlapping 10 s windows every S seconds, so events do not break at 10 s seams (e.g. 5)")
    p.add_argument("--out", metavar="FILE", help="events.csv or events.jsonl (written whole, at the end)")
    p.add_argument("--scores", metavar="DIR", help="folder of the frame scores (.npz with scores, timestamps, labels)")
    p.add_argument("--plot", metavar="DIR", help="one PNG per file: spectrogram and events (needs matplotlib)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ... (default auto)")
    p.add_argument("--batch-size", type=int, help="chunks of up to 10 s per encoder pass")
    p.add_argument("--workers", type=int, help="decoding processes (0 = none)")
    p.add_argument("--force", action="store_true", help="recompute scores that are up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_detect)
    return p


def _detect(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from .batch import OutputFolderError, printable
    from .detect import detect_files, events_table, plot_run, write_events
    from .embed import resolve_device
    from .errors import LoadError

    if args.out is not None and Path(args.out).is_dir():
        print(f"atst-features detect: --out {printable(args.out)} is a folder; give a file (events.csv or events.jsonl)", file=sys.stderr)
        return 2
    scores = args.scores or (f"{args.out}.scores" if args.out else None)
    with tempfile.TemporaryDirectory(prefix="atst-detect-") as tmp:
        try:
            run = detect_files(
                args.input, scores or Path(tmp) / "scores", model=args.model, device=resolve_device(args.device),
                threshold=args.threshold, median_filter=args.median_filter, hop_s=args.hop_s,
                batch_size=args.batch_size, workers=args.workers, force=args.force, progress=not args.no_progress,
            )
        except (FileNotFoundError, ValueError, TypeError, OutputFolderError, LoadError) as e:
            print(f"atst-features detect: {printable(str(e))}", file=sys.stderr)
            return 2
    summary = run.summary
    for rel, error in summary.failures[:_MAX_FAILURES_SHOWN]:
        print(f"failed: {printable(rel)}: {printable(error)}", file=sys.stderr)
    if summary.aborted is not None:
        print(f"atst-features detect: stopped early ({printable(summary.aborted)}); no events written, rerun to resume", file=sys.stderr)
        return 1
    print(printable(str(summary)), file=sys.stderr)
    rows = run.rows()
    if args.out:
        write_events(args.out, rows)
        print(f"{len(rows)} events in {len(run.events)} files -> {printable(args.out)} (scores in {printable(scores)})", file=sys.stderr)
    else:
        print(events_table([{**r, "file": printable(r["file"])} for r in rows]))
    if args.plot:
        try:
            plot_run(run, args.plot)
        except (ImportError, OSError, ValueError) as e:
            print(f"atst-features detect: plots: {printable(str(e))}", file=sys.stderr)
            return 2
    return summary.exit_status


# ---- end of detect subcommand


# ---- weights subcommands (convert, download, list, publish)


def add_weights_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``convert``, ``download``, ``list`` and ``publish`` on the ``atst-features`` command.

    Each turns the loader's errors (``weights.LoadError``) and file-system errors into one line on
    stderr and exit status 1, without a traceback.
    """
    p = sub.add_parser("convert", help="convert an official ATST checkpoint to a model directory")
    p.add_argument("input", help="official checkpoint (.ckpt / .pth / .safetensors)")
    p.add_argument("out_dir", help="directory to write (config.json, model.safetensors, ...)")
    p.add_argument("--family", choices=["clip", "frame"], help="model family (default: read off the keys)")
    p.add_argument("--num-heads", type=int, help="attention heads (default: from the file's arch or the width)")
    p.add_argument("--head-level", choices=["clip", "frame"], help="level of a classification head (default: inferred)")
    p.add_argument("--labels", help="class names of the head: a JSON list or a text file with one name per line")
    p.add_argument("--depth", type=int, help="blocks the encoder must have (default: the official 12)")
    p.set_defaults(func=_convert)

    cache_help = "cache directory (default: $ATST_FEATURES_CACHE or ~/.cache/atst-features)"
    manifest_help = "a weights manifest to use instead of the packaged one"
    p = sub.add_parser("download", help="download, check and convert a published model into the cache")
    p.add_argument("name", help="a model name (see `atst-features list`)")
    p.add_argument("--cache-dir", help=cache_help)
    p.add_argument("--manifest", help=manifest_help)
    p.add_argument("--force", action="store_true", help="discard a cached copy and partial downloads, and fetch it again")
    p.add_argument(
        "--allow-other-file",
        action="store_true",
        default=None,
        help="accept a file that differs from its pinned size and sha256 (a warning, not an error; also "
        "ATST_FEATURES_ALLOW_OTHER_FILE=1): only for a file you knowingly use",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_download)

    p = sub.add_parser("list", help="list the published models, their licences and pins, and whether they are cached")
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


def _fail(command: str, error: BaseException) -> int:
    """One line (or the few lines of the message) for an error of the loader or the file system: exit status 1."""
    print(f"atst-features {command}: {error}", file=sys.stderr)
    return 1


def _convert(args: argparse.Namespace) -> int:
    from . import artifacts, convert
    from .errors import LoadError

    try:
        converted = convert.convert(
            artifacts.read_checkpoint(args.input),
            family=args.family,
            num_heads=args.num_heads,
            head_level=args.head_level,
            depth=args.depth,
        )
        out = artifacts.write_converted(converted, args.input, args.out_dir, args.labels)
    except (LoadError, ValueError, OSError) as e:
        return _fail("convert", e)
    print(converted.summary())
    print(f"wrote {out}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from . import weights

    try:
        path = weights.download(
            args.name,
            cache_dir=args.cache_dir,
            manifest=args.manifest,
            progress=not args.quiet,
            force=args.force,
            allow_other_file=args.allow_other_file,
        )
    except (weights.LoadError, OSError) as e:
        return _fail("download", e)
    print(path)
    return 0


def _list(args: argparse.Namespace) -> int:
    from . import fetch, registry, weights

    try:
        specs = registry.manifest(args.manifest)
        if args.json:
            print(json.dumps([dict(s.raw) for s in specs.values()], indent=2))
            return 0
        rows = [("name", "family", "arch", "clip dim", "frame dim", "head", "licence", "pin", "cached", "source")]
        for name, s in specs.items():
            cached = weights.is_cached(name, cache_dir=args.cache_dir, manifest=args.manifest)
            hosts = ["hub"] if s.hub.published else [fetch.host_of(src.url) for src in s.sources]
            rows.append(
                (
                    name,
                    str(s.family),
                    s.arch or "?",
                    str((s.outputs.get("clip_dim") or {}).get("all", "?")),
                    str((s.outputs.get("frame_dim") or {}).get("all", "?")),
                    f"{s.head.level} x{s.head.num_classes or '?'}" if s.head else "-",
                    (s.licence.spdx if s.licence else None) or "not stated",
                    weights.pin_status(name, cache_dir=args.cache_dir, manifest=args.manifest),
                    "yes" if cached else "no",
                    ", ".join(hosts) or "-",
                )
            )
    except (weights.LoadError, OSError) as e:
        return _fail("list", e)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(
        "\npin: 'pinned' = size and sha256 fixed by the manifest; 'first-use' = fixed by the first verified download "
        "into this cache (pins.json). Licences: see each entry's attribution (`atst-features list --json`)."
    )
    return 0


def _publish(args: argparse.Namespace) -> int:
    from . import hub, weights

    try:
        block = hub.publish(
            args.dir, args.repo_id, name=args.name, manifest=args.manifest, private=args.private, token=args.token
        )
    except (weights.LoadError, OSError) as e:
        return _fail("publish", e)
    print(json.dumps({"hub": block}, indent=2))
    return 0


# ---- end of weights subcommands


# ---- export subcommand (atst_features.onnx_export; needs the [onnx] extra)


def add_export_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``atst-features export`` (``onnx_export.export_onnx``)."""
    from .embed import DEFAULT_MODEL
    from .onnx_export import DEFAULT_OPSET

    export = sub.add_parser("export", help="export the encoder for other runtimes: export onnx MODEL OUT.onnx")
    formats = export.add_subparsers(dest="format", required=True, metavar="FORMAT")
    p = formats.add_parser(
        "onnx",
        help="one ONNX graph of the encoder for ONNX Runtime (needs the [onnx] extra)",
        description=(
            "Write the encoder of MODEL as one ONNX graph: inputs mel (B, 64, T <= 1001) float32 and n_tokens (B,) "
            "int64, output features (B, L, N, D), the normed output of each exported block ([CLS] first for "
            "ATST-Clip). The config, blocks, weights' sha256 and package version are in the graph's metadata; "
            "onnx_export.OnnxForward runs it, af.load(MODEL, backend='onnxruntime') caches and uses one."
        ),
    )
    p.add_argument("model", metavar="MODEL", help=f"a model name, converted directory or checkpoint file (e.g. {DEFAULT_MODEL})")
    p.add_argument("out", metavar="OUT", help="the .onnx file to write")
    p.add_argument("--layers", type=_layers_arg, default="all", help="blocks the graph outputs (default all)")
    p.add_argument("--int8", action="store_true", help="quantize the weight matrix multiplications to int8 (dynamic)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.set_defaults(func=_export)
    return p


def _export(args: argparse.Namespace) -> int:
    from . import onnx_export, weights
    from .embed import resolve_layers

    try:
        model = weights.load(args.model)
        blocks = resolve_layers(args.layers, model.config.depth)
        path = onnx_export.export_onnx(
            model.encoder, args.out, blocks=blocks, opset=args.opset, int8=args.int8,
            weights_sha256=model.weights_sha256,
        )
    except (weights.LoadError, ImportError, ValueError, OSError) as e:
        return _fail("export", e)
    print(path)
    return 0


# ---- end of export subcommand


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
