"""One engine, every path: each way of getting embeddings gives the official reference, item by item.

For the five reference clips and both families, alone and in padded batches: the in-memory API,
a folder run, ``FrameBackbone`` in eval mode, the HEAR module and the training tasks' pooled
features. Clip vectors are compared with the official tensors (including the ATST-Clip divisor
quirk on the multi-chunk clips); frame embeddings with the official frames (ATST-Frame) or with
the in-memory API (ATST-Clip, for which the official code gives no frames).
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from atst_features import frontend, hear
from atst_features.backbone import FrameBackbone
from atst_features.batch import embed_folder
from atst_features.train.tasks import pooled_features

from conftest import CLIPS

SR = frontend.SAMPLE_RATE
EMB_TOL = 1e-4
FAMILIES = ("frame", "clip")


def close(actual, expected, tol: float = EMB_TOL) -> None:
    actual, expected = torch.as_tensor(np.asarray(actual)), torch.as_tensor(np.asarray(expected))
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


def expected_clip(reference, family: str, name: str, blocks: str) -> torch.Tensor:
    if family == "frame" and blocks == "last1":  # ATST-Frame's clip vector is block-major: the last block ends it
        return reference[f"{name}.frame.scene.last12"][-reference[f"{name}.frame.frames.last1"].shape[1] :]
    return reference[f"{name}.{family}.scene.{blocks}"]


def expected_frames(reference, models, family: str, name: str) -> torch.Tensor:
    if family == "frame":
        return reference[f"{name}.frame.frames.last12"]
    return models[family].embed_frames(reference[f"{name}.wav"], SR).embeddings  # checked against "api" below


@pytest.fixture(scope="module")
def models(frame_model, clip_model):
    return {"frame": frame_model, "clip": clip_model}


@pytest.fixture(scope="module")
def wavs(reference):
    return [reference[f"{n}.wav"] for n in CLIPS]


@pytest.fixture(scope="module")
def folder_runs(models, wavs, tmp_path_factory):
    """Every clip through ``embed_folder`` (float32 WAVs, frames of every block in float32)."""
    root = tmp_path_factory.mktemp("equivalence")
    src = root / "src"
    src.mkdir()
    for name, wav in zip(CLIPS, wavs):
        sf.write(src / f"{name}.wav", wav.numpy(), SR, subtype="FLOAT")
    out = {}
    for family, model in models.items():
        dest = root / family
        summary = embed_folder(src, dest, model=model, frame_layers="all", frames_dtype="float32", workers=0, batch_size=3)
        assert summary.ok == len(CLIPS) and summary.failed == 0
        out[family] = {name: dict(np.load(dest / f"{name}.wav.npz")) for name in CLIPS}
    return out


def _padded(wavs):
    return torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), torch.tensor([w.shape[0] for w in wavs])


# Each path: (family, model, wavs, reference, folder_runs) -> per clip (clip vector of every block, frames of every block,
# clip vector of the last block), None where the path does not give that output.


def path_api(model, wavs, folder, family):
    return [(model.embed_clip(w, SR), model.embed_frames(w, SR).embeddings, model.embed_clip(w, SR, layers="last")) for w in wavs]


def path_api_padded(model, wavs, folder, family):
    clips = model.embed_clip(list(wavs), SR, batch_size=3)
    frames = model.embed_frames(list(wavs), SR, batch_size=3)
    last = model.embed_clip(list(wavs), SR, layers="last", batch_size=3)
    return [(c, f.embeddings, lc) for c, f, lc in zip(clips, frames, last)]


def path_api_windows(model, wavs, folder, family):
    """A window of one chunk (batch_size=1): inputs longer than 10.01 s are streamed in pieces."""
    return [(model.embed_clip(w, SR, batch_size=1), model.embed_frames(w, SR, batch_size=1).embeddings, None) for w in wavs]


def path_folder(model, wavs, folder, family):
    return [(folder[family][n]["clip"], folder[family][n]["frames"], None) for n in CLIPS]


def path_backbone_padded(model, wavs, folder, family):
    backbone = FrameBackbone(model, layers="all").eval()
    with torch.no_grad():
        emb, mask = backbone(*_padded(list(wavs)))
    return [(None, emb[i, : int(mask[i].sum())], None) for i in range(len(wavs))]


def path_backbone_single(model, wavs, folder, family):
    backbone = FrameBackbone(model, layers="all").eval()
    with torch.no_grad():
        return [(None, backbone(w[None])[0][0], None) for w in wavs]


def path_hear(model, wavs, folder, family):
    hm = hear.HEARModel(model)
    out = []
    for w in wavs:
        if w.shape[0] < frontend.MIN_SAMPLES:
            out.append((None, None, None))
            continue
        emb, _ = hear.get_timestamp_embeddings(w[None], hm)
        out.append((hear.get_scene_embeddings(w[None], hm)[0], emb[0], None))
    return out


def path_train_padded(model, wavs, folder, family):
    mel, n_frames = frontend.log_mel(*_padded(list(wavs)))
    with torch.no_grad():
        pooled = pooled_features(model.encoder, mel, n_frames)  # (B, [2] D), the last block
    return [(None, None, pooled[i]) for i in range(len(wavs))]


def path_train_single(model, wavs, folder, family):
    out = []
    for w in wavs:
        mel, n_frames = frontend.log_mel(w[None])
        with torch.no_grad():
            out.append((None, None, pooled_features(model.encoder, mel, n_frames)[0]))
    return out


PATHS = {
    "api": path_api,
    "api_padded": path_api_padded,
    "api_windows": path_api_windows,
    "folder": path_folder,
    "backbone_padded": path_backbone_padded,
    "backbone_single": path_backbone_single,
    "hear": path_hear,
    "train_padded": path_train_padded,
    "train_single": path_train_single,
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_path_gives_the_reference(path, family, models, wavs, reference, folder_runs):
    model = models[family]
    results = PATHS[path](model, wavs, folder_runs, family)
    assert len(results) == len(CLIPS)
    checked = 0
    for name, (clip, frames, last) in zip(CLIPS, results):
        if clip is not None:
            close(clip, expected_clip(reference, family, name, "last12"))
            checked += 1
        if frames is not None:
            close(frames, expected_frames(reference, models, family, name))
            checked += 1
        if last is not None:
            close(last, expected_clip(reference, family, name, "last1"))
            checked += 1
    assert checked >= len(CLIPS)  # every path compared something for every clip


def test_multi_chunk_clips_exercise_the_divisor_quirk(reference):
    """The ATST-Clip reference clips above include chunks whose divisor exceeds their own tokens."""
    from atst_features import pooling

    quirks = 0
    for name in CLIPS:
        n = reference[f"{name}.mel"].shape[1]
        quirks += sum(c.divisor_tokens > c.tokens for c in pooling.clip_chunks(0, n, 601, 4))
    assert quirks >= 2
