"""The X-ARES encoder contract: ``ATSTXaresEncoder`` against the rules of ``xares.audio_encoder_checker``.

The ``xares`` package (0.1.3) requires torchaudio, so it is no dependency or extra of this
project; its ``check_audio_encoder()`` is restated below (and run itself where it is importable).
"""

from __future__ import annotations

import pytest
import torch

import atst_features as af
from atst_features import hear
from atst_features.xares_encoder import ATSTXaresEncoder


@pytest.fixture(scope="module")
def encoder(frame_model) -> ATSTXaresEncoder:
    return ATSTXaresEncoder(frame_model)


def check_audio_encoder(encoder: torch.nn.Module) -> None:
    """xares.audio_encoder_checker.check_audio_encoder (0.1.3), its failures as assertions."""
    assert type(encoder).__name__.endswith("Encoder"), "Class name must end with 'Encoder'"
    assert isinstance(encoder, torch.nn.Module)
    for name in ("output_dim", "sampling_rate", "hop_size_in_ms"):
        assert hasattr(encoder, name), f"Encoder must have a '{name}' attribute"
    sample_audio = torch.randn(2, 50000)
    encoded = encoder(sample_audio)
    assert isinstance(encoded, torch.Tensor) and encoded.ndim == 3  # [B, T, D]
    assert encoded.size(0) == sample_audio.size(0)
    assert encoded.size(2) == encoder.output_dim


def test_the_contract(encoder):
    check_audio_encoder(encoder)
    assert (encoder.sampling_rate, encoder.hop_size_in_ms, encoder.output_dim) == (16000, 40.0, 48)
    out = encoder(torch.randn(2, 50000))
    assert out.shape == (2, 78, 48) and out.dtype == torch.float32  # 3.125 s / 40 ms
    assert not encoder.training


def test_the_official_checker(encoder):
    checker = pytest.importorskip(
        "xares.audio_encoder_checker", reason="the xares package is not installed (it requires torchaudio: no extra here)"
    )
    assert checker.check_audio_encoder(encoder) is True


def test_frames_are_those_of_embed_frames(encoder, frame_model, tiny_dirs):
    audio = 0.2 * torch.randn(2, 12 * 16000)
    out = encoder(audio)
    ref = frame_model.embed_frames(audio, 16000, layers="last", hop_s=hear.DEFAULT_HOP_S).embeddings
    assert torch.allclose(out, ref, atol=1e-5) and out.shape == (2, 300, 48)  # one 40 ms grid past 10 s
    every = ATSTXaresEncoder(str(tiny_dirs["frame"]), layers="all")
    assert every.output_dim == 12 * 48 and every(audio[:1, :16000]).shape == (1, 25, 12 * 48)


def test_short_and_one_dimensional_audio(encoder):
    assert encoder(torch.randn(3, 10)).shape == (3, 1, 48)  # padded to the front end's 513 samples
    assert encoder(torch.randn(16000)).shape == (1, 25, 48)
    with pytest.raises(ValueError, match="0 samples"):
        encoder(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="batch, samples"):
        encoder(torch.zeros(2, 2, 100))


def test_options_are_checked_up_front(frame_model):
    with pytest.raises(ValueError, match="hop_s"):
        ATSTXaresEncoder(frame_model, hop_s=0)
    with pytest.raises(ValueError, match="hop_s"):
        ATSTXaresEncoder(frame_model, hop_s=11.0)
    with pytest.raises(ValueError, match="layers="):
        ATSTXaresEncoder(frame_model, layers=20)


@pytest.mark.slow
def test_ten_minutes(encoder):
    minutes = 10
    out = encoder(0.1 * torch.randn(1, minutes * 60 * 16000))
    assert out.shape == (1, minutes * 60 * 25, 48) and torch.isfinite(out).all()


def test_moves_with_the_module(tiny_dirs):
    encoder = ATSTXaresEncoder(af.load(tiny_dirs["frame"]))
    assert encoder.to("cpu") is encoder and encoder.atst.device.type == "cpu"
    assert any(p is encoder.atst.encoder.pos_embed for p in encoder.parameters())
