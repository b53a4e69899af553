"""Formats libsndfile cannot read (m4a/AAC, MP4, WebM, WMA, ...) through PyAV (the ``av`` extra),
the same samples from both decoders, and clear errors for corrupt files and a missing extra."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import soundfile as sf

from atst_features import audio

AV_REASON = "PyAV (the av extra) is not installed: pip install 'atst-features[av]'"
RATE = 48000
EXTRA = "pip install 'atst-features[av]'"


@pytest.fixture(scope="module")
def av():
    return pytest.importorskip("av", reason=AV_REASON)


def tone(seconds: float = 1.0, rate: int = RATE) -> np.ndarray:
    """(2, N) float32: 440 Hz at 0.5 and 0.25 (mono average: 0.375, RMS 0.265)."""
    t = np.arange(int(seconds * rate)) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 440 * t)]).astype(np.float32)


def write_with_av(av, path, x: np.ndarray, rate: int, codec: str, bit_rate: int | None = None) -> None:
    """Encode (C, N) float32 samples with FFmpeg (PyAV) into the container ``path``'s extension names."""
    layout = {1: "mono", 2: "stereo"}[x.shape[0]]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        if bit_rate:
            stream.bit_rate = bit_rate
        frame = av.AudioFrame.from_ndarray(x, format="fltp", layout=layout)
        frame.rate, frame.pts = rate, 0
        fmt = stream.codec_context.codec.audio_formats[0].name
        resampler = av.AudioResampler(format=fmt, layout=layout, rate=rate, frame_size=stream.codec_context.frame_size or None)
        for f in resampler.resample(frame) + resampler.resample(None):
            container.mux(stream.encode(f))
        container.mux(stream.encode(None))


@pytest.mark.parametrize("ext, codec, bit_rate", [(".m4a", "aac", None), (".mp4", "aac", None), (".webm", "libopus", None),
                                                  (".wma", "wmav2", 128000), (".mka", "flac", None)])
def test_containers_decode_through_pyav(av, tmp_path, frame_model, ext, codec, bit_rate):
    path = tmp_path / f"tone{ext}"
    write_with_av(av, path, tone(), RATE, codec, bit_rate)
    assert ext in audio.AV_EXTENSIONS
    info = audio.audio_info(path)
    assert (info.sample_rate, info.channels) == (RATE, 2) and abs(info.duration - 1.0) < 0.05
    wav, rate = audio.read_audio(path)
    assert rate == RATE and wav.dtype == np.float32 and abs(wav.size / RATE - 1.0) < 0.05
    assert np.argmax(np.abs(np.fft.rfft(wav))) * RATE / wav.size == pytest.approx(440, abs=2)
    assert np.sqrt(np.mean(wav**2)) == pytest.approx(0.375 / np.sqrt(2), abs=0.01)  # channels averaged
    loaded = audio.load_audio(path)
    streamed = np.concatenate(list(audio.stream_blocks(path, block_frames=4096)))
    np.testing.assert_allclose(streamed, loaded, atol=1e-5)
    assert frame_model.embed_clip(path).shape == (12 * 48,)
    np.testing.assert_array_equal(audio.read_audio(path.read_bytes())[0], wav)  # bytes: found by content
    with open(path, "rb") as f:
        np.testing.assert_array_equal(audio.read_audio(f)[0], wav)


@pytest.mark.parametrize("fmt, subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("FLAC", "PCM_24"), ("WAV", "FLOAT")])
def test_both_decoders_give_the_same_samples(av, tmp_path, monkeypatch, fmt, subtype):
    x = tone(1.3, 22050).T  # (N, 2)
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, x, 22050, format=fmt, subtype=subtype)
    by_sndfile = audio.read_audio(path)
    frames_sndfile = audio.audio_info(path).frames

    def unreadable(*args, **kwargs):
        raise sf.LibsndfileError(1, "Error opening: ")

    monkeypatch.setattr(audio.sf, "SoundFile", unreadable)  # libsndfile fails: PyAV takes over
    by_av = audio.read_audio(path)
    assert by_av[1] == by_sndfile[1] == 22050
    np.testing.assert_array_equal(by_av[0], by_sndfile[0])
    assert audio.audio_info(path) == audio.AudioInfo(frames_sndfile, 22050, 2)
    np.testing.assert_array_equal(audio.read_audio(io.BytesIO(path.read_bytes()))[0], by_sndfile[0])


def test_without_pyav_the_error_says_how_to_enable_it(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "_pyav", lambda: None)
    m4a = tmp_path / "voice.m4a"
    m4a.write_bytes(b"\0\0\0\x20ftypM4A " + bytes(200))
    for read in (audio.load_audio, audio.read_audio, audio.audio_info, lambda p: list(audio.stream_blocks(p))):
        with pytest.raises(ValueError, match=r"voice\.m4a.*\(\.m4a files are decoded by FFmpeg through PyAV; " + re.escape(EXTRA)):
            read(m4a)
    with pytest.raises(ValueError, match=r"Format not recognised.*m4a/AAC, MP4, WebM, WMA.*atst-features\[av\]"):
        audio.read_audio(m4a.read_bytes())  # bytes: no extension to go by


def test_a_damaged_file_of_a_known_format_gets_no_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "_pyav", lambda: None)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt not really a wave file" * 4)
    with pytest.raises(ValueError, match=r"cannot decode '.*bad\.wav' as audio \(.*fmt") as info:
        audio.load_audio(bad)
    assert "PyAV" not in str(info.value)


def test_pyav_module_is_found_when_installed(av):
    assert audio._pyav() is av


def mp3(tmp_path) -> tuple:
    good = tmp_path / "good.mp3"
    sf.write(good, tone(0.5, 16000).T, 16000)
    data = good.read_bytes()
    corrupt = tmp_path / "corrupt.mp3"
    corrupt.write_bytes(data[:50] + bytes(3000))
    return good, corrupt


def test_corrupt_mp3_gets_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "_pyav", lambda: None)
    _, corrupt = mp3(tmp_path)
    with pytest.raises(ValueError, match=r"cannot decode '.*corrupt\.mp3' as audio \(damaged, truncated, or not in a format") as info:
        audio.load_audio(corrupt)
    assert "pipe" not in str(info.value)


def test_corrupt_mp3_with_pyav_names_both_decoders(av, tmp_path):
    good, corrupt = mp3(tmp_path)
    assert audio.load_audio(good).size > 0
    with pytest.raises(ValueError, match=r"libsndfile: damaged, truncated.*; FFmpeg: Invalid data") as info:
        audio.load_audio(corrupt)
    assert "pipe" not in str(info.value)


def test_av_extensions_are_not_yet_folder_inputs():
    assert not audio.AV_EXTENSIONS & audio.AUDIO_EXTENSIONS
    assert not audio.is_audio_path("talk.m4a") and audio.is_audio_path("talk.flac")
