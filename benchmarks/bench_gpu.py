"""GPU throughput of ATST-Frame base (random weights): 10 s clips, frame embeddings of all 12 blocks
left on the GPU, reported as clips/s and model FLOP utilisation (MFU).

Paths, all in one run on the same weights and input:
  eager-fp32   a naive re-statement of the same math (``bench_cpu.eager_frames``), the baseline;
  ours-fp32    front end + ``ATSTEncoder`` (SDPA), float32 (TF32 off);
  ours-bf16    the same with the encoder in bfloat16 (front end and norms float32);
  ours-bf16-compiled   ``torch.compile`` of the bf16 encoder (``--compile``).

Run on a CUDA machine:  python benchmarks/bench_gpu.py [--batch 64 256] [--iters 10] [--compile] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_cpu import eager_frames  # noqa: E402

from atst_features import frontend  # noqa: E402
from atst_features.model import ATSTConfig, ATSTEncoder  # noqa: E402

SR = frontend.SAMPLE_RATE
CLIP_SAMPLES = 10 * SR


def flops_per_clip(cfg: ATSTConfig, tokens: int = 250) -> float:
    """Matmul FLOPs of one 10 s clip (2 per multiply-add): patch embed, qkv, attention, proj, MLP."""
    d, n = cfg.embed_dim, tokens
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * int(d * cfg.mlp_ratio)
    return cfg.depth * per_block + 2 * n * cfg.patch_h * cfg.patch_w * d


def ours(encoder: ATSTEncoder, wavs: torch.Tensor) -> torch.Tensor:
    """(B, N) waveforms on the GPU -> (B, 250, 12 * D) frame embeddings on the GPU."""
    mel, _ = frontend.log_mel(wavs)
    out = encoder(mel, None, list(range(encoder.cfg.depth)))  # (B, L, P, D)
    return out.permute(0, 2, 1, 3).flatten(2)


def clips_per_s(fn, batch: int, iters: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100 SXM: 989)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    torch.manual_seed(0)
    cfg = ATSTConfig(family="frame", embed_dim=768, depth=12, num_heads=12)
    fp32 = ATSTEncoder(cfg).cuda().eval()
    sd = {k: v for k, v in fp32.state_dict().items()}
    bf16 = ATSTEncoder(cfg).cuda().eval()
    bf16.load_state_dict(sd)
    bf16.to(torch.bfloat16)
    compiled = torch.compile(bf16) if args.compile else None
    flop = flops_per_clip(cfg)
    print(f"{torch.cuda.get_device_name()}  ATST-Frame base, 10 s clips, all 12 blocks on the GPU; "
          f"{flop / 1e9:.1f} GFLOP/clip; MFU vs {args.peak_tflops:.0f} TFLOP/s")
    print(f"{'batch':>5} {'path':<20} {'clips/s':>9} {'MFU':>6} {'vs eager':>9}")
    for batch in args.batch:
        wavs = 0.1 * torch.randn(batch, CLIP_SAMPLES, device="cuda")
        paths = {
            "eager-fp32": lambda: eager_frames(sd, cfg, wavs),
            "ours-fp32": lambda: ours(fp32, wavs),
            "ours-bf16": lambda: ours(bf16, wavs),
        }
        if compiled is not None:
            paths["ours-bf16-compiled"] = lambda: ours(compiled, wavs)
        with torch.inference_mode():
            ref = ours(fp32, wavs)
            cos = F.cosine_similarity(ours(bf16, wavs).float().flatten(0, 1).unflatten(-1, (12, -1)),
                                      ref.flatten(0, 1).unflatten(-1, (12, -1)), dim=-1).min().item()
            speeds = {name: clips_per_s(fn, batch, args.iters) for name, fn in paths.items()}
        for name, s in speeds.items():
            mfu = s * flop / (args.peak_tflops * 1e12)
            print(f"{batch:>5} {name:<20} {s:9.0f} {mfu:6.1%} {s / speeds['eager-fp32']:8.2f}x")
        print(f"{batch:>5} bf16 min per-frame, per-block cosine to fp32: {cos:.5f}")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
