"""Ray Data integration on a local Ray instance (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

import atst_features as af
from atst_features import audio as af_audio
from atst_features import batch, ray_data, weights

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install 'atst-features[ray]'")

@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    torch.manual_seed(0)
    cfg = af.ATSTConfig(family="frame", embed_dim=48, depth=2, num_heads=3)
    model_dir = weights.save_converted(cfg, af.ATSTEncoder(cfg).state_dict(), root / "model")
    src = root / "audio"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sf.write(src / "a.wav", (rng.standard_normal(48000) * 0.1).astype(np.float32), 16000)
    sf.write(src / "sub/b.flac", (rng.standard_normal((22050 * 24, 2)) * 0.1).astype(np.float32), 22050)
    (src / "broken.wav").write_bytes(b"RIFF but not a wave file")
    return model_dir, src


@pytest.mark.slow  # starting Ray takes most of the time
def test_map_batches_equals_the_batch_api_and_reports_bad_rows(local_ray, setup):
    model_dir, src = setup
    ds = ray_data.read_audio_files(src)
    rows = {r["rel"]: r for r in ray_data.embed_dataset(ds, str(model_dir), frames_dtype="float32", rows_per_batch=2).take_all()}
    assert sorted(rows) == ["a.wav", "broken.wav", "sub/b.flac"]
    assert "cannot decode" in rows["broken.wav"]["error"] and np.isnan(rows["broken.wav"]["clip"]).all()
    model = af.load(model_dir)
    for rel in ("a.wav", "sub/b.flac"):
        row = rows[rel]
        assert row["error"] == "" and row["duration"] == pytest.approx({"a.wav": 3.0, "sub/b.flac": 24.0}[rel])
        np.testing.assert_allclose(row["clip"], model.embed_clip(str(src / rel)).numpy(), atol=1e-5)
        frames = model.embed_frames(str(src / rel), layers="last")
        np.testing.assert_allclose(row["frames"], frames.embeddings.numpy(), atol=1e-5)
        np.testing.assert_array_equal(row["timestamps"], frames.timestamps.numpy())

    # encoded bytes (what ray.data.read_binary_files gives), clip vectors only
    ds = ray.data.read_binary_files(str(src), include_paths=True)
    rows = ray_data.embed_dataset(ds, str(model_dir), what="clip").take_all()
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert set(by_name["a.wav"]) == {"path", "clip", "duration", "error"}
    np.testing.assert_allclose(by_name["a.wav"]["clip"], model.embed_clip(str(src / "a.wav")).numpy(), atol=1e-5)
    assert by_name["broken.wav"]["error"]


def test_embedder_on_waveform_columns_without_ray_actors(setup):
    model_dir, _ = setup
    embedder = ray_data.ATSTEmbedder(str(model_dir), what="clip")
    rng = np.random.default_rng(1)
    wav = (rng.standard_normal(44100) * 0.1).astype(np.float32)
    waveforms = np.empty(2, dtype=object)
    waveforms[:] = [wav, np.zeros(10, np.float32)]
    out = embedder({"audio": waveforms, "sample_rate": np.array([44100, 16000]), "id": np.array([7, 8])})
    assert list(out["id"]) == [7, 8] and "audio" not in out
    expected = batch.Embedder(af.load(model_dir), what="clip").embed([af_audio.resample(wav, 44100)])[0].clip
    np.testing.assert_allclose(out["clip"][0], expected, atol=1e-6)
    assert out["error"][0] == "" and "too short" in out["error"][1]
    with pytest.raises(KeyError, match="'bytes', 'path' or 'audio'"):
        embedder({"text": np.array(["x"])})


def test_embedder_on_bytes_and_path_columns_without_ray_actors(setup):
    """Encoded bytes and paths go through the one decoder (``audio.read_audio``): same rows as waveforms."""
    model_dir, src = setup
    embedder = ray_data.ATSTEmbedder(str(model_dir), what="clip,frames", frames_dtype="float32")
    names = ["a.wav", "sub/b.flac", "broken.wav"]
    by_bytes = embedder({"bytes": np.array([(src / n).read_bytes() for n in names], dtype=object)})
    by_path = embedder({"path": np.array([str(src / n) for n in names])})
    for out in (by_bytes, by_path):
        assert out["error"][0] == out["error"][1] == "" and "cannot decode" in out["error"][2]
        assert out["frames"][2].dtype == np.float32 and out["frames"][2].shape == (0, embedder.frame_dim)
    np.testing.assert_array_equal(by_bytes["clip"][:2], by_path["clip"][:2])
    np.testing.assert_array_equal(by_bytes["duration"][:2], [3.0, 24.0])
    for i, name in enumerate(names[:2]):
        np.testing.assert_array_equal(by_bytes["frames"][i], by_path["frames"][i])
        expected = batch.Embedder(af.load(model_dir), frames_dtype="float32").embed([af_audio.load_audio(src / name)])[0]
        np.testing.assert_allclose(by_bytes["clip"][i], expected.clip, atol=1e-6)
