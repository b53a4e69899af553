"""What the CPU offers the encoder: native bfloat16, and the faster of torch's float32 GEMM paths.

- ``cpu_flags()`` / ``native_bf16()``: whether the CPU runs bfloat16 arithmetic natively
  (AVX512-BF16 or AMX-BF16, read from Linux ``/proc/cpuinfo``). Without it torch emulates bf16
  and it is no faster than float32.
- ``auto_dtype(device)``: the encoder precision ``dtype="auto"`` means: on the CPU bfloat16 where
  it is native, else float32; on CUDA bfloat16 where supported, else float16. Returns the
  dtype and a sentence saying why, which ``ATSTModel.choices`` keeps.
- ``choose_gemm(encoder)``: times the encoder's own widest matrix multiplication (the MLP's first
  layer, ``GEMM_ROWS`` tokens) through torch's default GEMM (``F.linear``) and through oneDNN's
  linear (``model.Linear`` with ``onednn``), interleaved; takes oneDNN where it is at least
  ``MIN_GAIN`` faster and agrees within float32 rounding. The verdict is kept per process for
  each shape, dtype and thread count, so later loads do not measure again.

Attention needs no choice: SDPA's fused CPU kernel was measured fastest in float32 and bfloat16
(``benchmarks/bench_cpu.py``), and the encoder already takes it whenever a batch is unpadded.
"""

from __future__ import annotations

import functools
import time

import torch

from .dtypes import dtype_name
from .model import ATSTEncoder, Linear

CPUINFO = "/proc/cpuinfo"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # either means bfloat16 arithmetic in hardware
GEMM_ROWS = 1000  # tokens of the timed GEMM: 4 chunks of 250, a typical CPU batch
GEMM_ROUNDS = 3  # interleaved timing rounds per path (the minimum of each is compared)
MIN_GAIN = 1.05  # oneDNN must be this much faster to be chosen
GEMM_TOL = 1e-5  # largest |oneDNN - default| / max |default| accepted (float32 rounding)


def cpu_flags(path: str = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags (``flags`` of the first processor in ``/proc/cpuinfo``); empty
    where that file does not exist (not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def auto_dtype(device: torch.device, flags: frozenset[str] | None = None) -> tuple[torch.dtype, str]:
    """(dtype, why) for ``dtype="auto"`` on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: bfloat16, which this CUDA device supports"
        return torch.float16, "auto: float16, as this CUDA device has no bfloat16"
    if device.type == "cpu":
        flags = cpu_flags() if flags is None else flags
        found = [f for f in BF16_FLAGS if f in flags]
        if found:
            return torch.bfloat16, f"auto: bfloat16, as the CPU computes it natively ({', '.join(found)})"
        return torch.float32, "auto: float32, as the CPU has no native bfloat16 (no avx512_bf16 or amx_bf16 flag)"
    return torch.float32, f"auto: float32 on {device.type}"


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.lru_cache(maxsize=None)
def _measure(rows: int, dim: int, hidden: int, dtype: torch.dtype, threads: int) -> tuple[bool, str]:
    """(oneDNN chosen, a sentence with the timings) for a (rows, dim) x (dim, hidden) GEMM."""
    if not _onednn_available():
        return False, "default GEMM (oneDNN's linear is not in this torch build)"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=gen).to(dtype)
    with torch.device("meta"):
        layer = Linear(dim, hidden)  # no initialisation: the global random state is left alone
    weight = (0.02 * torch.randn(hidden, dim, generator=gen)).to(dtype)
    layer.load_state_dict({"weight": weight, "bias": torch.zeros(hidden, dtype=dtype)}, assign=True)
    times = {False: float("inf"), True: float("inf")}
    with torch.inference_mode():
        out = {}
        for fast in (False, True):  # warm-up, and the results to compare
            layer.onednn = fast
            out[fast] = layer(x).float()
        scale = out[False].abs().max().item() or 1.0
        err = (out[True] - out[False]).abs().max().item() / scale
        for _ in range(GEMM_ROUNDS):
            for fast in (False, True):
                layer.onednn = fast
                t0 = time.perf_counter()
                layer(x)
                times[fast] = min(times[fast], time.perf_counter() - t0)
    gain = times[False] / times[True]
    flops = 2 * rows * dim * hidden
    said = (
        f"{{}} ({dtype_name(dtype)} {rows}x{dim}x{hidden}: default {flops / times[False] / 1e9:.0f} GFLOP/s, "
        f"oneDNN {flops / times[True] / 1e9:.0f} GFLOP/s, {threads} threads; relative difference {err:.1e})"
    )
    if gain >= MIN_GAIN and err <= GEMM_TOL:
        return True, said.format(f"oneDNN linear, {gain:.2f}x the default GEMM")
    return False, said.format("default GEMM")


def choose_gemm(encoder: ATSTEncoder) -> str:
    """Measure and set the faster GEMM path of ``encoder``'s linear layers for its current dtype
    on the CPU (a no-op elsewhere: the default); returns the sentence that says what was chosen."""
    if encoder.pos_embed.device.type != "cpu":
        for m in encoder.modules():
            if isinstance(m, Linear):
                m.onednn = False
        return "default GEMM (not on the CPU)"
    cfg = encoder.cfg
    hidden = encoder.blocks[0].mlp.fc1.out_features if len(encoder.blocks) else 4 * cfg.embed_dim
    onednn, said = _measure(GEMM_ROWS, cfg.embed_dim, hidden, encoder.pos_embed.dtype, torch.get_num_threads())
    for m in encoder.modules():
        if isinstance(m, Linear):
            m.onednn = onednn
    return said
