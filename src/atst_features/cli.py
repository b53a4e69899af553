"""The ``atst-features`` command: a thin argparse layer over the library.

Each subcommand lives beside the code it drives and registers itself here through an
``add_parser(subparsers)`` function that sets ``func`` (returning an exit status).
"""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    from . import batch, hub

    parser = argparse.ArgumentParser(prog="atst-features", description="ATST audio embeddings: embed, convert, download.")
    parser.add_argument("--version", action="version", version=f"atst-features {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    batch.add_parser(sub)
    hub.add_parsers(sub)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
