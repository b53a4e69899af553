"""One-time costs of the ONNX Runtime backends, ATST-Frame base (random weights).

For each of ``af.load(d, backend="onnxruntime")`` and ``"onnxruntime-int8"`` on one model
directory written by the package: the first load (export, and quantization for int8, into
``d/onnx/``), a second load (the cached graph: its sha256 checked, a session made), and the
graph's size. Throughput and accuracy of every path are ``bench_cpu.py``'s; this script only
times what a deployment pays once. Each load is timed ``--repeats`` times in a fresh cache
(min / median / max).

Run:  python benchmarks/bench_onnx.py [--repeats 1] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


import atst_features as af
from atst_features.artifacts import save_converted
from atst_features.onnx_export import GRAPH_DIR

from bench_cpu import random_base_encoder  # this folder's CPU benchmark: the same start

BACKENDS = ("onnxruntime", "onnxruntime-int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    cfg, sd = random_base_encoder(args.threads)
    times: dict[str, tuple[list[float], list[float], int]] = {b: ([], [], 0) for b in BACKENDS}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
            directory = save_converted(cfg, sd, os.path.join(tmp, "model"))
            for backend in BACKENDS:
                first, again, _ = times[backend]
                t0 = time.perf_counter()
                af.load(directory, backend=backend)
                first.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                model = af.load(directory, backend=backend)
                again.append(time.perf_counter() - t0)
                graph = model.choices["backend"].split(": ", 1)[1]
                times[backend] = (first, again, os.path.getsize(graph))
            assert len(list((directory / GRAPH_DIR).glob("*.onnx"))) == len(BACKENDS)

    def spread(ts: list[float]) -> str:
        return f"{min(ts):.1f} / {statistics.median(ts):.1f} / {max(ts):.1f}"

    print("| backend | first load, s (min / median / max) | cached load, s | graph size |")
    print("|---|---|---|---|")
    for backend, (first, again, size) in times.items():
        print(f"| {backend} | {spread(first)} | {spread(again)} | {size / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
