"""Encoder, config and pooling rules: geometry, padding, precision and the documented deviations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import atst_features as af
from atst_features import pooling
from atst_features.model import ATSTConfig, ATSTEncoder
from atst_features.weights import build

SR = 16000


def tiny(family: str, seed: int = 0) -> af.ATSTModel:
    torch.manual_seed(seed)
    cfg = ATSTConfig(family=family, embed_dim=32, depth=3, num_heads=2)
    return build(cfg, ATSTEncoder(cfg).state_dict())


def test_config_round_trip_and_validation(tmp_path):
    cfg = ATSTConfig(family="clip", embed_dim=48, depth=2, num_heads=3)
    assert cfg.clip_chunk_frames == 601 and cfg.max_tokens == 250
    assert ATSTConfig(family="frame").clip_chunk_frames == 1001
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert ATSTConfig.from_json(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="divisible"):
        ATSTConfig(family="frame", embed_dim=50, num_heads=3)
    with pytest.raises(ValueError, match="family"):
        ATSTConfig(family="audio")
    with pytest.raises(ValueError, match="unknown config fields"):
        ATSTConfig.from_dict({"family": "frame", "width": 3})


def test_patch_order_is_bin_major():
    enc = ATSTEncoder(ATSTConfig(family="frame", embed_dim=32, depth=1, num_heads=2))
    mel = torch.arange(64 * 9, dtype=torch.float32).reshape(1, 64, 9)
    patches = enc.patchify(mel)
    assert patches.shape == (1, 2, 256)  # the 9th frame is dropped
    k, b, f = 1, 10, 3
    assert patches[0, k, b * 4 + f] == mel[0, b, 4 * k + f]


def test_positional_rows_per_family():
    torch.manual_seed(0)
    for family in ("frame", "clip"):
        enc = ATSTEncoder(ATSTConfig(family=family, embed_dim=32, depth=1, num_heads=2))
        mel = torch.zeros(1, 64, 12)
        x = enc.embed_tokens(mel)
        bias = enc.patch_embed.bias
        if family == "frame":
            assert torch.allclose(x[0], bias + enc.pos_embed[0, 1:4])
        else:
            assert torch.allclose(x[0, 0], enc.cls_token[0, 0] + enc.pos_embed[0, 0])
            assert torch.allclose(x[0, 1:], bias + enc.pos_embed[0, 1:4])


def test_too_many_tokens_is_a_clear_error():
    enc = ATSTEncoder(ATSTConfig(family="frame", embed_dim=32, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="at most 250"):
        enc(torch.zeros(1, 64, 1004))


@pytest.mark.parametrize("family", ["frame", "clip"])
def test_padding_does_not_change_valid_tokens(family):
    m = tiny(family)
    torch.manual_seed(1)
    mel = torch.randn(2, 64, 80)
    n_tokens = torch.tensor([20, 11])
    out = m.encoder(mel, n_tokens, [0, 2])
    alone = m.encoder(mel[1:, :, :44], None, [0, 2])
    skip = int(family == "clip")
    assert torch.allclose(out[1, :, : 11 + skip], alone[0], atol=1e-5)


def test_blocks_are_validated():
    m = tiny("frame")
    with pytest.raises(ValueError, match="blocks"):
        m.encoder(torch.zeros(1, 64, 8), None, [3])


def test_clip_chunk_rules_and_divisor_quirk():
    chunks = pooling.clip_chunks(0, 1201, 601, 4)  # a 12 s crop
    assert [(c.start, c.frames, c.tokens, c.divisor_tokens) for c in chunks] == [(0, 601, 150, 300), (601, 600, 150, 150)]
    assert [c.index for c in pooling.clip_chunks(0, 901, 601, 4)] == [0]  # 300 frames remaining: not counted
    assert [c.index for c in pooling.clip_chunks(0, 902, 601, 4)] == [0, 1]
    assert [c.index for c in pooling.clip_chunks(0, 601, 601, 4)] == [0]


def test_frame_chunks_skip_tokenless_tails():
    chunks = pooling.frame_chunks(0, 2005, 1001, 4)
    assert [(c.start, c.tokens) for c in chunks] == [(0, 250), (1001, 250)]  # 3-frame tail: no token


def test_tokenless_tail_is_not_averaged_in():
    """Deviation from the official code: 10 s + 1 frame gives the mean of its tokens, not half of it."""
    m = tiny("frame")
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(160000 + 160)).astype(np.float32)  # 1002 mel frames
    frames = m.embed_frames(wav, SR).embeddings
    assert frames.shape[0] == 250
    expected = frames.sum(0) / (250 + pooling.POOL_EPS)
    assert torch.allclose(m.embed_clip(wav, SR), expected, atol=1e-5)


@pytest.mark.parametrize("family", ["frame", "clip"])
def test_bfloat16_tracks_float32(family):
    m = tiny(family)
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(3 * SR)).astype(np.float32)
    ref_frames = m.embed_frames(wav, SR).embeddings
    ref_clip = m.embed_clip(wav, SR)
    m16 = tiny(family).to(dtype=torch.bfloat16)
    assert m16.dtype == torch.bfloat16
    frames = m16.embed_frames(wav, SR).embeddings
    assert frames.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(frames.reshape(-1, 32), ref_frames.reshape(-1, 32), dim=-1)
    assert cos.min() >= 0.999
    assert torch.nn.functional.cosine_similarity(m16.embed_clip(wav, SR), ref_clip, dim=0) >= 0.999


def test_models_come_back_in_eval_mode(frame_model):
    assert not frame_model.encoder.training
    assert "family='frame'" in repr(frame_model)


@pytest.mark.slow
def test_compiled_encoder_matches_eager(frame_model, reference):
    """``ATSTModel.compile()`` (torch.compile, dynamic shapes): same results on a padded batch."""
    compiled = build(frame_model.config, frame_model.encoder.state_dict()).compile()
    wavs = [reference["chirp_3s.wav"], reference["two_chunks_13.3s.wav"]]
    for a, b in zip(compiled.embed_frames(wavs, SR, layers=[0, 11]), frame_model.embed_frames(wavs, SR, layers=[0, 11])):
        assert torch.allclose(a.embeddings, b.embeddings, atol=1e-5)


def test_load_checks_device_and_dtype_first(tiny_dirs):
    assert af.load(tiny_dirs["frame"], dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not supported; use one of float32, bfloat16, float16"):
        af.load(tiny_dirs["frame"], dtype="fp8")
    with pytest.raises(ValueError, match="not a device"):
        af.load(tiny_dirs["frame"], device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            af.load(tiny_dirs["frame"], device="cuda")
    with pytest.raises(ValueError, match="dtype="):
        tiny("frame").to(dtype=torch.int64)
