"""Loading converted directories and official files: checksums, heads, tagging."""

from __future__ import annotations

import json

import pytest
import torch
from test_convert import (
    DATA,
    N_CLASSES,
    TINY_HEADS,
    make_c2f_as2m,
    make_finetuned,
    tiny,
)

import atst_features as af
from atst_features import heads, weights
from atst_features.convert import CheckpointError, convert


def _write(tmp_path, name, ckpt):
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def wav(reference) -> torch.Tensor:
    return reference["chirp_3s.wav"]


@pytest.fixture(scope="module")
def strong_dir(tmp_path_factory):
    """An AudioSet-strong style fine-tuned file (frame-level head, no norm) converted with labels."""
    root = tmp_path_factory.mktemp("strong")
    src = _write(root, "strong.ckpt", make_finetuned())
    labels = [f"/m/{i:04d}" for i in range(N_CLASSES)]
    return af.convert_checkpoint(src, root / "model", num_heads=TINY_HEADS, labels=labels)


# ---------------------------------------------------------------------------- checksums


def test_converted_directory_records_checksums_and_source(tmp_path):
    src = _write(tmp_path, "frame.ckpt", {"state_dict": {"encoder.encoder." + k: v for k, v in tiny("frame").items()}})
    out = af.convert_checkpoint(src, tmp_path / "m", num_heads=TINY_HEADS)
    record = json.loads((out / weights.CHECKSUMS_NAME).read_text())
    assert set(record["files"]) == {"config.json", "model.safetensors"}
    assert record["files"]["model.safetensors"] == weights.sha256_file(out / "model.safetensors")
    assert record["source"] == {
        "file": "frame.ckpt",
        "size": src.stat().st_size,
        "sha256": weights.sha256_file(src),
        "layout": "finetuned",
    }


def test_tampered_directory_is_refused_with_both_hashes(tmp_path):
    out = af.convert_checkpoint(DATA / "tiny48_frame_weights.safetensors", tmp_path / "m", num_heads=TINY_HEADS)
    recorded = json.loads((out / weights.CHECKSUMS_NAME).read_text())["files"]["model.safetensors"]
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    actual = weights.sha256_file(out / "model.safetensors")
    with pytest.raises(weights.IntegrityError) as err:
        af.load(out)
    assert recorded in str(err.value) and actual in str(err.value)


def test_directory_without_checksums_loads_with_a_warning(tmp_path):
    c = convert(tiny("clip"), num_heads=TINY_HEADS)
    weights.save_converted(c.config, c.state_dict, tmp_path)
    (tmp_path / weights.CHECKSUMS_NAME).unlink()
    with pytest.warns(UserWarning, match="UNVERIFIED"):
        assert af.load(tmp_path).config.family == "clip"


# ---------------------------------------------------------------------------- loading official files


def test_load_official_file_in_memory_keeps_the_head(tmp_path, strong_dir):
    """``load(file)`` converts in memory, head included (heads from the recorded arch, which must fit the width)."""
    from_dir = af.load(strong_dir)
    assert from_dir.head is not None and from_dir.head.level == "frame" and from_dir.head.labels[0] == "/m/0000"
    src = _write(tmp_path, "ft.ckpt", {**make_finetuned(), "hyper_parameters": {"nclass": N_CLASSES}})
    with pytest.raises(CheckpointError, match="num_heads"):
        af.load(src)  # 48 wide: no arch, no width rule gives its heads
    src = _write(tmp_path, "ft-small.ckpt", {**make_finetuned(), "hyper_parameters": {"arch": "small"}})
    with pytest.raises(CheckpointError, match="arch 'small'.*384 wide.*48 wide"):
        af.load(src)  # an arch that contradicts the width is not trusted for the heads
    model = af.load(af.convert_checkpoint(_write(tmp_path, "ft3.ckpt", make_finetuned()), tmp_path / "ft3", num_heads=TINY_HEADS))
    assert model.config.num_heads == TINY_HEADS and model.head is not None and model.head.num_classes == N_CLASSES


def test_load_model_safetensors_path_means_its_directory(strong_dir):
    model = af.load(strong_dir / "model.safetensors")
    assert model.head is not None and model.config.num_heads == TINY_HEADS


def test_unknown_source_lists_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="atst-frame-base"):
        af.load(tmp_path / "nothing-here")


# ---------------------------------------------------------------------------- heads and tagging


def test_frame_level_tagging(strong_dir, wav):
    model = af.load(strong_dir)
    tags = model.tag(wav, 16000)
    frames = model.embed_frames(wav, 16000, layers="last")
    official = make_finetuned()["state_dict"]
    expected = torch.sigmoid(frames.embeddings @ official["head.linear.weight"].T + official["head.linear.bias"])
    assert tags.scores.shape == (len(frames), N_CLASSES)
    torch.testing.assert_close(tags.scores, expected, atol=1e-5, rtol=0)
    assert torch.equal(tags.timestamps, frames.timestamps)
    assert tags.labels == [f"/m/{i:04d}" for i in range(N_CLASSES)]
    best = tags.top(2)
    assert best[0][0] in tags.labels and best[0][1] == pytest.approx(float(tags.scores.max()))


def test_clip_level_tagging_with_batchnorm(tmp_path, wav):
    src = _write(tmp_path, "c2f.ckpt", make_c2f_as2m())
    model = af.load(af.convert_checkpoint(src, tmp_path / "c2f", num_heads=TINY_HEADS))
    assert model.head.level == "clip" and model.head.labels is None
    tags = model.tag([wav, wav[:16000]], 16000)
    head = make_c2f_as2m()["state_dict"]
    for t, audio in zip(tags, [wav, wav[:16000]]):
        x = model.embed_clip(audio, 16000, layers="last")  # (48,) the last block's clip vector
        x = (x - head["model.linear.norm.running_mean"]) / torch.sqrt(head["model.linear.norm.running_var"] + 1e-5)
        expected = torch.sigmoid(x @ head["model.linear.linear.weight"].T + head["model.linear.linear.bias"])
        torch.testing.assert_close(t.scores, expected, atol=1e-5, rtol=0)
        assert t.timestamps is None and t.top(1)[0][0] == int(expected.argmax())


def test_clip_family_head_takes_cls_and_avg(tmp_path, wav):
    src = _write(tmp_path, "clip-ft.ckpt", make_finetuned("clip", norm=True))
    model = af.load(af.convert_checkpoint(src, tmp_path / "m", num_heads=TINY_HEADS))
    assert model.head.in_dim == 96 and model.tag(wav, 16000).scores.shape == (N_CLASSES,)


def test_tag_without_head_says_what_is_needed(frame_model, wav):
    with pytest.raises(ValueError, match="no classification head"):
        frame_model.tag(wav, 16000)


def test_labels_must_match_the_head(tmp_path):
    src = _write(tmp_path, "strong.ckpt", make_finetuned())
    with pytest.raises(ValueError, match="3 labels"):
        af.convert_checkpoint(src, tmp_path / "m", num_heads=TINY_HEADS, labels=["a", "b", "c"])
    pretrain = _write(tmp_path, "enc.ckpt", tiny("frame"))
    with pytest.raises(ValueError, match="no classification head"):
        af.convert_checkpoint(pretrain, tmp_path / "n", num_heads=TINY_HEADS, labels=["a"])


def test_head_width_is_checked_against_the_encoder():
    c = convert(make_finetuned(), num_heads=TINY_HEADS)
    wide = heads.ClassificationHead(96, N_CLASSES, "frame", norm=False)
    with pytest.raises(ValueError, match="96 inputs"):
        weights.build(c.config, c.state_dict, head=wide)


def test_single_label_head_round_trips(tmp_path, wav):
    """A single-label (softmax) head keeps its kind and labels through a model directory."""
    c = convert(make_c2f_as2m(), num_heads=TINY_HEADS)
    classes = [f"c{i}" for i in range(N_CLASSES)]
    weights.save_converted(c.config, c.state_dict, tmp_path, head=c.head, head_level="clip", labels=classes, multilabel=False)
    model = af.load(tmp_path)
    assert model.head.level == "clip" and model.head.labels == classes and not model.head.multilabel
    scores = model.tag(wav, 16000).scores
    assert scores.sum().item() == pytest.approx(1.0, abs=1e-5)  # single-label: softmax


def test_training_checkpoint_converts(tmp_path, wav):
    """The format atst_features.train writes: encoder in our names + config, and the head with its classes."""
    c = convert(make_c2f_as2m(), num_heads=TINY_HEADS)
    classes = [f"c{i}" for i in range(N_CLASSES)]
    ckpt = {
        "format": "atst-features-train",
        "step": 3,
        "encoder_config": c.config.to_dict(),
        "encoder_state_dict": c.state_dict,
        "head_state_dict": c.head,
        "head": {"classes": classes, "multilabel": False},
    }
    t = convert(ckpt)
    assert t.layout == "atst-features-train" and t.labels == classes and not t.multilabel
    assert all(torch.equal(t.state_dict[k], v) for k, v in c.state_dict.items())
    torch.save(ckpt, tmp_path / "train.pt")
    model = af.load(tmp_path / "train.pt")
    assert model.head.labels == classes and not model.head.multilabel
    out = af.convert_checkpoint(tmp_path / "train.pt", tmp_path / "conv")
    assert af.load(out).head.labels == classes
    broken = dict(ckpt, encoder_state_dict={k: v for k, v in c.state_dict.items() if k != "norm.bias"})
    with pytest.raises(CheckpointError, match="norm.bias"):
        convert(broken)


# ---------------------------------------------------------------------------- the manifest as an argument


def test_manifest_from_a_dict_or_a_file(tmp_path):
    data = {"models": [{"name": "x", "family": "frame"}, {"name": "y", "family": "clip"}]}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    assert weights.list_models(data) == ["x", "y"] == af.list_models(path)
    assert weights.manifest(path)["y"]["family"] == "clip"
    assert "atst-frame-base" in af.list_models()
