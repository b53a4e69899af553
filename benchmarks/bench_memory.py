"""Peak memory of in-memory embedding of long audio (ATST-Frame small, random weights).

Each case runs in a fresh process; it reports how far the process's peak resident memory rose
above its level just before the call (the waveform and model already loaded):

  whole-input mel   ``frontend.log_mel`` of the whole waveform at once: what in-memory embedding
                    computed before it streamed (the baseline);
  embed_frames      ``embed_frames(layers="last")`` + ``embed_clip`` through the engine, which cuts
                    the input into windows of ``batch_size`` chunks.

Run:  python benchmarks/bench_memory.py [--minutes 30] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np
import torch

from atst_features import frontend
from atst_features.model import ATSTConfig, ATSTEncoder
from atst_features.weights import build

SR = frontend.SAMPLE_RATE


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _case(name: str, minutes: float, batch_size: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ATSTConfig(family="frame", embed_dim=384, num_heads=6)
    model = build(cfg, ATSTEncoder(cfg).state_dict())
    wav = (np.random.default_rng(0).standard_normal(int(minutes * 60 * SR)) * 0.1).astype(np.float32)
    model.embed_clip(wav[: 3 * SR], SR)  # warm up the allocator and kernels on a short clip
    before = _rss_bytes()
    t0 = time.perf_counter()
    if name == "whole-input mel":
        frontend.log_mel(torch.from_numpy(wav)[None])
    else:
        frames = model.embed_frames(wav, SR, layers="last", batch_size=batch_size)
        clip = model.embed_clip(wav, SR, batch_size=batch_size)
        assert frames.embeddings.shape[1] == cfg.embed_dim and clip.shape == (cfg.depth * cfg.embed_dim,)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    queue.put((name, (peak - before) / 1e6, seconds))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for name in ("whole-input mel", "embed_frames"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_case, args=(name, args.minutes, args.batch_size, args.threads, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    print(f"torch {torch.__version__}, {args.threads} threads, {args.minutes:g} min of audio, batch size {args.batch_size}")
    print("| case | peak RSS growth (MB) | seconds | vs whole-input mel |")
    print("|---|---|---|---|")
    base = rows[0][1]
    for name, growth, seconds in rows:
        print(f"| {name} | {growth:.0f} | {seconds:.1f} | {growth / base:.2f}x |")


if __name__ == "__main__":
    main()
