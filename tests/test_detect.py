"""Sound events out of the box: PretrainedSED checkpoints, bundled labels, ``detect`` and its CLI.

The checkpoints are synthesized in PretrainedSED's exact layout (random weights): a flat state
dict of ``model.atst.<official keys>``, ``strong_head`` / ``weak_head`` and, optionally, the mel
front end's buffers. A head "forced on" for one class (zero weights, +12 bias for it, -12 for the
rest) must give exactly one event of that class covering the whole file.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from test_download import online, quick_network, server  # noqa: F401 (fixtures)
from test_trust import _restated_log_mel, make_pretrainedsed

import atst_features as af
from atst_features import cli, convert, labelsets
from atst_features.batch import run as batch_run
from atst_features.errors import CheckpointError
from atst_features.model import ATSTConfig
from atst_features.sed import Detection, detect_events

SR = 16000
SPEECH = 353  # line 354 of audioset_strong_447.txt


def _forced_on(ckpt: dict, cls: int, head: str = "strong_head") -> dict:
    """The head gives ~1 for class ``cls`` and ~0 for every other, whatever the audio."""
    ckpt[f"{head}.weight"].zero_()
    ckpt[f"{head}.bias"].fill_(-12.0)
    ckpt[f"{head}.bias"][cls] = 12.0
    return ckpt


def _base_like_checkpoint(depth: int, mel_buffers: bool) -> dict:
    """An ATST-Frame base-width (768-d, 12 heads, no qkv bias) encoder of ``depth`` blocks in
    PretrainedSED's layout, random weights, with the 447-class strong and 527-class weak heads."""
    cfg = ATSTConfig(family="frame", embed_dim=768, depth=depth, num_heads=12, qkv_bias=False)
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for key, shape in convert.expected_shapes(cfg).items():
        norm_weight = key.endswith("weight") and len(shape) == 1
        sd["model.atst." + key] = torch.ones(shape) if norm_weight else 0.02 * torch.randn(shape, generator=gen)
    sd["strong_head.weight"] = 0.05 * torch.randn(447, 768, generator=gen)
    sd["strong_head.bias"] = 0.1 * torch.randn(447, generator=gen)
    sd["weak_head.weight"] = 0.05 * torch.randn(527, 768, generator=gen)
    sd["weak_head.bias"] = 0.1 * torch.randn(527, generator=gen)
    if mel_buffers:
        sd["model.atst_mel.mel_transform.spectrogram.window"] = torch.hann_window(1024)
        sd["model.atst_mel.mel_transform.mel_scale.fb"] = torch.rand(513, 64, generator=gen)
    return sd


def _clip(seconds: float, seed: int = 0) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    noise = torch.randn(t.shape[0], generator=torch.Generator().manual_seed(seed))
    return 0.3 * torch.sin(2 * math.pi * (300 + 200 * t) * t) + 0.05 * noise


# ---------------------------------------------------------------------------- the labels


def test_the_bundled_label_sets_are_the_heads_orders():
    strong = labelsets.label_set("audioset-strong-447")
    weak = labelsets.label_set("audioset-527")
    assert len(strong) == len(set(strong)) == 447 and strong[SPEECH] == "Speech"
    assert strong[0] == "Accelerating, revving, vroom"
    assert len(weak) == 527 and weak[0] == "Speech" and weak[526] == "Field recording"
    with pytest.raises(KeyError, match="audioset-strong-447"):
        labelsets.label_set("audioset-strong-407")


# ---------------------------------------------------------------------------- the file as downloaded


@pytest.mark.slow
@pytest.mark.parametrize("mel_buffers", [True, False], ids=["with-mel-buffers", "without"])
def test_a_pretrainedsed_file_loads_by_path_and_scores_as_restated(tmp_path, mel_buffers):
    ckpt = _base_like_checkpoint(depth=2, mel_buffers=mel_buffers)
    path = tmp_path / "ATST-F_strong_1.pt"
    torch.save(ckpt, path)
    model = af.load(path, depth=2)  # the file as downloaded, by path: no options needed but its depth
    assert model.config.db_clamp == (-50.0, 80.0) and model.config.num_heads == 12
    assert model.head.level == "frame" and model.head.labels[SPEECH] == "Speech" and len(model.head.labels) == 447

    wav = _clip(10.0)
    tags = model.tag(wav, SR)
    # restated: clamped mel -> the encoder's last block, normed -> the file's strong_head -> sigmoid
    mel = _restated_log_mel(wav, (-50.0, 80.0))[None]  # (1, 64, 1001)
    with torch.inference_mode():
        tokens = model.encoder.forward_intermediates(mel, None, [1]).tokens[0, 0]  # (250, 768)
        want = torch.sigmoid(tokens @ ckpt["strong_head.weight"].T + ckpt["strong_head.bias"])
    assert tags.scores.shape == (250, 447) and tags.timestamps.shape == (250,)
    torch.testing.assert_close(tags.scores, want, atol=1e-4, rtol=0)
    assert tags.labels[SPEECH] == "Speech"


def test_the_weak_head_is_kept_on_request_with_the_audioset_labels():
    ckpt = make_pretrainedsed(n_strong=447, n_weak=527)
    c = convert.convert(ckpt, num_heads=3, use_head="weak")
    assert c.head_level == "clip" and torch.equal(c.head["linear.weight"], ckpt["weak_head.weight"])
    assert c.labels[0] == "Speech" and len(c.labels) == 527
    assert c.extra_heads["strong"].labels[SPEECH] == "Speech"
    default = convert.convert(ckpt, num_heads=3)
    assert default.head_level == "frame" and len(default.labels) == 447 and "weak" in default.extra_heads
    with pytest.raises(CheckpointError, match="heads"):
        convert.convert(ckpt, num_heads=3, use_head="medium")


def test_labels_of_another_width_are_not_attached():
    c = convert.convert(make_pretrainedsed(n_strong=7, n_weak=4), num_heads=3)
    assert c.labels is None and c.extra_heads["weak"].labels is None


# ---------------------------------------------------------------------------- a named weak model, downloaded


def _weak_manifest(url: str) -> dict:
    cfg = ATSTConfig(family="frame", embed_dim=48, depth=12, num_heads=3, db_clamp=(-50.0, 80.0)).to_dict()
    return {"models": [{
        "name": "tiny-weak", "family": "frame", "arch": None, "config": cfg,
        "frontend": {"db_clamp": [-50.0, 80.0]},
        "head": {"level": "clip", "num_classes": 527, "norm": False, "use": "weak", "labels": "audioset-527"},
        "source": {"url": url, "page": None, "filename": "ATST-F_weak.pt", "format": "pretrainedsed", "size": None,
                   "sha256": None},
        "hub": {"repo_id": None, "revision": None, "files": {}},
    }]}


def _served(server, tmp_path, ckpt: dict) -> str:
    path = tmp_path / "ATST-F_weak.pt"
    torch.save(ckpt, path)
    server.files["/files/ATST-F_weak.pt"] = path.read_bytes()
    return server.url + "/files/ATST-F_weak.pt"


def test_the_weak_entry_tags_with_audioset_names(server, online, tmp_path):  # noqa: F811
    ckpt = _forced_on(make_pretrainedsed(n_strong=447, n_weak=527), 0, head="weak_head")  # index 0: Speech
    manifest = _weak_manifest(_served(server, tmp_path, ckpt))
    model = af.load("tiny-weak", cache_dir=tmp_path / "cache", manifest=manifest, progress=False)
    assert model.head.level == "clip" and model.head.num_classes == 527
    tags = model.tag(_clip(3.0), SR)
    assert tags.scores.shape == (527,) and tags.top(1)[0][0] == "Speech" and tags.top(1)[0][1] > 0.99
    with pytest.raises(ValueError, match="clip-level head"):
        model.detect(_clip(3.0), SR)


def test_a_weak_head_of_another_width_is_refused(server, online, tmp_path):  # noqa: F811
    manifest = _weak_manifest(_served(server, tmp_path, make_pretrainedsed(n_strong=447, n_weak=4)))
    with pytest.raises(CheckpointError, match="4-class head.*527 classes"):
        af.load("tiny-weak", cache_dir=tmp_path / "cache", manifest=manifest, progress=False)
    assert not (tmp_path / "cache" / "tiny-weak").exists()


# ---------------------------------------------------------------------------- detect()


@pytest.fixture(scope="module")
def forced_dir(tmp_path_factory):
    """A converted tiny PretrainedSED model whose strong head is forced on for "Speech"."""
    root = tmp_path_factory.mktemp("forced")
    torch.save(_forced_on(make_pretrainedsed(n_strong=447, n_weak=527), SPEECH), root / "ATST-F_strong_1.pt")
    return af.convert_checkpoint(root / "ATST-F_strong_1.pt", root / "model", num_heads=3)


def test_a_forced_head_gives_one_event_over_the_whole_file(forced_dir):
    model = af.load(forced_dir)
    events = model.detect(_clip(10.0), SR)
    assert len(events) == 1
    e = events[0]
    assert (e.label, e.onset, e.offset) == ("Speech", 0.0, 10.0) and e.score > 0.99
    # long audio with overlapping windows: one event still, over all of it
    long = model.detect(_clip(23.0), SR, hop_s=5.0)
    assert [(d.label, d.onset, d.offset) for d in long] == [("Speech", 0.0, 23.0)]
    # several inputs and a batch
    many = model.detect([_clip(4.0), _clip(10.0)], SR)
    assert [[(d.label, d.onset, d.offset) for d in ev] for ev in many] == [[("Speech", 0.0, 4.0)], [("Speech", 0.0, 10.0)]]
    assert len(model.detect(torch.stack([_clip(4.0), _clip(4.0, seed=1)]), SR)) == 2


def test_detect_checks_its_settings_before_reading_audio(forced_dir):
    model = af.load(forced_dir)
    for bad in (dict(threshold=1.5), dict(threshold=[0.5] * 3), dict(median_filter=-1.0), dict(threshold={"Nope": 0.5})):
        with pytest.raises(ValueError):
            model.detect("/no/such/file.wav", **bad)
    plain = af.load(forced_dir)
    plain.head = None
    with pytest.raises(ValueError, match="no classification head"):
        plain.detect(_clip(1.0), SR)


def test_events_from_scores_threshold_median_filter_and_peak():
    t = np.arange(10) * 0.04
    scores = np.zeros((10, 2))
    scores[2:6, 1] = [0.6, 0.9, 0.7, 0.6]
    scores[8, 1] = 0.8  # a one-frame blip: kept without a filter, removed by a 3-frame median
    assert detect_events(scores, t, ["a", "b"]) == [Detection(0.08, 0.24, "b", 0.9), Detection(0.32, 0.36, "b", 0.8)]
    assert detect_events(scores, t, ["a", "b"], median_filter=0.12) == [Detection(0.08, 0.24, "b", 0.9)]
    assert detect_events(scores, t, ["a", "b"], threshold={"a": 0.5, "b": 0.85}) == [Detection(0.12, 0.16, "b", 0.9)]


# ---------------------------------------------------------------------------- atst-features detect


def _folder(tmp_path):
    audio = tmp_path / "audio"
    (audio / "sub").mkdir(parents=True)
    sf.write(audio / "a.wav", _clip(10.0).numpy(), SR)
    sf.write(audio / "sub" / "b.flac", _clip(4.0, seed=2).numpy(), SR)
    (audio / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00not audio at all")
    return audio


def test_the_cli_writes_one_event_per_file_and_resumes(forced_dir, tmp_path, capsys):
    audio = _folder(tmp_path)
    out = tmp_path / "events.csv"
    argv = ["detect", str(audio), "--model", str(forced_dir), "--out", str(out), "--no-progress", "--workers", "0"]
    assert cli.main(argv) == 1  # the broken file fails, is reported and skipped
    err = capsys.readouterr().err
    assert "failed: broken.wav" in err and "2 events in 2 files" in err
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["file"], r["onset"], r["offset"], r["label"]) for r in rows] == [
        ("a.wav", "0.000", "10.000", "Speech"), ("sub/b.flac", "0.000", "4.000", "Speech")
    ]
    index = [json.loads(line) for line in (tmp_path / "events.csv.scores" / "index.jsonl").read_text().splitlines()]
    assert {r["path"]: r["status"] for r in index} == {"a.wav": "ok", "broken.wav": "failed", "sub/b.flac": "ok"}
    with np.load(tmp_path / "events.csv.scores" / "a.wav.npz") as z:
        assert z["scores"].shape == (250, 447) and z["timestamps"].shape == (250,) and z["labels"][SPEECH] == "Speech"

    scores_file = tmp_path / "events.csv.scores" / "a.wav.npz"
    before = scores_file.stat().st_mtime_ns
    jsonl = tmp_path / "events.jsonl"
    argv2 = ["detect", str(audio), "--model", str(forced_dir), "--out", str(jsonl), "--scores",
             str(tmp_path / "events.csv.scores"), "--threshold", "0.9", "--no-progress", "--workers", "0"]
    assert cli.main(argv2) == 1
    assert "2 skipped (up to date)" in capsys.readouterr().err  # rescored from the scores, no model pass
    assert scores_file.stat().st_mtime_ns == before
    events = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(e["file"], e["label"], e["onset"], e["offset"]) for e in events] == [
        ("a.wav", "Speech", 0.0, 10.0), ("sub/b.flac", "Speech", 0.0, 4.0)
    ]
    assert set(events[0]) == {"file", "onset", "offset", "label", "score"}


def test_the_cli_prints_a_table_for_one_file(forced_dir, tmp_path, capsys):
    wav = tmp_path / "one.wav"
    sf.write(wav, _clip(10.0).numpy(), SR)
    assert cli.main(["detect", str(wav), "--model", str(forced_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["file", "onset", "offset", "label", "score"]
    assert out[1].split() == ["one.wav", "0.00", "10.00", "Speech", "1.000"] and len(out) == 2


def test_an_interrupted_run_writes_no_table_and_a_rerun_completes(forced_dir, tmp_path, capsys, monkeypatch):
    audio = _folder(tmp_path)
    out = tmp_path / "events.csv"
    out.write_text("an earlier table\n")
    feed = batch_run._feed

    def interrupted(groups, engine, start, done):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch_run, "_feed", interrupted)
    argv = ["detect", str(audio), "--model", str(forced_dir), "--out", str(out), "--no-progress", "--workers", "0"]
    assert cli.main(argv) == 1
    assert "no events written" in capsys.readouterr().err
    assert out.read_text() == "an earlier table\n"  # never half a table, never a table of half the files
    monkeypatch.setattr(batch_run, "_feed", feed)
    assert cli.main(argv) == 1
    assert len(list(csv.DictReader(out.open()))) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_plots_one_png_per_file(forced_dir, tmp_path):
    pytest.importorskip("matplotlib")
    audio = _folder(tmp_path)
    plots = tmp_path / "plots"
    argv = ["detect", str(audio), "--model", str(forced_dir), "--plot", str(plots), "--no-progress", "--workers", "0"]
    assert cli.main(argv) == 1
    pngs = sorted(p.relative_to(plots).as_posix() for p in plots.rglob("*.png"))
    assert pngs == ["a.wav.png", "sub/b.flac.png"]
    assert (plots / "a.wav.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_detect_refuses_a_model_without_a_frame_head(tiny_dirs, tmp_path, capsys):
    wav = tmp_path / "one.wav"
    sf.write(wav, _clip(2.0).numpy(), SR)
    assert cli.main(["detect", str(wav), "--model", str(tiny_dirs["frame"]), "--no-progress"]) == 2
    assert "frame-level head" in capsys.readouterr().err


def test_plots_are_never_written_through_a_link(forced_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    audio = _folder(tmp_path)
    plots, elsewhere = tmp_path / "plots", tmp_path / "elsewhere"
    plots.mkdir()
    elsewhere.mkdir()
    (plots / "sub").symlink_to(elsewhere)
    argv = ["detect", str(audio), "--model", str(forced_dir), "--plot", str(plots), "--no-progress", "--workers", "0"]
    assert cli.main(argv) == 2
    assert "symbolic link" in capsys.readouterr().err and list(elsewhere.iterdir()) == []
