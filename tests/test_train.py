"""Training: masks, schedules, augmentations, recipes and settings, the data scan, the four commands,
exact resume, export, and DDP on CPU.

Every run uses a tiny encoder (32 dims, 2 blocks, 2 heads), 1 s crops of generated audio and a few steps.
Whether training learns is in ``test_train_learning.py``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
import socket
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.multiprocessing as mp

import atst_features as af
from atst_features import frontend, weights
from atst_features.model import ATSTConfig
from atst_features.train import augment, checkpoint, data, scan
from atst_features.train.__main__ import config_from_args, main
from atst_features.train.config import FAMILY_FIELDS, SUPERVISED_RECIPES, TrainConfig, finalize, merge_for_resume, resolve
from atst_features.train.schedules import Schedule, warmup_cosine
from atst_features.train.tasks import COLLAPSE_STD, FramePretraining, collapse_std, pooled_features
from atst_features.train.trainer import Trainer

pytestmark = [pytest.mark.train, pytest.mark.usefixtures("scan_cache")]

DIMS = ["--embed-dim", "32", "--depth", "2", "--num-heads", "2"]
RUNTIME = ["--batch-size", "4", "--crop-seconds", "1.0", "--num-workers", "0", "--device", "cpu", "--precision", "fp32"]
SETTINGS = [*RUNTIME, "--log-every", "1", "--lr", "0.05"]
TINY = [*DIMS, *SETTINGS]
BYOL = ["--head-hidden", "64", "--head-out", "32", "--mixup-memory", "16", "--ema", "0.9"]
CLASSES = ["bird", "cat", "dog"]


def run(command: str, *args: str) -> int:
    """``main`` with the tiny settings; runs that start from ``--init`` take its architecture."""
    return main([command, *(SETTINGS if "--init" in args else TINY), *args])


def read_log(out: Path) -> list[dict[str, float]]:
    with open(out / "train_log.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def assert_same(a, b, path: str = "") -> None:
    """Recursively equal: tensors bit-identical, everything else ==."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path} keys differ: {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path} lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------- data fixtures


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """Eight 1.2-2.5 s clips: tones in noise, some at 22.05 kHz, one stereo."""
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    for i in range(8):
        sr = 22050 if i % 3 == 0 else 16000
        n = int(sr * rng.uniform(1.2, 2.5))
        t = np.arange(n) / sr
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(n)
        if i == 1:
            x = np.stack([x, 0.5 * x], axis=1)
        sf.write(root / f"clip{i}.wav", x.astype(np.float32), sr)
    return root


@pytest.fixture(scope="module")
def labels_csv(audio_dir) -> Path:
    rows = ["dog", "cat;dog", "bird", "cat", "dog;bird", "cat", "bird", "dog"]
    path = audio_dir / "labels.csv"
    path.write_text("file,labels\n" + "".join(f"clip{i}.wav,{r}\n" for i, r in enumerate(rows)))
    return path


@pytest.fixture(scope="module")
def frame_run(audio_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("frame")
    assert run("frame", "--data", str(audio_dir), "--out", str(out), *BYOL, "--max-steps", "4", "--save-every", "2") == 0
    return out


@pytest.fixture(scope="module")
def clip_run(audio_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip")
    args = ["--positive-seconds", "0.6", "--max-steps", "2", "--save-every", "1", "--gradient-checkpointing"]
    assert run("clip", "--data", str(audio_dir), "--out", str(out), *BYOL, *args) == 0
    return out


@pytest.fixture(scope="module")
def finetune_run(labels_csv, clip_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finetune")
    init = clip_run / "checkpoints" / "step-00000002.pt"
    assert run("finetune", "--data", str(labels_csv), "--out", str(out), "--init", str(init), "--max-steps", "3") == 0
    return out


# ---------------------------------------------------------------------------- pieces


def test_block_mask_statistics_and_spans():
    rng = np.random.default_rng(0)
    for n_tokens in (250, 25):
        mask = augment.block_mask(4000, n_tokens, 0.65, 5, rng)
        assert mask.shape == (4000, n_tokens) and mask.dtype == torch.bool
        achieved = mask.float().mean().item()
        expected = augment.expected_mask_fraction(n_tokens, 0.65, 5)
        assert abs(achieved - expected) < 0.01, (n_tokens, achieved, expected)
        assert not mask[:, -1].any()  # spans start at 0 .. n_tokens - span - 1
        # every masked run is made of whole spans: at least 5 long
        for row in mask[:50].numpy():
            edges = np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0]))
            assert ((edges[1::2] - edges[::2]) >= 5).all()
    # overlapping spans: 32-33 spans of 5 on 250 tokens cover about half, not 65 %
    assert 0.49 < augment.expected_mask_fraction(250, 0.65, 5) < 0.52
    with pytest.raises(ValueError, match="mask spans"):
        augment.block_mask(1, 5, 0.65, 5, rng)


def test_schedules():
    s = Schedule(lr=1.0, min_lr=1e-6, warmup_steps=10, max_steps=100, weight_decay=0.04, weight_decay_end=0.4, ema=0.99)
    lrs = [s.lr_at(i) for i in range(101)]
    assert lrs[0] == 0.0 and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[100] == pytest.approx(1e-6)
    assert s.weight_decay_at(0) == pytest.approx(0.04) and s.weight_decay_at(100) == pytest.approx(0.4)
    assert s.ema_at(0) == pytest.approx(0.99) and s.ema_at(100) == pytest.approx(1.0)
    assert s.ema_at(50) == pytest.approx(0.995)
    assert warmup_cosine(5, 2.0, 0.0, 10, 0) == pytest.approx(1.0)  # no warm-up: cosine from step 0


def test_random_resize_crop():
    rng = np.random.default_rng(1)
    mel = torch.randn(3, 64, 50)
    n_frames = torch.tensor([50, 37, 20])
    mel = mel.masked_fill(torch.arange(50)[None, None, :] >= n_frames[:, None, None], 0.0)
    same = augment.random_resize_crop(mel, n_frames, rng, (1.0, 1.0), (1.0, 1.0), (1.0, 1.0))
    torch.testing.assert_close(same, mel, atol=1e-5, rtol=0)  # crop = everything: identity
    out = augment.random_resize_crop(mel, n_frames, rng)
    assert out.shape == mel.shape and torch.isfinite(out).all()
    assert (out[1, :, 37:] == 0).all() and (out[2, :, 20:] == 0).all()
    assert not torch.allclose(out[0], mel[0])
    freq_only = augment.random_resize_crop(mel, n_frames, rng, (1.0, 1.0), (0.6, 1.5), (1.0, 1.0))
    assert (freq_only[2, :, 20:] == 0).all() and not torch.allclose(freq_only, mel)


def test_mixup_memory():
    rng = np.random.default_rng(2)
    mix = augment.MixupMemory(size=4, ratio=0.4)
    x = torch.randn(2, 64, 30)
    nf = torch.tensor([30, 30])
    assert torch.equal(mix(x, nf, rng), x)  # empty memory: unchanged
    y = torch.randn(2, 64, 30)
    out = mix(y, nf, rng)
    lo, hi = torch.minimum(y, x.amin(0)), torch.maximum(y, x.amax(0))
    assert not torch.equal(out, y)
    # log((1 - l) e^y + l e^z) with z one of the remembered items lies between y and z
    zs = [torch.minimum(y, x[i]) for i in range(2)], [torch.maximum(y, x[i]) for i in range(2)]
    inside = [((out >= a - 1e-5) & (out <= b + 1e-5)).all(dim=(1, 2)) for a, b in zip(*zs)]
    assert bool((inside[0] | inside[1]).all()) and bool(((out >= lo - 1e-5) & (out <= hi + 1e-5)).all())
    # The state is where the ring stands; the rows are rebuilt by replaying the batches that filled them.
    batches = [(torch.randn(3, 64, w), torch.tensor([w, w - 1, 5])) for w in (30, 40, 35)]
    for mel, n in batches:
        mix.remember(mel, n)
    state = mix.state_dict()
    assert state == {"size": 4, "writes": 4 + 9, "width": 40}  # no tensors
    again = augment.MixupMemory(size=4, ratio=0.4)
    again.load_state_dict(state)
    assert again.count == 4 and again.bank is None
    calls = -(-again.rows_needed(3) // 3)  # the last 2 calls of 3 rows refill all 4 rows
    assert calls == 2
    target = again.rewind(calls * 3)
    for mel, n in batches[-calls:]:
        again.remember(mel, n)
    assert again.writes == target and torch.equal(again.bank, mix.bank) and torch.equal(again.lengths, mix.lengths)
    with pytest.raises(ValueError, match="holds 4"):
        augment.MixupMemory(size=8, ratio=0.4).load_state_dict(state)


def test_collapse_quantity():
    """``collapse_std``: about 1 for features spread in all directions, 0 when all rows point one way,
    whatever their scale; the run warns below ``COLLAPSE_STD``."""
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    assert collapse_std(x).item() == pytest.approx(1.0, abs=0.05)
    assert collapse_std(1e3 * x).item() == pytest.approx(collapse_std(x).item(), rel=1e-5)
    one_way = torch.randn(64).repeat(512, 1) * torch.rand(512, 1)  # same direction, any length
    assert collapse_std(one_way).item() < 1e-3 < COLLAPSE_STD == 0.1


def test_crops_do_not_depend_on_workers(audio_dir):
    ds = data.CropDataset(data.list_audio(audio_dir), [data.Crop(1.0), data.Crop(0.5)], seed=3)
    a, b, c = ds[(2, 0)], ds[(2, 0)], ds[(2, 1)]
    assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"]))
    assert not torch.equal(a["crops"][0], c["crops"][0])  # a new epoch draws new crops
    assert a["crops"][0].shape[0] == frontend.SAMPLE_RATE and a["crops"][1].shape[0] == frontend.SAMPLE_RATE // 2
    sampler = data.ResumableSampler(ds, num_replicas=1, rank=0, seed=3, batch_size=2)
    batches = []
    for workers in (0, 2):
        sampler.set_position(epoch=1, batches_done=1)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers, collate_fn=data.collate)
        batches.append(list(loader))
    assert len(batches[0]) == 3  # 4 batches per epoch, one skipped
    for x, y in zip(*batches):
        assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(x["views"], y["views"]))


def test_file_lists(audio_dir, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# training files\n{audio_dir}/clip0.wav\n\nsub/x.flac\n")
    assert data.list_audio(listing) == [audio_dir / "clip0.wav", tmp_path / "sub" / "x.flac"]
    assert len(data.list_audio(audio_dir)) == 8
    with pytest.raises(ValueError, match="no audio files"):
        data.list_audio(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,labels\nx.wav,a\n")
    with pytest.raises(ValueError, match="'file'"):
        data.read_label_csv(bad)


def test_ema_update_formula(tmp_path):
    cfg = resolve(
        TrainConfig(
            command="frame",
            data=str(tmp_path),
            out=str(tmp_path / "out"),
            embed_dim=32,
            depth=2,
            num_heads=2,
            head_hidden=16,
            head_out=8,
            device="cpu",
            crop_seconds=1.0,
        ),
        False,
    )
    enc_cfg = ATSTConfig(family="frame", embed_dim=32, depth=2, num_heads=2)
    task = FramePretraining(cfg, torch.device("cpu"), np.random.default_rng(0), enc_cfg, sync_bn=False)
    with torch.no_grad():
        for p in task.student.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    task.after_step(0, 0.75)
    student = task.student.state_dict()
    for k, v in task.teacher.state_dict().items():
        if "running" in k or "num_batches" in k:
            assert torch.equal(v, before[k])  # batch-norm buffers are not averaged
        else:
            torch.testing.assert_close(v, 0.75 * before[k] + 0.25 * student[k])
    assert not any(p.requires_grad for p in task.teacher.parameters())


# ---------------------------------------------------------------------------- the commands


def test_frame_pretraining(frame_run):
    rows = read_log(frame_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert math.isfinite(r["loss"]) and 0.0 <= r["loss"] <= 4.0
        assert r["std_teacher"] > 0 and r["std_student"] > 0
        assert 0.2 <= r["masked_fraction"] <= 0.8
    assert rows[0]["ema_momentum"] == pytest.approx(0.9) and rows[-1]["ema_momentum"] > rows[0]["ema_momentum"]
    assert rows[0]["weight_decay"] == pytest.approx(0.04)
    # The EMA teacher moves, and stays different from the student.
    ck2 = checkpoint.read(frame_run / "checkpoints" / "step-00000002.pt")
    ck4 = checkpoint.read(frame_run / "checkpoints" / "step-00000004.pt")
    t2, t4 = ck2["modules"]["teacher"], ck4["modules"]["teacher"]
    moved = [k for k in t2 if k.startswith("encoder.") and not torch.equal(t2[k], t4[k])]
    assert len(moved) > 10
    s4 = ck4["modules"]["student"]
    assert not torch.equal(s4["encoder.blocks.0.attn.qkv.weight"], t4["encoder.blocks.0.attn.qkv.weight"])
    assert ck4["step"] == 4 and ck4["command"] == "frame" and ck4["config"]["embed_dim"] == 32
    assert ck4["optimizer"]["param_groups"][0]["eps"] == 1e-6


def test_frame_resume_is_exact(frame_run, tmp_path, capsys):
    """Resuming from step 2 reaches the same step-4 state as the uninterrupted run, bit for bit
    (the mixup memory, not in the checkpoint, is rebuilt from the data stream)."""
    resumed = tmp_path / "resumed"
    ck2 = frame_run / "checkpoints" / "step-00000002.pt"
    assert main(["frame", "--resume", str(ck2), "--out", str(resumed)]) == 0
    err = capsys.readouterr().err
    assert "ATST-Frame 32-d x 2 blocks" in err and "global batch 4 (1 process(es) x 4)" in err and "lr " in err
    assert f"resumed from step 2 of 4 ({ck2}); mixup memory rebuilt from the last 2 steps' data" in err
    assert "frame: 100%" in err  # the progress bar
    a = checkpoint.read(frame_run / "checkpoints" / "step-00000004.pt")
    b = checkpoint.read(resumed / "checkpoints" / "step-00000004.pt")
    assert b["config"]["out"] == str(resumed)
    for key in ("modules", "optimizer", "schedule", "rank_states", "encoder_state_dict", "step"):
        assert_same(a[key], b[key], key)
    assert [r["step"] for r in read_log(resumed)] == [3, 4]
    assert [r["loss"] for r in read_log(resumed)] == [r["loss"] for r in read_log(frame_run)][2:]


def test_checkpoints_hold_no_mixup_memory(frame_run, clip_run):
    """Per process a checkpoint keeps RNG states and three integers, whatever the memory's size."""
    for run_dir, writes in ((frame_run, 4 * 4), (clip_run, 2 * 2 * 4)):
        ck = checkpoint.read(checkpoint.latest_checkpoint(run_dir))
        (state,) = ck["rank_states"]
        assert state["mixup"] == {"size": 16, "writes": writes, "width": state["mixup"]["width"]}
        rng_bytes = sum(t.numel() * t.element_size() for t in state["rng"].values() if isinstance(t, torch.Tensor))
        assert rng_bytes < 10_000


def test_clip_resume_is_exact(clip_run, tmp_path):
    """ATST-Clip remembers both views of a step; the rebuilt memory continues the run bit for bit."""
    resumed = tmp_path / "resumed"
    assert main(["clip", "--resume", str(clip_run / "checkpoints" / "step-00000001.pt"), "--out", str(resumed)]) == 0
    a = checkpoint.read(clip_run / "checkpoints" / "step-00000002.pt")
    b = checkpoint.read(resumed / "checkpoints" / "step-00000002.pt")
    for key in ("modules", "optimizer", "rank_states", "encoder_state_dict"):
        assert_same(a[key], b[key], key)


def test_resume_refuses_to_change_the_math(frame_run):
    saved = TrainConfig.from_dict(checkpoint.read(frame_run / "checkpoints" / "step-00000002.pt")["config"])
    assert merge_for_resume(saved, {"num_workers": 3}).num_workers == 3
    with pytest.raises(ValueError, match="lr"):
        merge_for_resume(saved, {"lr": 1.0})
    assert main(["clip", "--resume", str(frame_run / "checkpoints" / "step-00000002.pt")]) != 0


def test_frame_checkpoint_loads_for_inference(frame_run):
    ck = checkpoint.read(frame_run / "checkpoints" / "step-00000004.pt")
    assert ck["encoder_config"]["family"] == "frame" and ck["encoder_config"]["drop_path_rate"] == 0.0
    model = af.load(frame_run / "export")  # config.json + model.safetensors, as `convert` writes them
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, ck["encoder_state_dict"][k])
    assert_same(
        ck["encoder_state_dict"],
        {k.removeprefix("encoder."): v for k, v in ck["modules"]["teacher"].items() if k.startswith("encoder.")},
    )
    direct = weights.build(ATSTConfig.from_dict(ck["encoder_config"]), ck["encoder_state_dict"])
    wav = np.random.default_rng(4).standard_normal(24000).astype(np.float32) * 0.1
    frames = model.embed_frames(wav, 16000)
    assert frames.embeddings.shape == (len(frames), 2 * 32) and torch.isfinite(frames.embeddings).all()
    torch.testing.assert_close(direct.embed_frames(wav, 16000).embeddings, frames.embeddings)
    assert weights.read_checkpoint(frame_run / "checkpoints" / "step-00000004.pt")["format"] == checkpoint.FORMAT
    from_ckpt = af.load(frame_run / "checkpoints" / "step-00000004.pt")  # the training checkpoint itself
    torch.testing.assert_close(from_ckpt.embed_frames(wav, 16000).embeddings, frames.embeddings)
    assert json.loads((frame_run / "export" / "training.json").read_text())["step"] == 4


def test_bf16_step_is_finite(audio_dir, tmp_path):
    args = ["--data", str(audio_dir), "--out", str(tmp_path), *BYOL, "--max-steps", "1", "--precision", "bf16"]
    assert main(["frame", *[a for a in TINY if a not in ("--precision", "fp32")], *args]) == 0
    assert math.isfinite(read_log(tmp_path)[0]["loss"])


def test_gradient_checkpointing_changes_nothing(audio_dir, tmp_path):
    states = []
    for extra in ([], ["--gradient-checkpointing"]):
        out = tmp_path / str(len(extra))
        assert run("frame", "--data", str(audio_dir), "--out", str(out), *BYOL, "--max-steps", "1", *extra) == 0
        states.append(checkpoint.read(out / "checkpoints" / "step-00000001.pt")["modules"])
    assert_same(states[0], states[1])


def test_tensorboard_events(audio_dir, tmp_path):
    pytest.importorskip("tensorboard")
    assert run("frame", "--data", str(audio_dir), "--out", str(tmp_path), *BYOL, "--max-steps", "1", "--tensorboard") == 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_clip_pretraining(clip_run):
    rows = read_log(clip_run)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    ck1 = checkpoint.read(clip_run / "checkpoints" / "step-00000001.pt")
    ck2 = checkpoint.read(clip_run / "checkpoints" / "step-00000002.pt")
    assert not torch.equal(ck1["modules"]["teacher"]["encoder.cls_token"], ck2["modules"]["teacher"]["encoder.cls_token"])
    assert torch.equal(ck1["modules"]["student"]["encoder.mask_embed"], ck2["modules"]["student"]["encoder.mask_embed"])
    model = af.load(clip_run / "export")
    assert model.config.family == "clip"
    vec = model.embed_clip(np.zeros(16000, np.float32) + 0.01, 16000, layers="last")
    assert vec.shape == (64,) and torch.isfinite(vec).all()


def test_finetune_multilabel_and_export(finetune_run, labels_csv):
    rows = read_log(finetune_run)
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    ck = checkpoint.read(finetune_run / "checkpoints" / "step-00000003.pt")
    assert ck["head"] == {"classes": CLASSES, "multilabel": True}
    groups = ck["optimizer"]["param_groups"]
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx(sorted({1.0, 0.75, 0.75**2}))  # depth 2
    model = af.load(finetune_run / "export")
    assert model.head is not None and model.head.labels == CLASSES
    # The exported head reads what embed_clip(layers="last") gives, exactly what it was trained on.
    wav = np.random.default_rng(5).standard_normal(20000).astype(np.float32) * 0.1
    mel, n_frames = frontend.log_mel(torch.from_numpy(wav)[None])
    with torch.no_grad():
        trained_on = pooled_features(model.encoder.eval(), mel, n_frames)[0]
    torch.testing.assert_close(model.embed_clip(wav, 16000, layers="last"), trained_on, atol=1e-5, rtol=1e-5)


def test_finetune_single_label(audio_dir, tmp_path):
    csv_path = tmp_path / "single.csv"
    csv_path.write_text("file,labels\n" + "".join(f"{audio_dir}/clip{i}.wav,{CLASSES[i % 3]}\n" for i in range(8)))
    args = ["--data", str(csv_path), "--out", str(tmp_path / "run"), "--max-steps", "2", "--family", "frame"]
    assert run("finetune", *args) == 0
    assert all(math.isfinite(r["loss"]) for r in read_log(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "export" / "training.json").read_text())["multilabel"] is False
    # with mixup on (the recipes), single-label training uses binary cross-entropy, as the reference
    assert checkpoint.read(tmp_path / "run" / "checkpoints" / "step-00000002.pt")["config"]["loss"] == "bce"
    assert af.load(tmp_path / "run" / "export").config.family == "frame"


def test_c2f_distillation(frame_run, finetune_run, labels_csv, tmp_path):
    out = tmp_path / "c2f"
    teacher = finetune_run / "export"
    args = ["--data", str(labels_csv), "--out", str(out), "--init", str(frame_run / "export"), "--teacher", str(teacher)]
    assert run("c2f", *args, "--max-steps", "2", "--distill-weight", "0.7") == 0
    rows = read_log(out)
    for r in rows:
        assert math.isfinite(r["loss"])
        assert r["loss"] == pytest.approx(0.7 * r["loss_distill"] + 0.3 * r["loss_label"], rel=1e-5)
    ck = checkpoint.read(out / "checkpoints" / "step-00000002.pt")
    tuned = af.load(teacher)
    frozen = ck["modules"]["teacher"]
    for k, v in tuned.encoder.state_dict().items():
        assert torch.equal(frozen[f"encoder.{k}"], v)  # the teacher never changes (eval mode, no grad)
    for k, v in tuned.head.state_dict().items():
        assert torch.equal(frozen[f"head.{k}"], v)
    init = af.load(frame_run / "export").encoder.state_dict()
    assert not torch.equal(ck["encoder_state_dict"]["blocks.1.mlp.fc2.weight"], init["blocks.1.mlp.fc2.weight"])
    student = af.load(out / "export")
    assert student.config.family == "frame" and student.head.labels == CLASSES
    # distillation only (lambda = 1) needs no labels: a folder of audio is enough; lambda < 1 needs them
    unlabelled = [
        "--data",
        str(labels_csv.parent),
        "--init",
        str(frame_run / "export"),
        "--teacher",
        str(teacher),
        "--max-steps",
        "1",
    ]
    assert run("c2f", *unlabelled, "--out", str(tmp_path / "d1"), "--distill-weight", "1") == 0
    assert "loss_label" not in read_log(tmp_path / "d1")[0]
    assert run("c2f", *unlabelled, "--out", str(tmp_path / "d2"), "--distill-weight", "0.5") == 2


def test_bad_settings_are_reported(audio_dir, tmp_path, capsys):
    assert run("finetune", "--data", str(audio_dir), "--out", str(tmp_path)) == 2
    assert "CSV" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config_from_args(["frame", "--out", str(tmp_path)])  # no --data
    assert main(["finetune", "--data", "x.csv", "--out", str(tmp_path), "--init", "m", "--arch", "small"]) == 2
    assert "--init sets the architecture" in capsys.readouterr().err
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    fresh = tmp_path / "fresh"
    data_args = ["--data", str(audio_dir)]
    cases = [
        (["--crop-seconds", "12"], "at most 250"),
        (["--crop-seconds", "0.1"], "at least 6 are needed"),  # more patches than one mask span
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--lr", "nan"], "--lr must be a finite number"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--ema", "1.5"], "--ema must be in (0, 1)"),
        (["--out", str(a_file)], "is a file"),
        (["--out", str(a_file / "sub")], "cannot be created"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
        (["--init", str(tmp_path / "missing")], "--init"),
    ]
    for extra, message in cases:
        argv = ["frame", *TINY, *data_args, "--out", str(fresh), *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
        assert not fresh.exists()  # refused before anything was written or built
    both = ["finetune", *TINY, "--data", str(audio_dir / "labels.csv"), "--out", str(fresh), "--epochs", "2", "--max-steps", "3"]
    assert main(both) == 2 and "not both" in capsys.readouterr().err
    assert main(["frame", *TINY, *data_args, "--out", str(fresh), "--max-steps", "0"]) == 2
    assert "--max-steps must be >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------- recipes


def test_supervised_recipes_follow_the_official_scripts():
    for (command, family, name), r in SUPERVISED_RECIPES.items():
        assert 0.5 <= r.lr <= 3.0 and r.optimizer == "sgd" and r.layer_decay == 0.75 and r.loss == "bce"
        assert 0 < r.warmup_epochs < r.epochs and 0 < r.mixup_prob <= 1 and r.clip_grad == 3.0 and r.source
        assert (r.distill_weight is not None) == (command == "c2f")
        twin = SUPERVISED_RECIPES.get((command, "frame" if family == "clip" else "clip", name))
        if twin is not None:  # only FAMILY_FIELDS differ between the families
            for f in fields(r):
                if f.name not in (*FAMILY_FIELDS, "source"):
                    assert getattr(r, f.name) == getattr(twin, f.name), (command, name, f.name)
    r = SUPERVISED_RECIPES[("finetune", "clip", "audioset")]
    assert (r.lr, r.epochs, r.warmup_epochs, r.batch_size) == (0.5, 10, 2, 128)


def test_recipes_become_steps_and_losses(labels_csv, tmp_path):
    def resolved(command="finetune", **kw) -> TrainConfig:
        paths = {"init": str(labels_csv), "teacher": str(labels_csv)} if command == "c2f" else {}
        return resolve(TrainConfig(command=command, data=str(labels_csv), out=str(tmp_path / "o"), **paths, **kw), False)

    cfg = resolved()
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.recipe) == (0.5, 128, 10, None, "audioset")
    done = finalize(cfg, "clip", batches_per_epoch=7, multilabel=False)
    assert (done.max_steps, done.warmup_steps, done.loss, done.mixup_alpha) == (70, 14, "bce", 10.0)
    assert finalize(done, "clip", 7, False) == done  # a complete config (a resumed one) stays as it is
    assert finalize(resolved(family="frame"), "frame", 7, False).max_steps == 77  # 11 epochs for ATST-Frame
    by_steps = finalize(resolved(max_steps=50), "clip", 7, False)
    assert (by_steps.max_steps, by_steps.warmup_steps, by_steps.epochs) == (50, 10, None)  # the recipe's 2/10 warm-up
    small = finalize(resolved(recipe="as20k"), "clip", 3, False)
    assert (small.lr, small.max_steps, small.warmup_steps, small.mixup_prob, small.mixup_alpha) == (1.0, 600, 15, 1.0, 0.5)
    c2f = finalize(resolved("c2f"), "frame", 2, True)
    assert (c2f.lr, c2f.batch_size, c2f.distill_weight, c2f.max_steps) == (0.5, 320, 1.0, 22)
    assert finalize(resolved("c2f", recipe="as20k"), "frame", 2, True).distill_weight == 0.5
    # the reference's loss rule: cross-entropy only for single-label data without mixup
    assert finalize(resolved(mixup_prob=0.0), "clip", 7, False).loss == "ce"
    assert finalize(resolved(mixup_prob=0.0), "clip", 7, True).loss == "bce"
    assert finalize(resolved(loss="ce"), "clip", 7, False).loss == "ce"
    # single-label C2F: cross-entropy with or without mixup (the reference's code for other tasks)
    assert finalize(resolved("c2f"), "frame", 2, False).loss == "ce" and finalize(resolved("c2f"), "frame", 2, True).loss == "bce"
    with pytest.raises(ValueError, match="single-label"):
        finalize(resolved(loss="ce"), "clip", 7, True)
    with pytest.raises(ValueError, match="not both"):
        resolved(epochs=3.0, max_steps=10)
    with pytest.raises(ValueError, match="ATST-clip, but the encoder is ATST-frame"):
        finalize(resolved(family="clip"), "frame", 7, False)


# ---------------------------------------------------------------------------- the data scan


def _corpus_with_bad_files(audio_dir: Path, root: Path) -> Path:
    """The eight good clips plus an empty file, a non-audio file, a 6 ms clip and a clip with no samples."""
    root.mkdir()
    for f in sorted(audio_dir.glob("clip*.wav")):
        shutil.copy(f, root / f.name)
    (root / "empty.wav").write_bytes(b"")
    (root / "garbage.wav").write_bytes(b"not audio " * 50)
    sf.write(root / "short.wav", np.zeros(100, np.float32), 16000)
    sf.write(root / "silent.wav", np.zeros(0, np.float32), 16000)  # a header, no samples
    return root


def test_data_scan_skips_unusable_files(audio_dir, tmp_path, capsys, scan_cache):
    root = _corpus_with_bad_files(audio_dir, tmp_path / "data")
    args = ["--data", str(root), *BYOL, "--max-steps", "1"]
    assert run("frame", *args, "--out", str(tmp_path / "a")) == 0
    err = capsys.readouterr().err
    assert "data: 8 of 12 files usable; 4 skipped (unreadable, empty or too short, listed in" in err
    with open(tmp_path / "a" / scan.REPORT_NAME, newline="") as f:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(f)}
    assert set(rows) == {"empty.wav", "garbage.wav", "short.wav", "silent.wav"}
    assert rows["empty.wav"]["reason"] == "empty: 0 bytes" and rows["silent.wav"]["reason"] == "empty: no samples"
    assert rows["garbage.wav"]["reason"].startswith("unreadable") and rows["short.wav"]["reason"].startswith("too short")
    assert {r["when"] for r in rows.values()} == {"scan"}
    # cached per corpus: the second run reads no header again, and --strict-data refuses the data
    assert scan.cache_path(root).is_file() and scan.cache_path(root).is_relative_to(scan_cache)
    assert run("frame", *args, "--out", str(tmp_path / "b"), "--strict-data") == 2
    err = capsys.readouterr().err
    assert "(12 from the scan cache)" in err and "4 training files are unusable" in err
    assert not (tmp_path / "b" / "checkpoints").exists()
    # a changed file is probed again
    shutil.copy(root / "clip0.wav", root / "garbage.wav")
    result = scan.scan(data.list_audio(root), str(root), workers=2)
    assert result.cached == 11 and len(result.problems) == 3


def test_file_failing_later_is_skipped(audio_dir, tmp_path, capsys):
    """A file that breaks after the scan is replaced by the next one, counted and reported; the run goes on."""
    root = tmp_path / "data"
    shutil.copytree(audio_dir, root, ignore=shutil.ignore_patterns("*.csv"))
    cfg, saved = config_from_args(["frame", *TINY, *BYOL, "--data", str(root), "--out", str(tmp_path / "run"), "--max-steps", "2"])
    trainer = Trainer(cfg, saved)
    (root / "clip3.wav").write_bytes(b"the disk changed")
    try:
        trainer.fit()
    finally:
        trainer.close()
    rows = read_log(tmp_path / "run")
    assert rows[-1]["skipped_files"] == 1 and all(math.isfinite(r["loss"]) for r in rows)
    report = (tmp_path / "run" / scan.REPORT_NAME).read_text().splitlines()
    assert len(report) == 2 and "clip3.wav" in report[1] and report[1].endswith(("step 1", "step 2"))
    assert "warning: skipped" in capsys.readouterr().err
    ds = data.CropDataset(data.list_audio(root), [data.Crop(1.0)], seed=0)
    item = ds[(3, 0)]
    assert [Path(p).name for p, _ in item["skipped"]] == ["clip3.wav"]
    assert torch.equal(item["crops"][0], ds[(4, 0)]["crops"][0])  # the next file took its place, same crop


# ---------------------------------------------------------------------------- DDP on CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, argv: list[str], dump: str) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    cfg, saved = config_from_args(argv)
    trainer = Trainer(cfg, saved)
    try:
        trainer.fit()
        torch.save({k: m.state_dict() for k, m in trainer.task.modules().items()}, f"{dump}/rank{rank}.pt")
    finally:
        trainer.close()


@pytest.mark.slow
def test_ddp_two_processes_gloo(audio_dir, tmp_path):
    out = tmp_path / "ddp"
    argv = [
        "frame",
        *TINY,
        *BYOL,
        "--data",
        str(audio_dir),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--save-every",
        "0",
    ]
    mp.spawn(_ddp_worker, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for name in ("student", "teacher"):
        for k, v in r0[name].items():
            if "running_" in k or "num_batches" in k:
                continue  # teacher batch-norm statistics are per process on CPU (SyncBatchNorm needs CUDA)
            assert torch.equal(v, r1[name][k]), f"{name}.{k} differs between ranks"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003.pt"]
    ck = checkpoint.read(out / "checkpoints" / "step-00000003.pt")
    assert ck["world_size"] == 2 and len(ck["rank_states"]) == 2
    assert [s["mixup"]["writes"] for s in ck["rank_states"]] == [6, 6]  # no memory rows in the checkpoint
    assert not torch.equal(ck["rank_states"][0]["rng"]["torch"], ck["rank_states"][1]["rng"]["torch"])
    assert_same(ck["modules"]["student"], r0["student"])
    rows = read_log(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    # lr is scaled by the global batch: 0.05 * (2 processes * 2) / 256 at step 0 (no warm-up with 3 steps)
    assert rows[0]["lr"] == pytest.approx(0.05 * 4 / 256)


def test_atst_features_cli_forwards_to_training(audio_dir, tmp_path, capsys):
    from atst_features.cli import main as cli_main

    assert cli_main(["train", "finetune", "--data", str(audio_dir), "--out", str(tmp_path)]) == 2
    assert "CSV" in capsys.readouterr().err
