"""CPU throughput and accuracy of every CPU path, ATST-Frame base (random weights), in one run.

10 s clips, all 12 blocks' frame embeddings through ``ATSTModel.embed_frames`` (the package's own
API: front end, chunking, pooling and output handling included in every row), on one model
directory written by the package (``artifacts.save_converted``) and loaded with ``af.load``:

  torch fp32, default GEMM   the encoder on torch's default float32 GEMM (the package before the
                             GEMM check): the baseline of every ratio;
  torch fp32                 ``af.load(d)``: the GEMM path ``cpu.choose_gemm`` measured faster;
  torch bf16                 ``af.load(d, dtype="bfloat16")``;
  ORT fp32                   ``af.load(d, backend="onnxruntime")``: the exported float32 graph;
  ORT int8                   ``af.load(d, backend="onnxruntime-int8")``: its linear layers in int8;
  eager (``--eager``)        a naive op-by-op re-statement of the math (plain torch, float32).

Timing: after one warm-up call of each, rounds run every path once, in an order rotated each
round; a round counts when other processes used under 10 % of the CPUs during each of its runs
(Linux ``/proc/stat``; rounds are retried up to 2x ``--rounds``, else all are used and the table
says so). Per path: clips/s at the min / median / max time, and the paired ratio (the median over
rounds of baseline time / path time in the same round). "others" is the mean share of the CPUs
other processes used during the counted runs. Accuracy: per-frame cosine (each block's 768-d
vector of each frame) to the fp32 torch output, min and mean, and max |difference|.

The GEMM ceiling is the best of torch's default and oneDNN GEMMs on the encoder's MLP shape
(1000 x 768 x 3072), per precision; MFU = the encoder's FLOPs x clips/s / that ceiling (fp32
ceiling for the fp32 and int8 rows, bf16 ceiling for bf16).

Run:  python benchmarks/bench_cpu.py [--batch 1 4 16] [--rounds 5] [--threads N] [--no-onnx] [--eager]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F

import atst_features as af
from atst_features import cpu, frontend
from atst_features.artifacts import save_converted
from atst_features.model import ATSTConfig, ATSTEncoder, Linear

SR = frontend.SAMPLE_RATE
CLIP_S = 10.0
MAX_OTHERS = 0.1  # share of the CPUs other processes may use during a counted run
QUIET_PATIENCE_S = 2.0  # longest wait for a quiet moment before a timed run
BASELINE = "torch fp32, default GEMM"


# ---------------------------------------------------------------------------- the machine


def cpu_busy_seconds() -> float:
    """CPU seconds every process has used since boot (Linux; NaN elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def cpu_summary() -> str:
    flags = cpu.cpu_flags()
    shown = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma", "avx_vnni")))
    return (
        f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"capability {torch.backends.cpu.get_cpu_capability()}); flags: {' '.join(shown) or 'unknown'}"
    )


def wait_until_quiet(max_others: float = MAX_OTHERS, patience_s: float = QUIET_PATIENCE_S) -> None:
    """Sleep in 0.5 s steps until other processes use under ``max_others`` of the CPUs for that
    long, at most ``patience_s`` seconds."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        busy, mine = cpu_busy_seconds(), time.process_time()
        time.sleep(0.5)
        if not (cpu_busy_seconds() - busy - (time.process_time() - mine)) / (0.5 * os.cpu_count()) > max_others:
            return  # quiet (or NaN: no /proc/stat to tell)


def timed_once(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(seconds, share of the CPUs other processes used meanwhile, output) of one call."""
    busy, mine, t0 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
    out = fn()
    t = time.perf_counter() - t0
    others = max(0.0, cpu_busy_seconds() - busy - (time.process_time() - mine)) / (t * os.cpu_count())
    return t, others, out


def interleaved(
    paths: dict[str, Callable[[], object]], rounds: int, warm_up: bool = True
) -> tuple[dict[str, list[tuple[float, float]]], int, int]:
    """Per path the (seconds, others) of each counted round; the rounds counted and tried.

    Each path is called once to warm up (unless the caller did); then each round calls every path
    once, in an order rotated each round.
    """
    for fn in paths.values() if warm_up else ():
        fn()
    names = list(paths)
    counted: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    every: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    tried = 0
    while len(counted[names[0]]) < rounds and tried < 2 * rounds:
        order = names[tried % len(names):] + names[: tried % len(names)]
        tried += 1
        got = {}
        for n in order:
            wait_until_quiet()
            t, others, _ = timed_once(paths[n])
            got[n] = (t, others)
            every[n].append(got[n])
        if all(o <= MAX_OTHERS for _, o in got.values()):
            for n in names:
                counted[n].append(got[n])
    if len(counted[names[0]]) < rounds:
        return every, tried, tried
    return counted, len(counted[names[0]]), tried


def gemm_ceiling(dtype: torch.dtype, rows: int = 1000, dim: int = 768, hidden: int = 3072, repeats: int = 5) -> float:
    """The best GFLOP/s of torch's default and oneDNN GEMMs on a (rows, dim) x (dim, hidden) product."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=gen).to(dtype)
    with torch.device("meta"):
        layer = Linear(dim, hidden)
    layer.load_state_dict({"weight": (0.02 * torch.randn(hidden, dim, generator=gen)).to(dtype),
                           "bias": torch.zeros(hidden, dtype=dtype)}, assign=True)
    best = float("inf")
    with torch.inference_mode():
        for onednn in (False, True):
            layer.onednn = onednn
            layer(x)
            for _ in range(repeats):
                t0 = time.perf_counter()
                layer(x)
                best = min(best, time.perf_counter() - t0)
    return 2 * rows * dim * hidden / best / 1e9


def encoder_gflop(cfg: ATSTConfig, tokens: int) -> float:
    """FLOPs (multiply-adds x 2) of one encoder pass over ``tokens`` tokens, in GFLOP."""
    d, h = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    per_block = 2 * tokens * d * (3 * d + d + 2 * h) + 4 * tokens * tokens * d
    return (cfg.depth * per_block + 2 * tokens * cfg.patch_h * cfg.patch_w * d) / 1e9


# ---------------------------------------------------------------------------- the eager re-statement


def eager_frames(sd: dict[str, torch.Tensor], cfg: ATSTConfig, wavs: torch.Tensor) -> torch.Tensor:
    """The official math written out op by op: (B, N) waveforms -> (B, T', 12 * D)."""
    mel, _ = frontend.log_mel(wavs)
    x = mel[:, :, : (mel.shape[-1] // 4) * 4]
    b, h, t = x.shape
    x = x.reshape(b, h, t // 4, 4).permute(0, 2, 1, 3).reshape(b, t // 4, h * 4)
    x = x @ sd["patch_embed.weight"].T + sd["patch_embed.bias"]
    x = x + sd["pos_embed"][:, 1 : x.shape[1] + 1]
    n = x.shape[1]
    heads, d = cfg.num_heads, cfg.embed_dim
    outs = []
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], cfg.layernorm_eps)
        qkv = (y @ sd[p + "attn.qkv.weight"].T).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-2, -1)) * (d // heads) ** -0.5
        y = (att.softmax(dim=-1) @ qkv[2]).transpose(1, 2).reshape(b, n, d)
        x = x + y @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        y = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], cfg.layernorm_eps)
        y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        outs.append(F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], cfg.layernorm_eps))
    return torch.cat(outs, dim=-1)


# ---------------------------------------------------------------------------- the run


def load_paths(directory: str, onnx: bool) -> tuple[dict[str, af.ATSTModel], dict[str, float]]:
    """The models of every path, and the seconds each took to load (ONNX: export included)."""
    models, setup = {}, {}
    kinds = [(BASELINE, {}), ("torch fp32", {}), ("torch bf16", {"dtype": "bfloat16"})]
    if onnx:
        kinds += [("ORT fp32", {"backend": "onnxruntime"}), ("ORT int8", {"backend": "onnxruntime-int8"})]
    for name, kwargs in kinds:
        t0 = time.perf_counter()
        models[name] = af.load(directory, **kwargs)
        setup[name] = time.perf_counter() - t0
    for m in models[BASELINE].encoder.modules():
        if isinstance(m, Linear):
            m.onednn = False  # torch's default GEMM, as before the check
    models[BASELINE].choices["gemm"] = "default GEMM (set by this script: the baseline)"
    return models, setup


def cosines(got: torch.Tensor, ref: torch.Tensor, dim: int) -> tuple[float, float, float]:
    """(min, mean per-frame-and-block cosine, max |difference|) of (B, T', L * dim) frames."""
    cos = F.cosine_similarity(got.reshape(-1, dim).double(), ref.reshape(-1, dim).double(), dim=-1)
    return cos.min().item(), cos.mean().item(), (got - ref).abs().max().item()


def random_base_encoder(threads: int | None) -> tuple[ATSTConfig, dict[str, torch.Tensor]]:
    """ATST-Frame base's config and a random state dict (seed 0), after setting ``threads`` (if
    given) and printing the machine summary: the common start of this folder's CPU benchmarks."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ATSTConfig(family="frame", embed_dim=768, depth=12, num_heads=12)
    sd = ATSTEncoder(cfg).state_dict()
    print(cpu_summary())
    return cfg, sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], help="chunks per encoder pass (a table each)")
    ap.add_argument("--clips", type=int, default=4, help="10 s clips per call (at least the batch size)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    ap.add_argument("--eager", action="store_true", help="also time the op-by-op eager re-statement")
    args = ap.parse_args()
    cfg, sd = random_base_encoder(args.threads)
    ceilings = {torch.float32: gemm_ceiling(torch.float32), torch.bfloat16: gemm_ceiling(torch.bfloat16)}
    print(f"GEMM ceiling (1000x768x3072): fp32 {ceilings[torch.float32]:.0f} GFLOP/s, "
          f"bf16 {ceilings[torch.bfloat16]:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        directory = str(save_converted(cfg, sd, os.path.join(tmp, "atst-frame-base-random")))
        models, setup = load_paths(directory, onnx=not args.no_onnx)
        for name, model in models.items():
            print(f"  {name}: loaded in {setup[name]:.1f} s; {'; '.join(f'{k}: {v}' for k, v in model.choices.items())}")
        gflop_clip = encoder_gflop(cfg, cfg.max_tokens)
        for batch in args.batch:
            clips = max(args.clips, batch)
            wavs = 0.1 * torch.randn(clips, int(CLIP_S * SR), generator=torch.Generator().manual_seed(batch))
            paths: dict[str, Callable[[], object]] = {
                name: (lambda m=model: m.embed_frames(wavs, SR, batch_size=batch)) for name, model in models.items()
            }
            if args.eager:
                def eager() -> torch.Tensor:
                    with torch.inference_mode():
                        return eager_frames(sd, cfg, wavs)
                paths["eager (op by op)"] = eager
            outputs = {n: fn() for n, fn in paths.items()}  # also the warm-up
            runs, counted, tried = interleaved(paths, args.rounds, warm_up=False)
            ref = outputs["torch fp32"].embeddings
            note = f"{counted} rounds counted of {tried}"
            if any(o > MAX_OTHERS for r in runs.values() for _, o in r):
                note += " (too few quiet rounds: every round included)"
            print(f"\nbatch {batch}: {clips} x {CLIP_S:.0f} s clips, all {cfg.depth} blocks; {note}")
            print("| path | clips/s (min / median / max) | paired ratio | MFU | cosine min | cosine mean | max abs diff | others |")
            print("|---|---|---|---|---|---|---|---|")
            base = [t for t, _ in runs[BASELINE]]
            for name, rs in runs.items():
                ts = [t for t, _ in rs]
                ratio = statistics.median(b / t for b, t in zip(base, ts))
                rate = [clips / t for t in (max(ts), statistics.median(ts), min(ts))]
                out = outputs[name]
                out = out.embeddings if hasattr(out, "embeddings") else out
                cmin, cmean, err = cosines(out.float(), ref, cfg.embed_dim)
                ceiling = ceilings[torch.bfloat16 if "bf16" in name else torch.float32]
                mfu = gflop_clip * rate[1] / ceiling
                others = statistics.mean(o for _, o in rs)
                print(f"| {name} | {rate[0]:.2f} / {rate[1]:.2f} / {rate[2]:.2f} | {ratio:.2f}x | {mfu:.0%} | "
                      f"{cmin:.5f} | {cmean:.6f} | {err:.1e} | {others:.0%} |")


if __name__ == "__main__":
    main()
