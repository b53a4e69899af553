"""The HEAR 2021 API: loading, declared sizes, shapes, dtypes, devices and timestamp units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import atst_features as af
from atst_features import embed, hear


def sounds(n: int, seconds: float, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy((0.2 * rng.standard_normal((n, int(seconds * 16000)))).astype(np.float32))


@pytest.fixture(scope="module")
def frame_hear(tiny_dirs) -> hear.HEARModel:
    return hear.load_model(str(tiny_dirs["frame"]))


@pytest.fixture(scope="module")
def clip_hear(tiny_dirs) -> hear.HEARModel:
    return hear.load_model(str(tiny_dirs["clip"]))


def test_attributes_and_declared_sizes_equal_the_outputs(frame_hear, clip_hear):
    audio = sounds(3, 2.0)
    for model, scene_size in ((frame_hear, 12 * 48), (clip_hear, 2 * 12 * 48)):
        assert isinstance(model, torch.nn.Module) and not model.training
        assert model.sample_rate == 16000
        assert model.scene_embedding_size == scene_size
        assert model.timestamp_embedding_size == 12 * 48
        scene = hear.get_scene_embeddings(audio, model)
        emb, ts = hear.get_timestamp_embeddings(audio, model)
        assert scene.shape == (3, model.scene_embedding_size) and scene.dtype == torch.float32
        assert emb.shape == (3, 50, model.timestamp_embedding_size) and emb.dtype == torch.float32
        assert ts.shape == (3, 50) and ts.dtype == torch.float32
        assert torch.equal(model(audio), scene)


def test_embeddings_are_those_of_the_library(frame_hear, tiny_dirs):
    audio = sounds(2, 3.0, seed=1)
    atst = af.load(tiny_dirs["frame"])
    scene = hear.get_scene_embeddings(audio, frame_hear)
    emb, _ = hear.get_timestamp_embeddings(audio, frame_hear)
    assert torch.allclose(scene, atst.embed_clip(audio, 16000), atol=1e-5)
    assert torch.allclose(emb, atst.embed_frames(audio, 16000).embeddings, atol=1e-5)


def test_timestamps_are_token_centres_in_milliseconds(frame_hear):
    _, ts = hear.get_timestamp_embeddings(sounds(2, 12.0), frame_hear)
    assert torch.equal(ts[0], ts[1])
    assert ts[0, :3].tolist() == [15.0, 55.0, 95.0]  # token k: mel frames centred at 40k .. 40k + 30 ms
    assert ts[0, 249].item() == pytest.approx(9975.0)
    assert ts[0, 250].item() == pytest.approx(10025.0)  # the second 10.01 s chunk starts 10010 ms in
    over = hear.load_model(frame_hear.atst.name, hop_s=5.0)
    _, ts_over = hear.get_timestamp_embeddings(sounds(1, 12.0), over)
    assert torch.allclose(ts_over[0], 15.0 + 40.0 * torch.arange(300, dtype=torch.float32))


def test_empty_path_loads_the_default_model(monkeypatch, tiny_dirs):
    seen = []

    def fake_load(source, device="cpu"):
        seen.append((source, device))
        return af.load(tiny_dirs["frame"], device=device)

    monkeypatch.setattr("atst_features.weights.load", fake_load)
    model = hear.load_model()
    assert seen == [(embed.DEFAULT_MODEL, "cpu")] and model.timestamp_embedding_size == 12 * 48


def test_layers_option_changes_the_declared_sizes(tiny_dirs):
    model = hear.load_model(str(tiny_dirs["frame"]), layers="last")
    assert (model.scene_embedding_size, model.timestamp_embedding_size) == (48, 48)
    emb, _ = hear.get_timestamp_embeddings(sounds(1, 1.0), model)
    assert emb.shape[-1] == 48


def test_bad_inputs(frame_hear):
    with pytest.raises(ValueError, match="n_sounds, n_samples"):
        hear.get_scene_embeddings(torch.zeros(16000), frame_hear)
    with pytest.raises(TypeError, match="load_model"):
        hear.get_timestamp_embeddings(torch.zeros(1, 16000), object())


@pytest.mark.gpu
def test_outputs_follow_the_model_to_cuda(tiny_dirs):
    model = hear.load_model(str(tiny_dirs["frame"])).to("cuda")
    audio = sounds(2, 1.0).cuda()
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    scene = hear.get_scene_embeddings(audio, model)
    assert emb.device.type == ts.device.type == scene.device.type == "cuda"
    cpu = hear.load_model(str(tiny_dirs["frame"]), device="cpu")
    assert torch.allclose(scene.cpu(), hear.get_scene_embeddings(audio.cpu(), cpu), atol=1e-4)


def test_outputs_are_on_the_model_device(frame_hear):
    audio = sounds(1, 1.0)
    assert hear.get_scene_embeddings(audio, frame_hear).device == frame_hear.atst.device
    emb, ts = hear.get_timestamp_embeddings(audio, frame_hear)
    assert emb.device == ts.device == next(frame_hear.parameters()).device
