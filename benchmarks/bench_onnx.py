"""CPU throughput of ATST-Frame base (random weights) on the ONNX Runtime backends.

10 s clips, all 12 blocks' frame embeddings through ``ATSTModel.embed_frames`` (the one engine:
front end, chunking and pooling are the same in every row), in one run and on the same weights
and input:
  torch      the encoder itself, float32: the baseline;
  onnx       the exported float32 graph in ONNX Runtime (``attach_backend(model, "onnx")``);
  onnx-int8  the same graph with its weight matrix multiplications in int8 ("onnx-int8").
Also the one-time costs: exporting each graph, and loading it again from the cache. Timing as in
``bench_cpu.py``: runs during which other processes took over 10 % of the CPUs are repeated, and
"others" is their share during the run reported.

Run:  python benchmarks/bench_onnx.py [--clips 4] [--batch 4] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from bench_cpu import CLIP_S, SR, cpu_name, timed  # this folder's CPU benchmark: the same clips and timer

from atst_features.model import ATSTConfig, ATSTEncoder
from atst_features.onnx_export import attach_backend
from atst_features.weights import build

BACKENDS = ("torch", "onnx", "onnx-int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--batch", type=int, nargs="+", default=[4], help="chunks per encoder pass (one row each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    torch.manual_seed(0)
    cfg = ATSTConfig(family="frame", embed_dim=768, depth=12, num_heads=12)
    sd = ATSTEncoder(cfg).state_dict()
    wavs = 0.1 * torch.randn(args.clips, int(CLIP_S * SR))
    models, setup = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as cache:
        for backend in BACKENDS:
            t0 = time.perf_counter()
            models[backend] = attach_backend(build(cfg, sd), backend, cache)
            t_export = time.perf_counter() - t0
            t0 = time.perf_counter()
            attach_backend(build(cfg, sd), backend, cache)  # from the cache: hash check + session
            setup[backend] = (t_export, time.perf_counter() - t0)

        rows = []
        for batch in args.batch:
            results = {
                b: timed(lambda m=m: m.embed_frames(wavs, SR, batch_size=batch), args.repeats) for b, m in models.items()
            }
            ref = results["torch"][1].embeddings.reshape(-1, cfg.embed_dim)
            for backend, (t, out, others) in results.items():
                got = out.embeddings.reshape(-1, cfg.embed_dim)
                err = (got - ref).abs().max().item()
                cos = F.cosine_similarity(got, ref, dim=-1).min().item()
                rows.append((backend, batch, t, results["torch"][0] / t, err, cos, others))

    print(
        f"ATST-Frame base, {args.clips} x {CLIP_S:.0f} s clips, all 12 blocks, {torch.get_num_threads()} threads; "
        f"{cpu_name()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}"
    )
    print(
        f"{'backend':<10} {'batch':>5} {'s/run':>8} {'clips/s':>8} {'x realtime':>10} {'vs torch':>8} {'max |err|':>9} "
        f"{'min cos':>8} {'others':>7}"
    )
    for backend, batch, t, ratio, err, cos, others in rows:
        print(
            f"{backend:<10} {batch:5d} {t:8.3f} {args.clips / t:8.2f} {args.clips * CLIP_S / t:10.1f} {ratio:7.2f}x "
            f"{err:9.1e} {cos:8.5f} {others:7.0%}"
        )
    print("one-time: " + "; ".join(f"{b} export {e:.1f} s, cached load {c:.1f} s" for b, (e, c) in setup.items() if b != "torch"))


if __name__ == "__main__":
    main()
