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
    assert torch.equal(ts[0], 15.0 + 40.0 * torch.arange(300, dtype=torch.float32))  # one grid past 10 s
    official = hear.load_model(frame_hear.atst.name, hop_s=None)
    _, ts_chunks = hear.get_timestamp_embeddings(sounds(1, 12.0), official)
    assert ts_chunks[0, 249].item() == pytest.approx(9975.0)
    assert ts_chunks[0, 250].item() == pytest.approx(10025.0)  # the second 10.01 s chunk starts 10010 ms in


def test_default_is_overlapping_windows_on_one_grid(frame_hear, tiny_dirs):
    assert frame_hear.hop_s == hear.DEFAULT_HOP_S
    audio = sounds(1, 12.0, seed=2)
    emb, _ = hear.get_timestamp_embeddings(audio, frame_hear)
    atst = af.load(tiny_dirs["frame"])
    assert torch.allclose(emb, atst.embed_frames(audio, 16000, hop_s=hear.DEFAULT_HOP_S).embeddings, atol=1e-5)


@pytest.mark.parametrize("seconds", [0.6, 1.0, 10.04, 12.345, 25.0])
def test_timestamps_cover_the_audio_to_its_end(frame_hear, seconds):
    n = int(seconds * 16000)
    emb, ts = hear.get_timestamp_embeddings(sounds(1, seconds), frame_hear)
    assert ts.shape[1] == emb.shape[1] == (n // 160 + 1) // 4  # every whole 4-frame token
    end_ms = 1000 * n / 16000
    assert 0 <= end_ms - ts[0, -1].item() < 55  # the last token's centre: at most 3 frames + 15 ms before the end


@pytest.mark.parametrize("n", [1, 2, 100, 512, 513])
def test_any_length_from_one_sample(frame_hear, n):
    audio = sounds(3, n / 16000 + 1e-9)
    assert audio.shape == (3, n)
    emb, ts = hear.get_timestamp_embeddings(audio, frame_hear)
    assert emb.shape == (3, 1, frame_hear.timestamp_embedding_size) and ts.tolist() == [[15.0]] * 3
    scene = hear.get_scene_embeddings(audio, frame_hear)
    assert scene.shape == (3, frame_hear.scene_embedding_size) and torch.isfinite(scene).all()
    padded = torch.nn.functional.pad(audio, (0, 513 - n))  # what a short sound is padded to
    assert torch.equal(scene, hear.get_scene_embeddings(padded, frame_hear))
    with pytest.raises(ValueError, match="0 samples"):
        hear.get_timestamp_embeddings(torch.zeros(2, 0), frame_hear)


@pytest.mark.parametrize("hop_s", [0, -1.0, 10.5, float("nan"), "5", True])
def test_load_model_checks_hop_s(tiny_dirs, hop_s):
    with pytest.raises(ValueError, match="hop_s"):
        hear.load_model(str(tiny_dirs["frame"]), hop_s=hop_s)


def test_load_model_checks_layers_and_device(tiny_dirs):
    with pytest.raises(ValueError, match="layers="):
        hear.load_model(str(tiny_dirs["frame"]), layers=12)
    with pytest.raises(ValueError, match="device="):
        hear.load_model(str(tiny_dirs["frame"]), device="gpu0")
    model = hear.load_model(str(tiny_dirs["frame"]), device="auto")  # CUDA when available, else the CPU
    assert model.atst.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- the HEAR validator's checks
# hearvalidator (2021) checks a module as below; restated here rather than vendored. Its own
# command line passes 16 sounds of 2 s (timestamps) and 8 of 3.74 s (scene); here the same
# rules also hold for long sounds.


def validate_hear(model: hear.HEARModel, n_sounds: int, seconds: float, scene: bool = True) -> None:
    """The validator's checks (its ``ModelError``s as assertions) on uniform noise in [-1, 1]."""
    assert isinstance(model, torch.nn.Module)
    assert model.sample_rate in (16000, 22050, 44100, 48000)
    assert isinstance(model.scene_embedding_size, int) and isinstance(model.timestamp_embedding_size, int)
    audio = torch.rand(n_sounds, int(seconds * model.sample_rate)) * 2 - 1
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    assert embeddings.dtype == torch.float32
    assert embeddings.shape[0] == n_sounds
    assert embeddings.shape[:2] == timestamps.shape
    assert embeddings.shape[2] == model.timestamp_embedding_size
    diff = torch.diff(timestamps)
    average = torch.mean(diff.float())
    assert average <= 50.0  # the validator warns above 50 ms
    assert torch.all(torch.abs(diff - average) < 1e-3), "Timestamps should occur at regular intervals"
    assert torch.all(diff > 0)
    if scene:
        vectors = hear.get_scene_embeddings(audio, model)
        assert vectors.dtype == torch.float32 and vectors.shape == (n_sounds, model.scene_embedding_size)


def test_validator_checks_as_its_command_line_runs_them(frame_hear, clip_hear):
    for model in (frame_hear, clip_hear):
        validate_hear(model, 16, 2.0, scene=False)
        validate_hear(model, 8, 3.74)


@pytest.mark.parametrize("seconds", [10.05, 11.0, 12.0])
def test_validator_checks_past_one_chunk(frame_hear, seconds):
    validate_hear(frame_hear, 1, seconds, scene=seconds == 12.0)


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [30.0, 120.0])
def test_validator_checks_on_long_sounds(frame_hear, clip_hear, seconds):
    validate_hear(frame_hear, 1, seconds)
    validate_hear(clip_hear, 1, seconds, scene=False)


@pytest.mark.slow
def test_validator_checks_on_twenty_minutes(frame_hear):
    validate_hear(frame_hear, 1, 20 * 60.0, scene=False)


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
