"""Embed a folder of audio with Ray Data (a laptop or a cluster) and write Parquet files.

    pip install 'atst-features[ray]'
    python examples/ray_embed.py /data/audio /data/embeddings --model atst-frame-base
    python examples/ray_embed.py /data/audio /data/embeddings --gpus-per-actor 1 --actors 8   # GPU actors

On a cluster, start Ray on every node (``ray start --head`` / ``ray start --address=HEAD:6379``),
put the audio and the model on storage every node can read, and pass ``--address auto``.
Each row of the output has ``path``, ``rel``, ``clip``, ``frames``, ``timestamps``, ``duration``
and ``error`` (non-empty for a file that could not be decoded).
"""

from __future__ import annotations

import argparse

import ray

from atst_features.ray_data import embed_dataset, read_audio_files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("input", help="a folder (recursive), an audio file, or a list of paths (@FILE or .txt)")
    p.add_argument("out", help="output folder for the Parquet files")
    p.add_argument("--model", default="atst-frame-base", help="model name, converted directory or checkpoint")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' to join a running cluster; default: local)")
    p.add_argument("--actors", type=int, default=1, help="model replicas")
    p.add_argument("--gpus-per-actor", type=float, default=0, help="e.g. 1, or 0.5 to put two actors on a GPU")
    p.add_argument("--what", default="clip,frames", help="clip, frames or clip,frames")
    args = p.parse_args()

    ray.init(address=args.address)
    files = read_audio_files(args.input)
    embedded = embed_dataset(files, args.model, num_gpus=args.gpus_per_actor or None, concurrency=args.actors, what=args.what)
    embedded.write_parquet(args.out)

    status = ray.data.read_parquet(args.out, columns=["rel", "error"]).to_pandas()  # cheap: no re-embedding
    failed = status[status["error"] != ""]
    for rel, error in zip(failed["rel"], failed["error"]):
        print(f"failed: {rel}: {error}")
    print(f"wrote {len(status) - len(failed)} embedded files to {args.out}; {len(failed)} failed")


if __name__ == "__main__":
    main()
