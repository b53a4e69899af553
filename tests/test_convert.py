"""Conversion of every official checkpoint layout, synthesized from the recorded key skeletons.

The official Lightning pretraining files are rebuilt from ``checkpoint_skeletons.json`` (every key,
shape, dtype and the default ``hyper_parameters``); the other layouts are built by hand from
their documented key structure. To stay fast, the encoder slots hold the tiny48 reference
encoders (official key names) and the copies that must *not* be taken (students, distillation
teachers) hold perturbed copies, so taking the wrong part shows up as a mismatch.

The ``make_*`` functions here are also used by ``test_weights.py`` and ``test_download.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import atst_features as af
from atst_features import cli, convert, weights
from atst_features.convert import CheckpointError

DATA = Path(__file__).parent / "data"
SKELETONS = json.loads((DATA / "checkpoint_skeletons.json").read_text(encoding="utf-8"))
TINY_HEADS = 3  # the tiny48 encoders have 3 heads, which no width or arch rule gives
N_CLASSES = 5


# ---------------------------------------------------------------------------- official files, synthesized


def tiny(family: str) -> dict[str, torch.Tensor]:
    """The tiny48 reference encoder of ``family`` with official key names (no prefix)."""
    return load_file(str(DATA / f"tiny48_{family}_weights.safetensors"))


def shifted(sd: dict[str, torch.Tensor], delta: float = 0.5) -> dict[str, torch.Tensor]:
    """A different encoder with the same keys and shapes (stands for a student or another teacher)."""
    return {k: v + delta for k, v in sd.items()}


def prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def random_like_skeleton(shape: list[int], dtype: str, compact: bool, gen: torch.Generator) -> torch.Tensor:
    """A tensor of the skeleton's dtype: its shape, or a 2-element stand-in when ``compact``."""
    if dtype == "int64":
        return torch.tensor(7) if not shape else torch.zeros(shape, dtype=torch.int64)
    return torch.randn(*([2] if compact else shape), generator=gen)


def make_lightning_pretrain(
    family: str,
    size: str = "small",
    teacher: dict | None = None,
    student: dict | None = None,
    compact: bool = False,
    hparams: dict | None = None,
) -> dict:
    """An official Lightning pretraining file of ATST-``family`` ``size`` (every key of the skeleton).

    Encoder slots hold ``teacher`` / ``student`` (default: tiny48 and a shifted copy); the other
    keys (projectors, predictor) random tensors of the recorded shapes, or tiny ones when ``compact``.
    """
    teacher = tiny(family) if teacher is None else teacher
    student = shifted(teacher) if student is None else student
    skel = SKELETONS[f"{family}_{size}"]
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, (shape, dtype) in skel["state_dict"].items():
        if key.startswith("model.teacher.encoder."):
            sd[key] = teacher[key[len("model.teacher.encoder.") :]]
        elif key.startswith("model.student.encoder."):
            sd[key] = student[key[len("model.student.encoder.") :]]
        else:
            sd[key] = random_like_skeleton(shape, dtype, compact, gen)
    hp = dict(skel["hyper_parameters_defaults"], **(hparams or {}))
    if teacher["pos_embed"].shape[-1] != convert.ARCH_WIDTH[size]:
        del hp["arch"]  # a tiny encoder in the official layout: an official arch would contradict its width
    return {
        "state_dict": sd,
        "hyper_parameters": hp,
        "pytorch-lightning_version": "1.7.7",
        "epoch": 3,
        "global_step": 1000,
        "optimizer_states": [
            {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
        ],
        "lr_schedulers": [],
    }


def make_dino(teacher: dict | None = None, student: dict | None = None, args: dict | None = None) -> dict:
    """The DINO-style ATST-Clip base file: ``teacher`` / ``student`` dicts with ``module.backbone.*``
    and ``module.head.*`` (projector), ``optimizer``, ``epoch``, an ``args`` Namespace, ``byol_loss``."""
    teacher = tiny("clip") if teacher is None else teacher
    student = shifted(teacher) if student is None else student
    gen = torch.Generator().manual_seed(1)
    projector = {f"head.projector.{i}.weight": torch.randn(8, 8, generator=gen) for i in range(7)}
    defaults = dict(pos_type="cut", patch_height=64, patch_width=4, use_cls=True, anchor_len=[6.0])
    if teacher["pos_embed"].shape[-1] == 768:
        defaults["arch"] = "ast_base"  # the official file's; a tiny encoder records no arch
    ns = argparse.Namespace(**{**defaults, **(args or {})})
    return {
        "teacher": prefixed("module.", {**prefixed("backbone.", teacher), **projector}),
        "student": prefixed("module.", {**prefixed("backbone.", student), **projector}),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": []}]},
        "epoch": 100,
        "args": ns,
        "byol_loss": np.float64(0.25),
    }


def linear_head(in_dim: int, norm: bool, seed: int = 2) -> dict[str, torch.Tensor]:
    """An official ``LinearHead`` state dict (``linear.*`` [+ ``norm.*`` BatchNorm statistics])."""
    gen = torch.Generator().manual_seed(seed)
    head = {
        "linear.weight": torch.randn(N_CLASSES, in_dim, generator=gen),
        "linear.bias": torch.randn(N_CLASSES, generator=gen),
    }
    if norm:
        head["norm.running_mean"] = torch.randn(in_dim, generator=gen)
        head["norm.running_var"] = torch.rand(in_dim, generator=gen) + 0.5
        head["norm.num_batches_tracked"] = torch.tensor(1234)
    return head


def make_finetuned(family: str = "frame", norm: bool = False, encoder: dict | None = None) -> dict:
    """A fine-tuned Lightning file: ``encoder.encoder.*`` and ``head.*`` (AS-strong: no norm, frame-level)."""
    encoder = tiny(family) if encoder is None else encoder
    d = encoder["pos_embed"].shape[-1]
    in_dim = 2 * d if (family == "clip" and norm) else d
    sd = {**prefixed("encoder.encoder.", encoder), **prefixed("head.", linear_head(in_dim, norm))}
    return {"state_dict": sd, "hyper_parameters": {"learning_rate": 0.01, "nclass": N_CLASSES}, "epoch": 9}


def make_c2f_frame() -> dict:
    """Frame-level ATST-C2F: ``encoder.encoder.frame_encoder.*`` (the student), the frozen teacher model
    under ``encoder.encoder.teacher_module.*``, and ``head.linear.*``."""
    student = tiny("frame")
    teacher_model = {
        **prefixed("encoder.encoder.", shifted(student, 0.25)),
        **prefixed("head.", linear_head(48, False, 3)),
    }
    sd = {
        **prefixed("encoder.encoder.frame_encoder.", student),
        **prefixed("encoder.encoder.teacher_module.", teacher_model),
        **prefixed("head.", linear_head(48, False)),
    }
    return {"state_dict": sd, "epoch": 4}


def make_c2f_as2m() -> dict:
    """ATST-C2F on AudioSet-2M: the ATST-Frame student ``model.student.*`` (no ``encoder.`` level), the
    fine-tuned ATST-Clip teacher ``model.teacher.encoder.*`` with ``model.teacher.head.*``, and the
    student's clip-level head ``model.linear.*``. No hyper_parameters (never saved)."""
    sd = {
        **prefixed("model.student.", tiny("frame")),
        **prefixed("model.teacher.encoder.", tiny("clip")),
        **prefixed("model.teacher.head.", linear_head(96, True, 4)),
        **prefixed("model.linear.", linear_head(48, True)),
    }
    return {"state_dict": sd, "epoch": 20, "optimizer_states": []}


def make_atst_sed() -> dict:
    """ATST-SED stage 2: mean-teacher CRNN (``sed_teacher.*``, ``sed_student.*``) with the ATST-Frame
    branch under ``atst_frame.atst.``, front-end buffers, thop counters, and the top-level CRNN dicts."""
    gen = torch.Generator().manual_seed(5)

    def crnn(atst: dict) -> dict:
        rest = {
            "cnn.cnn.conv0.weight": torch.randn(16, 1, 3, 3, generator=gen),
            "cnn.cnn.batchnorm0.running_mean": torch.randn(16, generator=gen),
            "rnn.rnn.weight_ih_l0": torch.randn(384, 128, generator=gen),
            "cat_tf.weight": torch.randn(128, 176, generator=gen),
            "dense.weight": torch.randn(10, 256, generator=gen),
            "dense_softmax.weight": torch.randn(10, 256, generator=gen),
            "total_ops": torch.zeros(1, dtype=torch.float64),
            "atst_frame.atst.blocks.0.attn.total_params": torch.zeros(1, dtype=torch.float64),
        }
        return {**prefixed("atst_frame.atst.", atst), **rest}

    teacher, student = crnn(tiny("frame")), crnn(shifted(tiny("frame")))
    sd = {
        **prefixed("sed_teacher.", teacher),
        **prefixed("sed_student.", student),
        "mel_spec.spectrogram.window": torch.hamming_window(2048),
        "mel_spec.mel_scale.fb": torch.rand(1025, 128, generator=gen),
    }
    return {
        "state_dict": sd,
        "hyper_parameters": {"training": {"batch_size": [24, 24, 48, 48]}},
        "sed_student": student,
        "sed_teacher": teacher,
    }


def tiny_converted(family: str) -> dict[str, torch.Tensor]:
    """What the tiny48 encoder must convert to (our names)."""
    return convert.convert_encoder(tiny(family), num_heads=TINY_HEADS)[1]


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ---------------------------------------------------------------------------- the skeletons


@pytest.mark.parametrize("name", sorted(SKELETONS))
def test_skeleton_encoder_keys_are_the_official_encoder(name):
    """The skeleton's teacher and student encoders have exactly the tiny48 (official) key set."""
    family = name.split("_")[0]
    sd = SKELETONS[name]["state_dict"]
    for part in ("model.teacher.encoder.", "model.student.encoder."):
        assert {k[len(part) :] for k in sd if k.startswith(part)} == set(tiny(family))


@pytest.mark.parametrize("name", sorted(SKELETONS))
def test_full_size_pretraining_files_convert(name):
    """Every key and shape of the real small / base files, as meta tensors (no memory, no time)."""
    family, size = name.split("_")
    skel = SKELETONS[name]
    ckpt = {
        "state_dict": {
            k: torch.empty(s, dtype=getattr(torch, d), device="meta") for k, (s, d) in skel["state_dict"].items()
        },
        "hyper_parameters": skel["hyper_parameters_defaults"],
        "optimizer_states": [],
    }
    c = convert.convert(ckpt)
    width, heads = {"small": (384, 6), "base": (768, 12)}[size]
    assert (c.config.family, c.config.embed_dim, c.config.depth, c.config.num_heads) == (family, width, 12, heads)
    assert c.config.max_tokens == 250 and c.layout == "lightning-pretrain" and c.head is None
    assert len(c.state_dict) == (139 if family == "clip" else 138)
    narrow = dataclasses.replace(c.config, embed_dim=48, num_heads=3)  # same keys, built in no time
    assert set(c.state_dict) == set(af.ATSTEncoder(narrow).state_dict())
    n_skipped = {what: len(keys) for what, keys in c.skipped.items()}
    assert sorted(n_skipped.values()) == sorted([len(c.state_dict), 7, 7, 7])
    assert sum(n_skipped.values()) + len(c.state_dict) == len(skel["state_dict"])
    assert "optimizer_states" in c.unread_entries and "hyper_parameters" not in c.unread_entries


# ---------------------------------------------------------------------------- every layout


LAYOUT_CASES = {
    "lightning-pretrain frame": (lambda: make_lightning_pretrain("frame"), "frame", "lightning-pretrain", None),
    "lightning-pretrain clip": (lambda: make_lightning_pretrain("clip"), "clip", "lightning-pretrain", None),
    "dino clip base": (make_dino, "clip", "dino", None),
    "finetuned frame-level (as-strong)": (make_finetuned, "frame", "finetuned", "frame"),
    "finetuned clip-level": (lambda: make_finetuned("clip", norm=True), "clip", "finetuned", "clip"),
    "c2f frame-level": (make_c2f_frame, "frame", "c2f-frame", "frame"),
    "c2f as2m": (make_c2f_as2m, "frame", "c2f-as2m", "clip"),
    "atst-sed": (make_atst_sed, "frame", "atst-sed", None),
    "bare encoder": (lambda: tiny("frame"), "frame", "encoder", None),
}


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_every_layout_gives_the_right_encoder(case):
    build, family, layout, head_level = LAYOUT_CASES[case]
    c = convert.convert(build(), num_heads=TINY_HEADS)
    assert c.layout == layout
    assert c.config.family == family
    assert_same_state(c.state_dict, tiny_converted(family))  # the teacher / student / frame encoder, exactly
    assert c.head_level == head_level and (c.head is None) == (head_level is None)
    af.ATSTEncoder(c.config).load_state_dict(c.state_dict, strict=True)


def test_c2f_as2m_takes_the_frame_student_not_the_clip_teacher():
    c = convert.convert(make_c2f_as2m(), num_heads=TINY_HEADS)
    assert c.config.family == "frame" and "cls_token" not in c.state_dict
    assert any("ATST-Clip teacher" in what for what in c.skipped)
    assert torch.equal(c.head["linear.weight"], make_c2f_as2m()["state_dict"]["model.linear.linear.weight"])
    assert set(c.head) == {
        "linear.weight",
        "linear.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    }


def test_pretraining_files_give_the_teacher_and_skip_the_rest_by_rule():
    teacher, student = tiny("frame"), shifted(tiny("frame"), 1.0)
    c = convert.convert(make_lightning_pretrain("frame", teacher=teacher, student=student), num_heads=TINY_HEADS)
    assert torch.equal(c.state_dict["blocks.5.mlp.fc1.bias"], teacher["blocks.5.mlp.fc1.bias"])
    assert not torch.equal(c.state_dict["blocks.5.mlp.fc1.bias"], student["blocks.5.mlp.fc1.bias"])
    student_rule = next(keys for what, keys in c.skipped.items() if "student encoder" in what)
    assert "model.student.encoder.blocks.5.mlp.fc1.bias" in student_rule
    text = c.summary()
    assert "lightning-pretrain" in text and "student predictor" in text and "optimizer_states" in text


def test_atst_sed_skips_sed_head_student_buffers_and_profiler_counters():
    c = convert.convert(make_atst_sed(), num_heads=TINY_HEADS)
    skipped = {k for keys in c.skipped.values() for k in keys}
    assert "sed_teacher.dense.weight" in skipped and "mel_spec.mel_scale.fb" in skipped
    assert "sed_teacher.atst_frame.atst.blocks.0.attn.total_params" in skipped
    assert "sed_student.atst_frame.atst.pos_embed" in skipped
    assert set(c.unread_entries) == {"sed_student", "sed_teacher"}


def test_sed_crnn_dict_without_lightning_container():
    """A bare ``sed_teacher`` CRNN dict (what ATST-SED's stage-2 initialisation reads)."""
    ckpt = {"sed_teacher": make_atst_sed()["sed_teacher"], "sed_student": {}}
    c = convert.convert(ckpt, num_heads=TINY_HEADS)
    assert c.layout == "atst-sed"
    assert_same_state(c.state_dict, tiny_converted("frame"))


def test_heads_are_inferred_from_arch_and_width():
    assert convert.infer_num_heads(384, "small") == 6 and convert.infer_num_heads(768, "base") == 12
    assert convert.infer_num_heads(768, "ast_base") == 12 and convert.infer_num_heads(384, "ast") == 6
    assert convert.infer_num_heads(384) == 6 and convert.infer_num_heads(768) == 12
    with pytest.raises(CheckpointError, match="num_heads"):
        convert.infer_num_heads(48)
    with pytest.raises(CheckpointError, match="num_heads"):
        convert.convert(tiny("frame"))  # 48 wide, no arch: must be told


def test_clip_pooling_chunk_follows_the_recorded_crop_length():
    long_crop = convert.convert(make_lightning_pretrain("clip", hparams={"train_len": 9.0}), num_heads=TINY_HEADS)
    assert long_crop.config.clip_chunk_frames == 901
    assert convert.convert(make_lightning_pretrain("clip"), num_heads=TINY_HEADS).config.clip_chunk_frames == 601
    assert convert.convert(make_dino(args={"anchor_len": [6.0]}), num_heads=TINY_HEADS).config.clip_chunk_frames == 601
    assert convert.convert(make_dino(args={"anchor_len": 4.0}), num_heads=TINY_HEADS).config.clip_chunk_frames == 401


def test_clip_weights_as_frame_on_request():
    c = convert.convert(make_lightning_pretrain("clip"), family="frame", num_heads=TINY_HEADS)
    assert c.config.family == "frame" and "cls_token" not in c.state_dict
    official = tiny("clip")
    assert torch.equal(c.state_dict["norm.weight"], official["norm.weight"])
    assert any("[CLS]" in what for what in c.skipped)
    with pytest.raises(CheckpointError, match="cls_token"):
        convert.convert(make_lightning_pretrain("frame"), family="clip", num_heads=TINY_HEADS)


# ---------------------------------------------------------------------------- broken files are loud


def test_missing_encoder_key_is_named():
    ckpt = make_lightning_pretrain("frame")
    del ckpt["state_dict"]["model.teacher.encoder.blocks.3.mlp.fc1.bias"]
    with pytest.raises(CheckpointError, match=r"model\.teacher\.encoder\.blocks\.3\.mlp\.fc1\.bias"):
        convert.convert(ckpt, num_heads=TINY_HEADS)


def test_misshaped_encoder_key_is_named():
    ckpt = make_lightning_pretrain("clip")
    ckpt["state_dict"]["model.teacher.encoder.blocks.7.attn.proj.weight"] = torch.zeros(48, 47)
    with pytest.raises(CheckpointError, match=r"model\.teacher\.encoder\.blocks\.7\.attn\.proj\.weight.*\(48, 47\)"):
        convert.convert(ckpt, num_heads=TINY_HEADS)


def test_unknown_key_is_named_not_ignored():
    ckpt = make_lightning_pretrain("frame", compact=True)
    ckpt["state_dict"]["model.extra_branch.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"model\.extra_branch\.weight"):
        convert.convert(ckpt, num_heads=TINY_HEADS)
    encoder = dict(tiny("frame"), surprise=torch.zeros(1))
    with pytest.raises(CheckpointError, match="surprise"):
        convert.convert(encoder, num_heads=TINY_HEADS)


def test_broken_head_is_named():
    ckpt = make_finetuned()
    ckpt["state_dict"]["head.linear.weight"] = torch.zeros(N_CLASSES, 47)
    with pytest.raises(CheckpointError, match=r"head\.linear\.weight"):
        convert.convert(ckpt, num_heads=TINY_HEADS)
    ckpt = make_finetuned()
    del ckpt["state_dict"]["head.linear.bias"]
    with pytest.raises(CheckpointError, match=r"head\.linear\.bias"):
        convert.convert(ckpt, num_heads=TINY_HEADS)


def test_not_a_checkpoint():
    with pytest.raises(CheckpointError, match="known layouts"):
        convert.convert({"weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="container"):
        convert.convert({"weights": [1, 2, 3], "note": "hello"})


# ---------------------------------------------------------------------------- files on disk and pickles


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def _as_numpy1_pickle(path: Path) -> None:
    """Rewrite a torch file as NumPy 1.x writes it (``numpy.core`` instead of ``numpy._core``)."""
    with zipfile.ZipFile(path) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for info, data in items:
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
                assert b"numpy.core.multiarray" in data
            z.writestr(info, data)


@pytest.mark.parametrize("numpy1", [False, True])
def test_old_pickles_read_without_running_code(tmp_path, numpy1):
    """NumPy scalars, dtypes, arrays and argparse.Namespace are allowed; nothing else runs."""
    ckpt = make_dino()
    ckpt["args"].lr = np.float32(5e-4)
    ckpt["args"].dtype = np.dtype("float32")
    ckpt["args"].crop = np.array([6.0, 6.0])
    ckpt["epoch"] = np.int64(100)
    path = tmp_path / "base.ckpt"
    torch.save(ckpt, path)
    if numpy1:
        _as_numpy1_pickle(path)
    loaded = weights.read_checkpoint(path)
    assert loaded["args"].pos_type == "cut" and float(loaded["byol_loss"]) == 0.25
    assert_same_state(convert.convert(loaded, num_heads=TINY_HEADS).state_dict, tiny_converted("clip"))

    torch.save({"state_dict": tiny("frame"), "hook": _RunsCode()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="system"):
        weights.read_checkpoint(tmp_path / "evil.ckpt")


def test_legacy_torch_format_is_read(tmp_path):
    """Files written before torch's zip format (not memory-mappable) are read the ordinary way."""
    path = tmp_path / "legacy.ckpt"
    torch.save(make_finetuned(), path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    c = convert.convert(weights.read_checkpoint(path), num_heads=TINY_HEADS)
    assert_same_state(c.state_dict, tiny_converted("frame"))


def test_round_trip_through_files_matches_the_reference_embeddings(tmp_path, reference):
    """Official files on disk -> convert_checkpoint -> load: the official tiny48 outputs."""
    torch.save(make_lightning_pretrain("frame", compact=True), tmp_path / "frame.ckpt")
    torch.save(make_dino(), tmp_path / "clip.ckpt")
    frame = af.load(af.convert_checkpoint(tmp_path / "frame.ckpt", tmp_path / "frame", num_heads=TINY_HEADS))
    clip = af.load(af.convert_checkpoint(tmp_path / "clip.ckpt", tmp_path / "clip", num_heads=TINY_HEADS))
    wav = reference["chirp_3s.wav"]
    got = frame.embed_frames(wav, 16000).embeddings
    torch.testing.assert_close(got, reference["chirp_3s.frame.frames.last12"], atol=1e-4, rtol=0)
    torch.testing.assert_close(clip.embed_clip(wav, 16000), reference["chirp_3s.clip.scene.last12"], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- the convert command


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atst-features")
    cli.add_weights_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_convert_command(tmp_path, capsys):
    torch.save(make_finetuned(), tmp_path / "strong.ckpt")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"/m/{i:04d}" for i in range(N_CLASSES)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert _cli(["convert", str(tmp_path / "strong.ckpt"), str(out), "--num-heads", "3", "--labels", str(labels)]) == 0
    printed = capsys.readouterr().out
    assert "finetuned" in printed and "frame-level" in printed
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        "head.safetensors",
        "labels.json",
        "checksums.json",
    }
    assert json.loads((out / "labels.json").read_text())[1] == "/m/0001"

    bad = make_finetuned()
    del bad["state_dict"]["encoder.encoder.norm_frame.bias"]
    torch.save(bad, tmp_path / "bad.ckpt")
    assert _cli(["convert", str(tmp_path / "bad.ckpt"), str(tmp_path / "bad"), "--num-heads", "3"]) == 1
    assert "encoder.encoder.norm_frame.bias" in capsys.readouterr().err


def test_safetensors_state_dict_io(tmp_path):
    """A bare official encoder stored as safetensors converts like the pickle."""
    src = DATA / "tiny48_clip_weights.safetensors"
    out = af.convert_checkpoint(src, tmp_path / "c", num_heads=TINY_HEADS)
    record = json.loads((out / "checksums.json").read_text())
    assert record["source"]["sha256"] == weights.sha256_file(src) and record["source"]["layout"] == "encoder"
    assert_same_state(load_file(str(out / "model.safetensors")), tiny_converted("clip"))
