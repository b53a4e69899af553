"""CPU throughput of ATST-Frame base (random weights): 10 s clips, all 12 blocks' frame embeddings.

Compares, in one run and on the same weights and input:
  eager   a naive re-statement of the same math (explicit matmul attention with an additive mask,
          every block's output normed, plain torch ops, float32): the baseline;
  ours    ``ATSTModel.embed_frames`` in float32;
  bf16    ``ATSTModel.embed_frames`` with the encoder in bfloat16 (front end and norms float32).

Run:  python benchmarks/bench_cpu.py [--clips 4] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from atst_features import frontend
from atst_features.model import ATSTConfig, ATSTEncoder
from atst_features.weights import build

SR = frontend.SAMPLE_RATE
CLIP_S = 10.0


def eager_frames(sd: dict[str, torch.Tensor], cfg: ATSTConfig, wavs: torch.Tensor) -> torch.Tensor:
    """The official math written out op by op: (B, N) waveforms -> (B, T', 12 * D)."""
    mel, n_frames = frontend.log_mel(wavs)
    x = mel[:, :, : (mel.shape[-1] // 4) * 4]
    b, h, t = x.shape
    x = x.reshape(b, h, t // 4, 4).permute(0, 2, 1, 3).reshape(b, t // 4, h * 4)
    x = x @ sd["patch_embed.weight"].T + sd["patch_embed.bias"]
    x = x + sd["pos_embed"][:, 1 : x.shape[1] + 1]
    n = x.shape[1]
    mask = torch.zeros(b, 1, 1, n, device=x.device)  # every key valid: the additive mask is all zeros
    heads, d = cfg.num_heads, cfg.embed_dim
    outs = []
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], cfg.layernorm_eps)
        qkv = (y @ sd[p + "attn.qkv.weight"].T).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5 + mask
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + y @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        y = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], cfg.layernorm_eps)
        y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        outs.append(F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], cfg.layernorm_eps))
    return torch.cat(outs, dim=-1)


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = ATSTConfig(family="frame", embed_dim=768, depth=12, num_heads=12)
    sd = ATSTEncoder(cfg).state_dict()
    model = build(cfg, sd)
    model_bf16 = build(cfg, sd).to(dtype=torch.bfloat16)
    wavs = 0.1 * torch.randn(args.clips, int(CLIP_S * SR))

    with torch.inference_mode():
        t_eager, ref = timed(lambda: eager_frames(sd, cfg, wavs), args.repeats)
    t_ours, ours = timed(lambda: model.embed_frames(wavs, SR, batch_size=args.clips), args.repeats)
    t_bf16, low = timed(lambda: model_bf16.embed_frames(wavs, SR, batch_size=args.clips), args.repeats)

    err = (ours.embeddings - ref).abs().max().item()
    cos = F.cosine_similarity(low.embeddings.reshape(-1, 768), ours.embeddings.reshape(-1, 768), dim=-1).min().item()
    print(f"ATST-Frame base, {args.clips} x {CLIP_S:.0f} s clips, all 12 blocks, {torch.get_num_threads()} threads")
    print(f"{'path':<8} {'s/batch':>9} {'clips/s':>9} {'x realtime':>11} {'vs eager':>9}")
    for name, t in (("eager", t_eager), ("ours", t_ours), ("bf16", t_bf16)):
        print(f"{name:<8} {t:9.3f} {args.clips / t:9.2f} {args.clips * CLIP_S / t:11.1f} {t_eager / t:8.2f}x")
    print(f"fp32 max |ours - eager| = {err:.2e}; bf16 min per-frame cosine to fp32 = {cos:.5f}")


if __name__ == "__main__":
    main()
