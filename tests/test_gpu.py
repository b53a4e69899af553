"""GPU checks (skipped without CUDA): bf16 inference tracks float32 per frame."""

from __future__ import annotations

import pytest
import torch

from atst_features.model import ATSTConfig, ATSTEncoder
from atst_features.weights import build

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["frame", "clip"])
def test_bf16_on_gpu_matches_fp32(family):
    torch.manual_seed(0)
    cfg = ATSTConfig(family=family, embed_dim=768, depth=12, num_heads=12)
    sd = ATSTEncoder(cfg).state_dict()
    wav = 0.1 * torch.randn(2, 12 * 16000)
    ref = build(cfg, sd).to("cuda").embed_frames(wav, 16000)
    low = build(cfg, sd).to("cuda", torch.bfloat16).embed_frames(wav, 16000)
    assert low.embeddings.device.type == "cpu" and low.embeddings.dtype == torch.float32
    per_block = lambda x: x.reshape(-1, 12, 768)  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(per_block(low.embeddings), per_block(ref.embeddings), dim=-1)
    assert cos.min() >= 0.999
