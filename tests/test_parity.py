"""Every tensor of the official reference, reproduced through the public API."""

from __future__ import annotations

import pytest
import torch

import atst_features as af
from atst_features import frontend

from conftest import CLIPS

MEL_TOL = 1e-5
EMB_TOL = 1e-4
SR = 16000


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


@pytest.mark.parametrize("name", CLIPS)
def test_mel(reference, name):
    mel, n_frames = frontend.log_mel(reference[f"{name}.wav"][None])
    assert int(n_frames[0]) == reference[f"{name}.mel"].shape[1]
    assert_close(mel[0], reference[f"{name}.mel"], MEL_TOL)


def test_mel_padded_batch_equals_single(reference):
    wavs = [reference[f"{n}.wav"] for n in CLIPS]
    lengths = torch.tensor([len(w) for w in wavs])
    mel, n_frames = frontend.log_mel(torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lengths)
    for i, n in enumerate(CLIPS):
        assert_close(mel[i, :, : n_frames[i]], reference[f"{n}.mel"], MEL_TOL)
        assert (mel[i, :, n_frames[i] :] == 0).all()


@pytest.mark.parametrize("name", CLIPS)
def test_frame_embeddings(frame_model, reference, name):
    wav = reference[f"{name}.wav"]
    assert_close(frame_model.embed_frames(wav, SR).embeddings, reference[f"{name}.frame.frames.last12"], EMB_TOL)
    assert_close(frame_model.embed_frames(wav, SR, layers="last").embeddings, reference[f"{name}.frame.frames.last1"], EMB_TOL)
    assert_close(frame_model.embed_frames(wav, SR, layers=[11]).embeddings, reference[f"{name}.frame.frames.last1"], EMB_TOL)


@pytest.mark.parametrize("name", CLIPS)
def test_timestamps_are_real_token_times(frame_model, reference, name):
    """Inside the first chunk ours equal the official 40 ms * k; chunk c starts 10.01 s * c in, where the
    official stamps drift by 10 ms per chunk (documented deviation)."""
    wav = reference[f"{name}.wav"]
    ours_ms = frame_model.embed_frames(wav, SR, layers="last").timestamps * 1000
    official_ms = reference[f"{name}.frame.timestamps_ms"].double()
    chunk = torch.arange(len(ours_ms)) // 250
    assert torch.allclose(ours_ms, official_ms + 10.0 * chunk, atol=1e-6)


@pytest.mark.parametrize("name", CLIPS)
def test_frame_clip_vector(frame_model, reference, name):
    assert_close(frame_model.embed_clip(reference[f"{name}.wav"], SR), reference[f"{name}.frame.scene.last12"], EMB_TOL)


@pytest.mark.parametrize("name", CLIPS)
def test_clip_clip_vector(clip_model, reference, name):
    wav = reference[f"{name}.wav"]
    assert_close(clip_model.embed_clip(wav, SR), reference[f"{name}.clip.scene.last12"], EMB_TOL)
    assert_close(clip_model.embed_clip(wav, SR, layers="last"), reference[f"{name}.clip.scene.last1"], EMB_TOL)


@pytest.mark.parametrize("batch_size", [2, 16])
def test_padded_batch_equals_single_items(frame_model, clip_model, reference, batch_size):
    wavs = [reference[f"{n}.wav"] for n in CLIPS]
    frames = frame_model.embed_frames(wavs, SR, batch_size=batch_size)
    frame_clips = frame_model.embed_clip(wavs, SR, batch_size=batch_size)
    clip_clips = clip_model.embed_clip(wavs, SR, batch_size=batch_size)
    clip_frames = clip_model.embed_frames(wavs, SR, batch_size=batch_size)
    for i, n in enumerate(CLIPS):
        assert_close(frames[i].embeddings, reference[f"{n}.frame.frames.last12"], EMB_TOL)
        assert_close(frame_clips[i], reference[f"{n}.frame.scene.last12"], EMB_TOL)
        assert_close(clip_clips[i], reference[f"{n}.clip.scene.last12"], EMB_TOL)
        assert_close(clip_frames[i].embeddings, clip_model.embed_frames(wavs[i], SR).embeddings, EMB_TOL)


def test_one_liners_take_a_model(frame_model, reference):
    wav = reference["chirp_3s.wav"]
    assert_close(af.embed_clip(wav, SR, model=frame_model), reference["chirp_3s.frame.scene.last12"], EMB_TOL)
    fr = af.embed_frames(wav, SR, model=frame_model, layers="last")
    assert_close(fr.embeddings, reference["chirp_3s.frame.frames.last1"], EMB_TOL)


def test_one_liners_load_and_cache_a_directory(tiny_dirs, reference):
    wav = reference["chirp_3s.wav"]
    a = af.embed_clip(wav, SR, model=str(tiny_dirs["clip"]))
    assert_close(a, reference["chirp_3s.clip.scene.last12"], EMB_TOL)
    from atst_features.api import _cached_model

    hits = _cached_model.cache_info().hits
    af.embed_clip(wav, SR, model=str(tiny_dirs["clip"]))
    assert _cached_model.cache_info().hits == hits + 1
