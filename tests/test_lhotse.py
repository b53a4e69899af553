"""The lhotse feature extractor (the ``lhotse`` extra): registration, lhotse's frame count, a full pipeline."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import soundfile as sf
import torch

from atst_features import hear

lhotse = pytest.importorskip("lhotse", reason="lhotse (the lhotse extra) is not installed: pip install 'atst-features[lhotse]'")

from lhotse.features.base import FeatureExtractor, get_extractor_type  # noqa: E402
from lhotse.utils import compute_num_frames  # noqa: E402

from atst_features.lhotse_features import ATSTFeatureConfig, ATSTFeatureExtractor  # noqa: E402


@pytest.fixture(scope="module")
def extractor(frame_model) -> ATSTFeatureExtractor:
    return ATSTFeatureExtractor(ATSTFeatureConfig(model="tiny"), model=frame_model)


def test_registered_and_serialisable(extractor, tiny_dirs):
    assert get_extractor_type("atst") is ATSTFeatureExtractor
    assert extractor.frame_shift == 0.04 and extractor.feature_dim(16000) == 48
    config = ATSTFeatureConfig(model=str(tiny_dirs["frame"]), layers=[0, 11], hop_s=2.0)
    again = FeatureExtractor.from_dict(ATSTFeatureExtractor(config).to_dict())
    assert isinstance(again, ATSTFeatureExtractor) and again.config == config
    assert again.feature_dim(16000) == 96  # loads the model on first use
    assert pickle.loads(pickle.dumps(again))._model is None  # workers load their own


@pytest.mark.parametrize("n, rate", [(16000, 16000), (16400, 16000), (16200, 16000), (74308, 22050), (132307, 44100),
                                     (4000, 8000), (400, 16000), (12 * 48000 + 5, 48000)])
def test_frame_count_is_lhotses(extractor, n, rate):
    samples = (0.1 * np.random.default_rng(n).standard_normal((2, n))).astype(np.float32)
    feats = extractor.extract(samples, rate)
    assert feats.dtype == np.float32
    assert feats.shape == (compute_num_frames(n / rate, extractor.frame_shift, rate), 48)


def test_features_are_those_of_embed_frames(extractor, frame_model):
    wav = (0.1 * np.random.default_rng(1).standard_normal(12 * 16000)).astype(np.float32)
    ref = frame_model.embed_frames(wav, 16000, layers="last", hop_s=hear.DEFAULT_HOP_S).embeddings.numpy()
    np.testing.assert_allclose(extractor.extract(wav, 16000), ref, atol=1e-5)  # 300 = 300: no padding
    np.testing.assert_allclose(extractor.extract(torch.from_numpy(np.stack([wav, wav])), 16000), ref, atol=1e-5)


def test_bad_inputs(extractor):
    with pytest.raises(ValueError, match="0 frames"):
        extractor.extract(np.zeros(100, np.float32), 16000)
    with pytest.raises(ValueError, match="kHz"):
        extractor.extract(np.zeros(1000, np.float32), 16)
    with pytest.raises(ValueError, match="hop_s"):
        ATSTFeatureExtractor(ATSTFeatureConfig(hop_s=-1))


def test_compute_and_store_features(extractor, tmp_path):
    rate = 22050
    samples = (0.1 * np.random.default_rng(2).standard_normal((int(rate * 3.37), 2))).astype(np.float32)
    sf.write(tmp_path / "a.wav", samples, rate)
    recordings = lhotse.RecordingSet.from_recordings([lhotse.Recording.from_file(tmp_path / "a.wav")])
    cuts = lhotse.CutSet.from_manifests(recordings=recordings)
    cuts = cuts.compute_and_store_features(extractor, storage_path=str(tmp_path / "feats"),
                                           storage_type=lhotse.NumpyFilesWriter)
    cut = cuts[0]
    feats = cut.load_features()
    assert feats.shape == (cut.num_frames, 48) == (84, 48) and cut.features.type == "atst"
    np.testing.assert_allclose(feats, extractor.extract(sf.read(tmp_path / "a.wav", dtype="float32")[0].T, rate), atol=1e-6)
