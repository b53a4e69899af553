"""Loading files nobody vouches for: crafted checkpoints and model directories must fail fast and clearly.

Each case of the bad-input suite (memory bombs, malformed or damaged models, planted or unlisted
files, out-of-range configs and crop lengths) ends in a ``LoadError`` that names the problem,
before a model is built or anything is written; the new layouts (PretrainedSED, ATST-SED's Hub
copy) and the front-end contract (``db_clamp``) are checked against independent restatements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from test_convert import TINY_HEADS, make_atst_sed, make_dino, make_lightning_pretrain, prefixed, tiny

import atst_features as af
from atst_features import artifacts, cli, convert, frontend, registry, weights
from atst_features.errors import (
    CheckpointError,
    IntegrityError,
    LoadArgumentError,
    LoadError,
    ModelNotFoundError,
    UnknownModelError,
)
from atst_features.model import ATSTConfig


def _save(tmp_path: Path, name: str, ckpt) -> Path:
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atst-features")
    cli.add_weights_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _read(path: Path, depth: int | None = None) -> convert.Converted:
    """What ``load(path)`` does with an official file, for the tiny encoders (whose 3 heads must be given)."""
    return convert.convert(weights.read_checkpoint(path), num_heads=TINY_HEADS, depth=depth)


def _without(sd: dict, *blocks: int) -> dict:
    return {k: v for k, v in sd.items() if not any(k.startswith(f"blocks.{b}.") for b in blocks)}


# ---------------------------------------------------------------------------- memory bombs


def test_a_stride_0_bomb_is_refused_before_anything_is_copied(tmp_path, capsys):
    """15 kB that claims a 3072-wide encoder: every tensor a zero-stride view of one float."""
    cfg = ATSTConfig(family="frame", embed_dim=3072, num_heads=48)
    one = torch.zeros(1)
    bomb = {k: one.expand(*shape) for k, shape in convert.expected_shapes(cfg).items()}
    path = _save(tmp_path, "bomb.ckpt", {"state_dict": prefixed("model.teacher.encoder.", bomb)})
    assert path.stat().st_size < 100_000
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="zero stride"):
        af.load(path)
    assert time.monotonic() - t0 < 5
    assert _cli(["convert", str(path), str(tmp_path / "out"), "--num-heads", "48"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("atst-features convert: key 'model.teacher.encoder.pos_embed' is a view with a zero stride")
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_overlapping_views_and_short_storages_are_refused(tmp_path):
    sd = tiny("frame")
    sd["blocks.0.attn.proj.weight"] = torch.randn(48 + 47).as_strided((48, 48), (1, 1))
    with pytest.raises(CheckpointError, match="overlapping strides"):
        convert.convert(sd, num_heads=TINY_HEADS)
    short = tiny("frame")
    short["norm_frame.bias"] = torch.zeros(48)
    short["norm_frame.bias"].untyped_storage().resize_(8)  # a tensor larger than its storage (2 of 48 floats)
    with pytest.raises(CheckpointError, match="reaches past its storage of 2 elements"):
        convert.convert(short, num_heads=TINY_HEADS)


def test_out_of_range_configs_are_refused_before_building(tmp_path, tiny_dirs):
    t0 = time.monotonic()
    for field, value, problem in [
        ("depth", 400, "depth must be an integer in 1..64"),
        ("num_heads", 0, "num_heads must be an integer"),
        ("num_heads", 5, "not divisible"),
        ("embed_dim", "48", "embed_dim must be an integer"),
        ("embed_dim", 1 << 20, "embed_dim must be an integer"),
        ("spec_w", 1 << 19, "tokens per pass"),
        ("mlp_ratio", float("nan"), "mlp_ratio"),
        ("qkv_bias", 1, "qkv_bias"),
        ("clip_chunk_frames", 1, "at least one token"),
        ("db_clamp", [80, -50], "db_clamp"),
        ("depth", 40, "missing keys"),  # in range, but not the weights' depth: refused by the shapes, not built
    ]:
        d = shutil.copytree(tiny_dirs["frame"], tmp_path / f"{field}-{value}")
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(dict(config, **{field: value})))
        artifacts._write_checksums(d, ["config.json", "model.safetensors"], None)
        with pytest.raises(CheckpointError, match=problem):
            af.load(d)
    assert time.monotonic() - t0 < 10  # nothing was built
    with pytest.raises(ValueError, match="name its family"):
        ATSTConfig.from_dict({"embed_dim": 48})


# ---------------------------------------------------------------------------- malformed models


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda sd: _without(sd, 11), "has 11 blocks"),
        (lambda sd: _without(sd, 6, 7, 8, 9, 10, 11), "has 6 blocks"),
        (lambda sd: {**sd, **{k.replace("blocks.11.", "blocks.12."): v for k, v in sd.items() if "blocks.11." in k}}, "has 13 blocks"),
        (lambda sd: _without(sd, 5), r"blocks\.5\.\* is missing"),
        (lambda sd: {k.replace("blocks.1.", "blocks.01."): v for k, v in sd.items()}, "does not name a block"),
    ],
    ids=["no block 11", "blocks 6-11 removed", "extra block 12", "a gap", "a padded index"],
)
def test_the_depth_is_the_official_one(tmp_path, change, problem, capsys):
    path = _save(tmp_path, "m.ckpt", change(tiny("frame")))
    with pytest.raises(CheckpointError, match=problem):
        _read(path)
    assert _cli(["convert", str(path), str(tmp_path / "out"), "--num-heads", "3"]) == 1
    assert "atst-features convert:" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_another_depth_only_on_request(tmp_path):
    path = _save(tmp_path, "m.ckpt", _without(tiny("frame"), 11))
    assert _cli(["convert", str(path), str(tmp_path / "out"), "--num-heads", "3", "--depth", "11"]) == 0
    assert af.load(tmp_path / "out").config.depth == 11  # the directory records the intended depth
    assert _read(path, depth=11).config.depth == 11
    with pytest.raises(CheckpointError, match="depth=12 was asked for"):
        af.load(tmp_path / "out", depth=12)
    with pytest.raises(CheckpointError, match="depth=10 was asked for"):
        convert.convert(tiny("frame"), num_heads=TINY_HEADS, depth=10)


def test_teacher_and_student_depths_must_agree():
    ckpt = make_lightning_pretrain("frame", compact=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("model.student.encoder.blocks.11.")}
    with pytest.raises(CheckpointError, match="twin model.student.encoder.\\* has 11"):
        convert.convert(ckpt, num_heads=TINY_HEADS)
    dino = make_dino()
    dino["student"] = {k: v for k, v in dino["student"].items() if ".blocks.11." not in k}
    with pytest.raises(CheckpointError, match="has 11"):
        convert.convert(dino, num_heads=TINY_HEADS)


def test_the_arch_must_agree_with_the_width():
    cfg = ATSTConfig(family="frame", embed_dim=384, num_heads=6)
    meta = {k: torch.empty(s, device="meta") for k, s in convert.expected_shapes(cfg).items()}
    ckpt = {"state_dict": prefixed("model.teacher.encoder.", meta), "hyper_parameters": {"arch": "base"}}
    with pytest.raises(CheckpointError, match="arch 'base'.*768 wide.*384 wide"):
        convert.convert(ckpt)
    with pytest.raises(CheckpointError, match="arch 'base'"):  # even with the heads given
        convert.convert(ckpt, num_heads=12)
    ckpt["hyper_parameters"]["arch"] = "small"
    assert convert.convert(ckpt).config.num_heads == 6


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    sd = tiny("frame")
    sd["blocks.3.mlp.fc2.weight"][0, 0] = bad
    with pytest.raises(CheckpointError, match=r"'blocks\.3\.mlp\.fc2\.weight' holds NaN or infinite"):
        _read(_save(tmp_path, "nan.ckpt", sd))
    c = convert.convert(tiny("frame"), num_heads=TINY_HEADS)
    out = weights.save_converted(c.config, {**c.state_dict, "norm.bias": torch.full((48,), bad)}, tmp_path / "d")
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        af.load(out)


@pytest.mark.parametrize("train_len", [0.001, 0.5, 10.5, float("inf"), float("nan"), "six", True])
def test_the_recorded_crop_length_is_checked(train_len):
    ckpt = make_lightning_pretrain("clip", compact=True, hparams={"train_len": train_len})
    with pytest.raises(CheckpointError, match="crop length"):
        convert.convert(ckpt, num_heads=TINY_HEADS)


def test_heads_are_checked_too(tmp_path):
    ckpt = {**prefixed("model.atst.", tiny("frame")), "strong_head.weight": torch.zeros(0, 48), "strong_head.bias": torch.zeros(0)}
    with pytest.raises(CheckpointError, match="1..100000 classes"):
        convert.convert(ckpt, num_heads=TINY_HEADS)
    ckpt = {**prefixed("model.atst.", tiny("frame")), **prefixed("strong_head.", {"weight": torch.zeros(3, 48), "bias": torch.full((3,), math.nan)})}
    with pytest.raises(CheckpointError, match="strong_head.linear.bias|NaN"):
        convert.convert(ckpt, num_heads=TINY_HEADS)


# ---------------------------------------------------------------------------- everything loaded is verified


@pytest.fixture
def verified_dir(tmp_path, tiny_dirs) -> Path:
    return shutil.copytree(tiny_dirs["frame"], tmp_path / "model")


def _planted_head(directory: Path) -> None:
    artifacts.save_head({"linear.weight": torch.zeros(2, 48), "linear.bias": torch.tensor([9.0, -9.0])}, "frame", directory, ["Gunshot", "x"])


def test_planted_head_and_labels_are_refused(verified_dir):
    _planted_head(verified_dir)
    with pytest.raises(IntegrityError, match="head.safetensors' is not listed in checksums.json"):
        af.load(verified_dir)
    (verified_dir / "head.safetensors").unlink()
    with pytest.raises(IntegrityError, match="labels.json' is not listed"):
        af.load(verified_dir)


def test_an_empty_or_odd_record_verifies_nothing(verified_dir):
    record = json.loads((verified_dir / "checksums.json").read_text())
    (verified_dir / "checksums.json").write_text(json.dumps(dict(record, files={})))
    with pytest.raises(IntegrityError, match="not listed"):
        af.load(verified_dir)
    (verified_dir / "checksums.json").write_text(json.dumps(dict(record, files={**record["files"], "../../etc/passwd": "0" * 64})))
    with pytest.raises(IntegrityError, match="not a model file"):
        af.load(verified_dir)
    (verified_dir / "checksums.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="not a JSON record"):
        af.load(verified_dir)


def test_without_a_record_the_load_says_it_is_unverified(verified_dir):
    (verified_dir / "checksums.json").unlink()
    with pytest.warns(UserWarning, match="UNVERIFIED"):
        af.load(verified_dir)
    (verified_dir / "labels.json").write_text('["x"]')
    with pytest.raises(CheckpointError, match="labels.json but no head.safetensors"), pytest.warns(UserWarning):
        af.load(verified_dir)


# ---------------------------------------------------------------------------- provenance of every kind of source


def test_every_kind_of_source_records_what_was_read(tmp_path, tiny_dirs):
    d = af.load(tiny_dirs["frame"])
    assert d.source == str(tiny_dirs["frame"]) and d.weights_sha256 == weights.sha256_file(tiny_dirs["frame"] / "model.safetensors")
    via_file = af.load(tiny_dirs["frame"] / "model.safetensors")
    assert via_file.source == str(tiny_dirs["frame"]) and via_file.weights_sha256 == d.weights_sha256
    path = _save(tmp_path, "enc.ckpt", {**make_lightning_pretrain("frame", compact=True), "hyper_parameters": {}})
    c = _read(path)
    big = ATSTConfig(family="frame", embed_dim=384, num_heads=6, depth=1)  # heads inferable from the width: load(file)
    sd = {convert._official_name(k, big): v for k, v in af.ATSTEncoder(big).state_dict().items()}
    path = _save(tmp_path, "small.ckpt", sd)
    official = af.load(path, depth=1)
    assert official.source == str(path) and official.weights_sha256 == weights.sha256_file(path)
    assert c.layout == "lightning-pretrain"


def test_load_arguments_and_unknown_sources_are_load_errors(tmp_path, tiny_dirs):
    with pytest.raises(LoadArgumentError, match="device"):
        af.load(tiny_dirs["frame"], device="cuda:99" if not torch.cuda.is_available() else "nonsense")
    with pytest.raises(LoadArgumentError):
        af.load(tiny_dirs["frame"], dtype="float8")
    with pytest.raises(ModelNotFoundError, match="known names") as err:
        af.load(tmp_path / "nothing")
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(UnknownModelError) as unknown:
        registry.get("no-such-model")
    assert str(unknown.value).startswith("'no-such-model' is not a known model") and isinstance(unknown.value, KeyError)
    assert all(issubclass(e, LoadError) for e in (CheckpointError, IntegrityError, LoadArgumentError, ModelNotFoundError))


# ---------------------------------------------------------------------------- PretrainedSED and ATST-SED's Hub copy


def make_pretrainedsed(n_strong: int = 7, n_weak: int = 4) -> dict:
    """PretrainedSED's flat state dict: model.atst.<official keys>, strong_head / weak_head Linear, mel buffers."""
    gen = torch.Generator().manual_seed(7)
    return {
        **prefixed("model.atst.", tiny("frame")),
        "strong_head.weight": torch.randn(n_strong, 48, generator=gen),
        "strong_head.bias": torch.randn(n_strong, generator=gen),
        "weak_head.weight": torch.randn(n_weak, 48, generator=gen),
        "weak_head.bias": torch.randn(n_weak, generator=gen),
        "model.atst_mel.mel_transform.spectrogram.window": torch.hann_window(1024),
        "model.atst_mel.mel_transform.mel_scale.fb": frontend.mel_filterbank(),
    }


def test_the_pretrainedsed_layout(tmp_path, reference):
    ckpt = make_pretrainedsed()
    c = convert.convert(ckpt, num_heads=TINY_HEADS)
    assert c.layout == "pretrainedsed" and c.config.db_clamp == (-50.0, 80.0)
    assert c.head_level == "frame" and torch.equal(c.head["linear.weight"], ckpt["strong_head.weight"])
    weak = c.extra_heads["weak"]
    assert weak.level == "clip" and torch.equal(weak.state_dict["linear.bias"], ckpt["weak_head.bias"])
    assert any("front-end buffers" in what for what in c.skipped)
    assert "weak head: clip-level, 48 -> 4 classes" in c.summary() and "dB clamped to [-50, 80]" in c.summary()
    out = af.convert_checkpoint(_save(tmp_path, "ATST-F_strong_1.pt", ckpt), tmp_path / "psed", num_heads=TINY_HEADS)
    model = af.load(out)
    assert model.config.db_clamp == (-50.0, 80.0) and model.head.level == "frame" and model.head.num_classes == 7
    assert json.loads((out / "config.json").read_text())["db_clamp"] == [-50.0, 80.0]
    tags = model.tag(reference["chirp_3s.wav"], 16000)
    assert tags.scores.shape == (75, 7)


def test_atst_sed_files_carry_the_clamp_and_the_hub_copy_converts():
    sed = convert.convert(make_atst_sed(), num_heads=TINY_HEADS)
    assert sed.config.db_clamp == (-50.0, 80.0)
    flat = {k: v for k, v in make_atst_sed()["state_dict"].items() if k.startswith(("sed_teacher.", "sed_student."))}
    hub_copy = convert.convert(flat, num_heads=TINY_HEADS)  # igonzf/ATST-SED model.pth: a flat state dict
    assert hub_copy.layout == "atst-sed" and all(torch.equal(hub_copy.state_dict[k], v) for k, v in sed.state_dict.items())


# ---------------------------------------------------------------------------- the front-end contract


def _restated_log_mel(wav: torch.Tensor, clamp: tuple[float, float] | None) -> torch.Tensor:
    """mel dB -> 80 dB floor -> clamp -> min-max, written out here from the official recipe."""
    padded = torch.nn.functional.pad(wav[None, None], (512, 512), mode="reflect")[0]
    db = frontend.mel_db(padded)[0]  # (64, T), 10 log10(max(P, 1e-10))
    db = torch.maximum(db, db.max() - 80.0)
    if clamp is not None:
        db = db.clamp(clamp[0], clamp[1])
    return (db + 79.6482) / (50.6842 + 79.6482) * 2.0 - 1.0


def test_the_db_clamp_is_applied_by_the_one_front_end(tiny_dirs, reference):
    chirp = reference["chirp_3s.wav"]
    quiet = 1e-5 * torch.randn(16000, generator=torch.Generator().manual_seed(0))
    wav = torch.cat([quiet, 0.003 * chirp])  # a quiet clip, quieter at the start: its floor is below -50 dB
    clamp = (-50.0, 80.0)
    mel, _ = frontend.log_mel(wav[None], db_clamp=clamp)
    want = _restated_log_mel(wav, clamp)
    torch.testing.assert_close(mel[0], want, atol=1e-5, rtol=0)
    assert (mel[0] - frontend.log_mel(wav[None])[0][0]).abs().max() > 0.1  # the clamp matters on this clip

    plain = af.load(tiny_dirs["frame"])
    clamped = weights.build(dataclasses.replace(plain.config, db_clamp=clamp), plain.encoder.state_dict())
    got = clamped.embed_frames(wav, 16000, layers="last").embeddings  # one chunk: 401 frames -> 100 tokens
    with torch.inference_mode():
        expected = clamped.encoder.forward_intermediates(want[None], blocks=[11]).tokens[0, 0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got - plain.embed_frames(wav, 16000, layers="last").embeddings).abs().max() > 1e-3

    from atst_features.backbone import FrameBackbone

    with torch.no_grad():
        emb, _ = FrameBackbone(clamped).eval()(wav[None])
    torch.testing.assert_close(emb[0], expected, atol=1e-4, rtol=0)


def test_the_manifest_checks_the_front_end_contract():
    spec = registry.get("atst-sed-stage2-encoder")
    cfg = ATSTConfig.from_dict(dict(spec.config))
    weights._check_config(spec, cfg)
    with pytest.raises(CheckpointError, match="db_clamp None"):
        weights._check_config(spec, dataclasses.replace(cfg, db_clamp=None))
    with pytest.raises(CheckpointError, match="db_clamp"):
        weights._check_config(registry.get("atst-frame-base"), cfg)
