"""Several INPUTs per `embed`, --help of every subcommand, the progress bar in audio seconds,
container files with and without PyAV, and reading a run back (``read_embeddings``, Parquet)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import atst_features as af
from atst_features import audio, batch, cli, weights

SECONDS = {"x/a.wav": 2.0, "x/b.wav": 3.0, "y/c.wav": 1.5, "y/deep/d.flac": 2.5}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = af.ATSTConfig(family="frame", embed_dim=48, depth=2, num_heads=3)
    return weights.save_converted(cfg, af.ATSTEncoder(cfg).state_dict(), tmp_path_factory.mktemp("models") / "frame")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for rel, seconds in SECONDS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, rng.standard_normal(int(seconds * 16000)).astype(np.float32) * 0.05, 16000)
    (root / "y/notes.txt").write_text("not audio")
    return root


def _embed(argv: list[str]) -> int:
    return cli.main(["embed", *argv, "--workers", "0", "--no-progress"])


# ---------------------------------------------------------------------------- several inputs


def test_several_inputs_mirror_their_common_folder(tree, tmp_path):
    found = batch.find_inputs_many([tree / "x/a.wav", tree / "x/b.wav", tree / "y"])
    assert [f.rel for f in found.files] == ["x/a.wav", "x/b.wav", "y/c.wav", "y/deep/d.flac"] and found.ignored == 1
    assert [f.rel for f in batch.find_inputs_many([tree / "x", tree / "y/deep"]).files] == ["x/a.wav", "x/b.wav", "y/deep/d.flac"]
    assert [f.rel for f in batch.find_inputs_many([tree / "x/a.wav", tree / "x/a.wav"]).files] == ["a.wav"]  # once
    assert batch.find_inputs_many([tree / "y"]).files == batch.find_inputs(tree / "y")[0]  # one INPUT: as before
    listing = tmp_path / "l.txt"
    listing.write_text(f"{tree / 'y/c.wav'}\n")
    assert [f.rel for f in batch.find_inputs_many([listing, tree / "x/b.wav"]).files] == ["x/b.wav", "y/c.wav"]
    with pytest.raises(ValueError, match="no INPUT"):
        batch.find_inputs_many([])


def test_inputs_that_would_share_an_output_are_refused(tree, tmp_path, monkeypatch):
    monkeypatch.setattr(batch.discovery, "replace", lambda f, rel: batch.InputFile(f.path, "same.wav", 1, 1))
    with pytest.raises(ValueError, match="would both be written to 'same.wav.npz'"):
        batch.find_inputs_many([tree / "x/a.wav", tree / "x/b.wav"])


def test_stdin_list_and_several_inputs_on_the_command_line(model_dir, tree, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tree)
    monkeypatch.setattr(sys, "stdin", io.StringIO("x/a.wav\ny/c.wav\n"))
    out = tmp_path / "stdin"
    assert _embed(["-", "--out", str(out), "--model", str(model_dir)]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz")) == ["x/a.wav.npz", "y/c.wav.npz"]
    out = tmp_path / "many"
    assert _embed(["x/a.wav", "x/b.wav", "y", "--out", str(out), "--model", str(model_dir)]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npz")) == [f"{r}.npz" for r in sorted(SECONDS)]
    with pytest.raises(SystemExit):  # at least one INPUT
        cli.main(["embed", "--out", str(out)])


# ---------------------------------------------------------------------------- --help


def _subcommands() -> list[str]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("argv", [[], *[[c] for c in _subcommands()], ["train", "frame"]])
def test_help_of_every_subcommand_exits_zero(argv, capsys):
    try:
        status = cli.main([*argv, "--help"])
    except SystemExit as e:  # argparse's --help
        status = e.code
    assert status == 0
    assert "usage:" in capsys.readouterr().out


def test_train_help_is_the_training_commands():
    done = subprocess.run([sys.executable, "-m", "atst_features", "train", "--help"], check=False, capture_output=True, text=True)
    assert done.returncode == 0 and "atst-features train" in done.stdout and "finetune" in done.stdout


# ---------------------------------------------------------------------------- progress in seconds


def test_progress_bar_counts_seconds_of_audio(model_dir, tree, tmp_path, monkeypatch):
    import tqdm.auto

    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "file": io.StringIO()})
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    batch.embed_folder(tree, tmp_path / "out", model=model_dir, workers=0, progress=True)
    (bar,) = bars
    assert bar.total == pytest.approx(sum(SECONDS.values())) and bar.n == pytest.approx(bar.total)


# ---------------------------------------------------------------------------- containers


def test_containers_are_inputs_with_pyav_and_counted_without(tree, tmp_path, monkeypatch, model_dir, capsys):
    root = tmp_path / "in"
    root.mkdir()
    (root / "song.m4a").write_bytes(b"not decoded here")
    (root / "a.wav").write_bytes((tree / "x/a.wav").read_bytes())
    monkeypatch.setattr(audio, "_pyav", lambda: object())
    found = batch.find_inputs_many(root)
    assert [f.rel for f in found.files] == ["a.wav", "song.m4a"] and found.containers == 0

    monkeypatch.setattr(audio, "_pyav", lambda: None)
    found = batch.find_inputs_many(root)
    assert [f.rel for f in found.files] == ["a.wav"] and (found.ignored, found.containers) == (0, 1)
    assert _embed([str(root), "--out", str(tmp_path / "o1"), "--model", str(model_dir)]) == 0  # a.wav embedded
    assert "1 container file" in capsys.readouterr().err
    (root / "a.wav").unlink()
    assert _embed([str(root), "--out", str(tmp_path / "o2"), "--model", str(model_dir)]) == 1  # nothing embedded
    err = capsys.readouterr().err
    assert "1 container file" in err and "pip install 'atst-features[av]'" in err
    with pytest.warns(batch.ContainersSkipped, match="1 container file"):
        batch.embed_folder(root, tmp_path / "o3", model=model_dir, workers=0)


# ---------------------------------------------------------------------------- reading a run back


def test_read_embeddings_clip_and_frames_verified_outputs_only(model_dir, tree, tmp_path):
    out = tmp_path / "out"
    batch.embed_folder(tree, out, model=model_dir, workers=0, shard="0/2")
    batch.embed_folder(tree, out, model=model_dir, workers=0, shard="1/2")  # two index files
    paths, clip = af.read_embeddings(out)
    assert paths == sorted(SECONDS) and clip.dtype == np.float32 and clip.shape == (4, 48 * 2)
    with np.load(out / "y/c.wav.npz") as npz:
        np.testing.assert_array_equal(clip[paths.index("y/c.wav")], npz["clip"])
        frames_c = npz["frames"]
    paths_f, frames = af.read_embeddings(out, what="frames")
    assert paths_f == paths and len(frames) == 4
    got, times = frames[paths.index("y/c.wav")]
    np.testing.assert_array_equal(got, frames_c)
    assert times.shape == (got.shape[0],) and times[1] == pytest.approx(0.04)
    (out / "x/a.wav.npz").write_bytes(b"changed")  # no longer the output its row recorded
    assert af.read_embeddings(out)[0] == ["x/b.wav", "y/c.wav", "y/deep/d.flac"]
    with pytest.raises(ValueError, match="what must be"):
        af.read_embeddings(out, what="both")
    with pytest.raises(FileNotFoundError, match="holds no index"):
        af.read_embeddings(tmp_path)


def test_parquet_table_of_a_run(model_dir, tree, tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    assert _embed([str(tree / "y"), "--out", str(out), "--model", str(model_dir), "--format", "parquet"]) == 0
    table = pq.read_table(out / batch.PARQUET_NAME).to_pydict()
    paths, clip = af.read_embeddings(out)
    assert table["path"] == paths == ["c.wav", "deep/d.flac"]
    np.testing.assert_allclose(np.array(table["clip"], np.float32), clip)
    _, frames = af.read_embeddings(out, "frames")
    np.testing.assert_array_equal(np.array(table["frames"][1], np.float32), frames[1][0].astype(np.float32))
    assert [p.name for p in out.iterdir() if "parquet" in p.name] == [batch.PARQUET_NAME]  # no temporary left
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"atst-features\[parquet\]"):
        batch.to_parquet(out)


def test_package_import_stays_light():
    code = "import sys, atst_features as af; assert callable(af.read_embeddings); assert 'atst_features.batch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
