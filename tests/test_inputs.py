"""Every accepted input form, and a clear error for every bad one."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

import atst_features as af
from atst_features import audio, frontend

SR = 16000
TOL = 1e-4


@pytest.fixture(scope="module")
def wav() -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(1.3 * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= tol


def test_numpy_and_torch_and_float64_agree(frame_model, wav):
    ref = frame_model.embed_clip(wav, SR)
    assert ref.shape == (12 * 48,) and ref.dtype == torch.float32
    assert close(frame_model.embed_clip(torch.from_numpy(wav), SR), ref)
    assert close(frame_model.embed_clip(wav.astype(np.float64), SR), ref)
    assert close(frame_model.embed_clip(wav.astype(np.float16), SR), ref, 5e-2)


def test_int_pcm_is_scaled(frame_model, wav):
    pcm16 = np.round(wav * 32767).astype(np.int16)
    pcm32 = pcm16.astype(np.int32) * 65536
    ref = frame_model.embed_clip(pcm16.astype(np.float32) / 32768, SR)
    assert close(frame_model.embed_clip(pcm16, SR), ref)
    assert close(frame_model.embed_clip(pcm32, SR), ref)
    assert close(frame_model.embed_clip(torch.from_numpy(pcm16), SR), ref)


def test_other_rates_are_resampled(frame_model, wav):
    wav44 = audio.resample(wav, SR, 44100)
    expected = frame_model.embed_clip(audio.resample(wav44, 44100, SR), SR)
    assert close(frame_model.embed_clip(wav44, 44100), expected)


def test_file_input_downmixes_and_resamples(frame_model, wav, tmp_path):
    stereo = np.stack([wav, 0.5 * wav], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, audio.resample(stereo.mean(axis=1), SR, 22050), 22050, subtype="FLOAT")
    sf.write(tmp_path / "st16k.flac", stereo, SR)
    loaded = af.load_audio(tmp_path / "st16k.flac")
    assert loaded.dtype == np.float32 and loaded.shape == (wav.size,)
    np.testing.assert_allclose(loaded, stereo.mean(axis=1), atol=1e-4)  # 16-bit FLAC
    assert close(frame_model.embed_clip(tmp_path / "st16k.flac"), frame_model.embed_clip(loaded, SR))
    assert close(frame_model.embed_clip(str(path)), frame_model.embed_clip(af.load_audio(path), SR))


def test_batch_and_list_shapes(frame_model, clip_model, wav):
    batch = np.stack([wav, 0.5 * wav])
    clips = frame_model.embed_clip(batch, SR)
    assert clips.shape == (2, 12 * 48)
    assert close(clips[1], frame_model.embed_clip(0.5 * wav, SR))
    fr = frame_model.embed_frames(batch, SR, layers="last")
    tokens = frontend.num_frames(wav.size) // 4
    assert fr.embeddings.shape == (2, tokens, 48) and fr.timestamps.shape == (tokens,)
    assert clip_model.embed_clip(batch, SR, layers=[0, 5]).shape == (2, 2 * 2 * 48)
    out = frame_model.embed_frames([wav, wav[:5000], batch], SR, layers=-1)
    assert isinstance(out, list) and len(out) == 3
    assert out[1].embeddings.shape == (frontend.num_frames(5000) // 4, 48)
    assert out[2].embeddings.shape == (2, tokens, 48)
    assert close(out[0].embeddings, out[2].embeddings[0])
    assert frame_model.clip_dim() == 576 and clip_model.clip_dim("last") == 96 and frame_model.frame_dim([1, 2]) == 96


def test_layer_order_follows_the_request(frame_model, wav):
    a = frame_model.embed_frames(wav, SR, layers=[3, 7]).embeddings
    b = frame_model.embed_frames(wav, SR, layers=[7, 3]).embeddings
    assert close(a[:, :48], b[:, 48:]) and close(a[:, 48:], b[:, :48])
    full = frame_model.embed_frames(wav, SR).embeddings
    assert close(full[:, 3 * 48 : 4 * 48], a[:, :48])


def test_minimum_length(frame_model):
    x = np.zeros(frontend.MIN_SAMPLES, np.float32)
    x[::7] = 0.1
    assert frame_model.embed_frames(x, SR).embeddings.shape == (1, 576)
    with pytest.raises(ValueError, match="at least 513 samples"):
        frame_model.embed_clip(x[:-1], SR)


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (np.zeros(0, np.float32), ValueError, "empty"),
        (np.array([0.1, np.nan] * 600, np.float32), ValueError, "NaN or Inf"),
        (np.array([0.1, np.inf] * 600, np.float32), ValueError, "NaN or Inf"),
        (np.zeros((2, 3, 1000), np.float32), ValueError, "3 dimensions"),
        (np.array(["a", "b"]), TypeError, "float16, float32, float64, int16 or int32"),
        (np.zeros(1000, bool), TypeError, "float16, float32"),
        (np.zeros(1000, np.uint8), TypeError, "int16 or int32 PCM"),
        (torch.zeros(1000, dtype=torch.complex64), TypeError, "audio tensors must be"),
        (12.5, TypeError, "pass a file path, a numpy array"),
        ([], ValueError, "list is empty"),
        (np.zeros((0, 1000), np.float32), ValueError, "empty batch"),
    ],
)
def test_bad_arrays(frame_model, bad, exc, match):
    with pytest.raises(exc, match=match):
        frame_model.embed_clip(bad, SR)


@pytest.mark.parametrize("rate, exc, match", [(None, ValueError, "sample_rate is required"), (0, ValueError, "positive"),
                                              (-8000, ValueError, "positive"), (float("nan"), ValueError, "positive"),
                                              ("16k", TypeError, "number in Hz")])
def test_bad_sample_rate(frame_model, wav, rate, exc, match):
    with pytest.raises(exc, match=match):
        frame_model.embed_frames(wav, rate)


def test_bad_files(frame_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no audio file"):
        frame_model.embed_clip(tmp_path / "missing.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio" * 10)
    with pytest.raises(ValueError, match="cannot decode"):
        frame_model.embed_clip(junk)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SR)
    with pytest.raises(ValueError, match="no audio samples"):
        frame_model.embed_clip(empty)
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(100, np.float32), SR)
    with pytest.raises(ValueError, match="too short"):
        frame_model.embed_clip(short)
    with pytest.raises(ValueError, match="directory"):
        frame_model.embed_clip(tmp_path)


@pytest.mark.parametrize("layers", ["first", 12, -13, [], [1, 1], [0.5], True, None])
def test_bad_layers(frame_model, wav, layers):
    with pytest.raises(ValueError, match="layers="):
        frame_model.embed_clip(wav, SR, layers=layers)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_bad_batch_size(frame_model, wav, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        frame_model.embed_clip(wav, SR, batch_size=batch_size)


# ---------------------------------------------------------------- mistakes that used to pass silently or misleadingly


def test_int16_scaled_floats_warn_once_per_call_naming_the_input(frame_model, wav):
    scaled = np.round(wav * 32767).astype(np.float32)  # the scipy.io.wavfile habit: int16 values as floats
    with pytest.warns(UserWarning, match=r"audio peaks at \d+.*int16-scaled\? divide by 32768"):
        frame_model.embed_clip(scaled, SR)
    with pytest.warns(UserWarning) as record:
        frame_model.embed_frames([wav, scaled, torch.from_numpy(scaled), np.stack([scaled, scaled])], SR)
    assert len(record) == 1
    assert "input 1 (and 2 more inputs) peaks at" in str(record[0].message)


def test_no_warning_for_audio_in_range_or_int_pcm(frame_model, wav, recwarn):
    frame_model.embed_clip(1.5 * wav, SR)  # a little over full scale: not a scaling mistake
    frame_model.embed_clip(np.round(wav * 32767).astype(np.int16), SR)  # int16 PCM is scaled for you
    frame_model.embed_clip(np.random.default_rng(0).standard_normal(SR).astype(np.float32), SR)  # unit noise
    assert not [w for w in recwarn if "int16" in str(w.message)]


@pytest.mark.parametrize("rate", [16, 44.1, 48, 1, 999, 768_001, 1e7])
def test_sample_rates_outside_1_to_768_khz_are_refused(frame_model, wav, rate):
    with pytest.raises(ValueError, match="kHz"):
        frame_model.embed_clip(wav, rate)


def test_rate_given_in_khz_says_so():
    with pytest.raises(ValueError, match=r"sample_rate=44\.1 Hz .* a rate in kHz\? pass Hz, e\.g\. sample_rate=44100"):
        audio.check_sample_rate(44.1)
    assert audio.check_sample_rate(1000) == 1000.0 and audio.check_sample_rate(768_000) == 768_000.0


def test_float64_beyond_float32_is_refused(frame_model, wav):
    big = wav.astype(np.float64)
    big[100] = 1e300  # finite in float64, Inf in float32
    with pytest.raises(ValueError, match="NaN or Inf"):
        frame_model.embed_clip(big, SR)
    with pytest.raises(ValueError, match="NaN or Inf"):
        frame_model.embed_clip(torch.from_numpy(big), SR)


@pytest.mark.parametrize("channels", [1, 2, 6])
def test_samples_by_channels_is_named(frame_model, wav, channels):
    x = np.repeat(wav[:, None], channels, axis=1)  # what soundfile.read returns
    with pytest.raises(ValueError, match=r"looks like \(samples, channels\).*x\.mean\(axis=1\)") as info:
        frame_model.embed_clip(x, SR)
    assert f"({wav.size}, {channels})" in str(info.value)
    with pytest.raises(ValueError, match="samples, channels"):
        frame_model.embed_clip(torch.from_numpy(x), SR)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i2", ">i4", "<f4"])
def test_any_byte_order_is_accepted(frame_model, wav, dtype):
    native = (np.round(wav * 32000) if dtype[1] == "i" else wav).astype(dtype[1:])
    assert close(frame_model.embed_clip(native.astype(dtype), SR), frame_model.embed_clip(native, SR))


@pytest.mark.parametrize("rate", [SR, 44100])
def test_negative_strides_are_accepted(frame_model, wav, rate, tmp_path):
    x = audio.resample(wav, SR, rate)
    assert close(frame_model.embed_clip(x[::-1], rate), frame_model.embed_clip(x[::-1].copy(), rate))
    batch = np.stack([x, 0.5 * x])[:, ::-1]
    assert close(frame_model.embed_clip(batch, rate), frame_model.embed_clip(batch.copy(), rate))
    assert close(frame_model.embed_clip(x[::2], rate // 2), frame_model.embed_clip(x[::2].copy(), rate // 2))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.zeros(2000, device="meta"), "meta tensor, which holds no samples"),
        (lambda: torch.zeros(2000).to_sparse(), "sparse_coo tensor; pass a dense one"),
        (lambda: torch.zeros(2, 2000).to_sparse(), "sparse_coo tensor; pass a dense one"),
    ],
)
def test_meta_and_sparse_tensors_are_refused_in_one_line(frame_model, make, match):
    with pytest.raises(ValueError, match=match) as info:
        frame_model.embed_clip(make(), SR)
    assert "\n" not in str(info.value)


def test_device_auto(monkeypatch, tiny_dirs):
    from atst_features.embed import resolve_device

    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = af.load(tiny_dirs["frame"], device="auto")
    assert model.device == resolve_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="'auto'"):
        resolve_device("automatic")
