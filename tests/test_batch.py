"""Folder embedding (``atst_features.batch`` and ``atst-features embed``) on generated folders."""

from __future__ import annotations

import errno
import io
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import atst_features as af
from atst_features import audio, batch, cli, frontend, pieces, weights
from atst_features.train import data as train_data

FAMILIES = ("frame", "clip")
AUDIO = {  # relative path -> (seconds, sample rate, channels, soundfile subtype)
    "a.wav": (3.0, 16000, 1, "PCM_16"),
    "sub/b.wav": (12.5, 44100, 2, "FLOAT"),  # two 1001-frame chunks
    "sub/c.flac": (5.0, 22050, 1, "PCM_24"),
    "sub/deep/d.ogg": (4.0, 48000, 2, "VORBIS"),
    "sub/deep/e.wav": (0.5, 8000, 1, "FLOAT"),
}
BAD = {"corrupt.wav": b"RIFF\x10\x00\x00\x00WAVEfmt not really a wave file" * 4, "empty.flac": b""}
NOT_AUDIO = ["notes.txt", "sub/cover.jpg", ".hidden.wav"]


def _noise(seconds: float, sr: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((int(seconds * sr), channels)).astype(np.float32) * 0.05
    x[: x.shape[0] // 3] *= 0.01  # a quiet stretch, so the 80 dB floor matters
    return x


def _write_corpus(root: Path) -> Path:
    for k, (rel, (seconds, sr, ch, subtype)) in enumerate(AUDIO.items()):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, _noise(seconds, sr, ch, k), sr, subtype=subtype)
    for rel, data in BAD.items():
        (root / rel).write_bytes(data)
    for rel in NOT_AUDIO:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("not audio")
    return root


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models of both families, saved as converted directories (what --model DIR loads)."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    dirs = {}
    for family in FAMILIES:
        cfg = af.ATSTConfig(family=family, embed_dim=48, depth=2, num_heads=3)
        dirs[family] = weights.save_converted(cfg, af.ATSTEncoder(cfg).state_dict(), root / family)
    return dirs


@pytest.fixture(scope="module")
def models(model_dirs) -> dict[str, af.ATSTModel]:
    return {family: af.load(d) for family, d in model_dirs.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


def _cli(argv: list[str]) -> int:
    """Run ``atst-features embed ARGV`` through the command line's argparse layer."""
    return cli.main(["embed", *argv])


def _mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*.npz")}


def _index(out: Path, name: str = batch.INDEX_NAME) -> dict[str, dict]:
    return {row["path"]: row for row in map(json.loads, (out / name).read_text().splitlines())}


# ---------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_equal_the_in_memory_api(family, model_dirs, models, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    status = _cli([str(corpus), "--out", str(out), "--model", str(model_dirs[family]), "--frames-dtype", "float32",
                   "--frame-layers", "1,0", "--workers", "1", "--no-progress"])
    assert status == 1  # the corrupt and the empty file failed
    err = capsys.readouterr().err
    assert all(f"failed: {rel}" in err for rel in BAD) and f"{len(NOT_AUDIO)} ignored" in err
    model = models[family]
    for rel in AUDIO:
        z = np.load(out / f"{rel}.npz")
        assert sorted(z.files) == ["clip", "frames", "timestamps"]
        clip = model.embed_clip(str(corpus / rel))
        frames = model.embed_frames(str(corpus / rel), layers=[1, 0])
        assert z["clip"].dtype == np.float32 and z["frames"].dtype == np.float32 and z["timestamps"].dtype == np.float64
        np.testing.assert_allclose(z["clip"], clip.numpy(), atol=1e-5)
        np.testing.assert_allclose(z["frames"], frames.embeddings.numpy(), atol=1e-5)
        np.testing.assert_array_equal(z["timestamps"], frames.timestamps.numpy())

    index = _index(out)
    assert set(index) == set(AUDIO) | set(BAD)
    for rel, (seconds, sr, ch, _) in AUDIO.items():
        row = index[rel]
        assert row["status"] == "ok" and row["error"] is None and row["output"] == f"{rel}.npz"
        assert (row["sample_rate"], row["channels"]) == (sr, ch)
        assert row["duration"] == pytest.approx(seconds, abs=1e-3)
        assert row["n_frames"] == np.load(out / row["output"])["frames"].shape[0]
    for rel in BAD:
        assert index[rel]["status"] == "failed" and "cannot decode" in index[rel]["error"]
        assert not (out / f"{rel}.npz").exists()
    assert not list(out.rglob("*.partial"))

    meta = json.loads((out / batch.METADATA_NAME).read_text())
    assert meta["model"] == str(model_dirs[family]) and meta["source"] == str(model_dirs[family])
    assert meta["weights_sha256"] == weights.sha256_file(model_dirs[family] / weights.WEIGHTS_NAME)
    assert (meta["clip_layers"], meta["frame_layers"]) == ([0, 1], [1, 0])
    assert meta["compute_dtype"] == "float32" and meta["package_version"] == af.__version__


def test_summary_lists_failures(model_dirs, corpus, tmp_path):
    summary = batch.embed_folder(corpus, tmp_path / "out", model=model_dirs["frame"], workers=0)
    assert (summary.ok, summary.failed, summary.skipped, summary.ignored) == (len(AUDIO), len(BAD), 0, len(NOT_AUDIO))
    assert sorted(rel for rel, _ in summary.failures) == sorted(BAD)
    assert summary.exit_status == 1
    assert summary.audio_seconds == pytest.approx(sum(v[0] for v in AUDIO.values()), abs=1e-2)
    assert f"{len(AUDIO)} embedded" in str(summary) and f"{len(BAD)} failed" in str(summary)


def test_default_sizes_and_dtypes(model_dirs, models, corpus, tmp_path):
    """Defaults: clip vector of all blocks in float32, frames of the last block in float16."""
    out = tmp_path / "out"
    batch.embed_folder(corpus, out, model=model_dirs["frame"], workers=0)
    model = models["frame"]
    z = np.load(out / "sub/b.wav.npz")
    assert z["clip"].shape == (model.clip_dim("all"),) and z["clip"].dtype == np.float32
    assert z["frames"].shape == (312, model.frame_dim("last")) and z["frames"].dtype == np.float16
    ref = model.embed_frames(str(corpus / "sub/b.wav"), layers="last").embeddings.numpy()
    np.testing.assert_allclose(z["frames"].astype(np.float32), ref, atol=2e-3, rtol=2e-3)


def test_what_clip_only(model_dirs, corpus, tmp_path):
    out = tmp_path / "out"
    batch.embed_folder(corpus, out, model=model_dirs["clip"], what="clip", workers=0)
    assert np.load(out / "a.wav.npz").files == ["clip"]
    assert _index(out)["a.wav"]["n_frames"] is None


# ---------------------------------------------------------------------------- resuming


def test_rerun_rewrites_nothing_and_redoes_what_changed(model_dirs, corpus, tmp_path):
    src = _write_corpus(tmp_path / "src")
    out = tmp_path / "out"
    first = batch.embed_folder(src, out, model=model_dirs["frame"], workers=0)
    before = _mtimes(out)
    assert len(before) == len(AUDIO)

    again = batch.embed_folder(src, out, model=model_dirs["frame"], workers=0)
    assert (again.ok, again.skipped, again.failed) == (0, len(AUDIO), len(BAD))  # failures are retried
    assert _mtimes(out) == before
    assert {r["status"] for p, r in _index(out).items() if p in AUDIO} == {"skipped"}

    time.sleep(0.01)
    sf.write(src / "a.wav", _noise(2.0, 16000, 1, 99), 16000)  # changed source
    changed = batch.embed_folder(src, out, model=model_dirs["frame"], workers=0)
    assert (changed.ok, changed.skipped) == (1, len(AUDIO) - 1)
    after = _mtimes(out)
    assert after["a.wav.npz"] != before["a.wav.npz"]
    assert {k: v for k, v in after.items() if k != "a.wav.npz"} == {k: v for k, v in before.items() if k != "a.wav.npz"}

    other = batch.embed_folder(src, out, model=model_dirs["frame"], frame_layers="all", workers=0)  # new settings
    assert (other.ok, other.skipped) == (len(AUDIO), 0)
    assert first.exit_status == other.exit_status == 1


@pytest.mark.slow  # a subprocess run, killed and resumed
def test_killed_run_leaves_complete_outputs_and_resumes(model_dirs, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    n_files = 30
    for i in range(n_files):
        sf.write(src / f"f{i:02d}.wav", _noise(1.0, 16000, 1, i), 16000)
    out = tmp_path / "out"
    runner = tmp_path / "runner.py"
    runner.write_text(textwrap.dedent(
        """
        import sys, time
        from atst_features import cli
        from atst_features.model import ATSTEncoder

        forward = ATSTEncoder.forward_intermediates
        def slow_forward(self, *args, **kwargs):  # make the run last long enough to be killed
            time.sleep(0.1)
            return forward(self, *args, **kwargs)
        ATSTEncoder.forward_intermediates = slow_forward

        sys.exit(cli.main(["embed", *sys.argv[1:]]))
        """
    ))
    argv = [str(src), "--out", str(out), "--model", str(model_dirs["frame"]), "--batch-size", "1", "--workers", "1",
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, str(runner), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(list(out.rglob("*.npz"))) < 5 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = sorted(out.rglob("*.npz"))
    assert 5 <= len(done) < n_files, "the run was not killed mid-way"
    for path in done:  # every output present is complete
        z = np.load(path)
        assert z["frames"].shape == (25, 48) and z["clip"].shape == (96,) and z["timestamps"].shape == (25,)
    before = _mtimes(out)

    summary = batch.embed_folder(src, out, model=model_dirs["frame"], workers=0)
    assert summary.failed == 0 and summary.ok + summary.skipped == n_files
    assert summary.skipped >= len(done) - 1  # at most the file being indexed when killed is redone
    after = _mtimes(out)
    assert len(after) == n_files and not list(out.rglob("*.partial"))
    assert sum(after[k] == v for k, v in before.items()) == summary.skipped
    assert {r["status"] for r in _index(out).values()} <= {"ok", "skipped"}


def test_full_disk_stops_the_run_and_a_rerun_completes(model_dirs, corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_write = batch.NpzSink.write_frames  # the folder run's writer: every frame row goes through it
    calls = []

    def failing_write(self, rows):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, rows)

    monkeypatch.setattr(batch.NpzSink, "write_frames", failing_write)
    summary = batch.embed_folder(corpus, out, model=model_dirs["frame"], workers=0, batch_size=1)
    assert summary.aborted and "disk full" in summary.aborted and summary.exit_status == 1
    assert summary.ok < len(AUDIO) and not list(out.rglob("*.partial"))
    for path in out.rglob("*.npz"):
        np.load(path)["frames"]
    monkeypatch.setattr(batch.NpzSink, "write_frames", real_write)
    rerun = batch.embed_folder(corpus, out, model=model_dirs["frame"], workers=0)
    assert rerun.ok + rerun.skipped == len(AUDIO) and rerun.skipped == summary.ok and rerun.aborted is None


# ---------------------------------------------------------------------------- long files in bounded memory


def _long_corpus(root: Path) -> Path:
    root.mkdir()
    rng = np.random.default_rng(5)
    for name, seconds, sr, ch in (("l44.wav", 35.3, 44100, 2), ("l16.flac", 30.03, 16000, 1), ("l16b.wav", 20.02, 16000, 1)):
        x = (rng.standard_normal((int(seconds * sr), ch)) * 1e-3).astype(np.float32)
        x[int(17 * sr) : int(17.3 * sr)] *= 300  # the loudest frame is in the second window
        sf.write(root / name, x, sr, subtype="FLOAT" if name.endswith(".wav") else "PCM_24")
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_long_files_equal_the_whole_file_api(family, model_dirs, models, tmp_path, monkeypatch):
    blocks, streamed = [], []
    real_blocks, real_pieces = audio.stream_blocks, pieces.streamed_pieces

    def small_blocks(path, block_frames=audio.STREAM_BLOCK_FRAMES):  # many decode blocks per window
        for block in real_blocks(path, 30000):
            blocks.append(block.shape[0])
            yield block

    def spy(*args, **kwargs):
        for piece in real_pieces(*args, **kwargs):
            streamed.append(piece.idx)
            yield piece

    monkeypatch.setattr(audio, "stream_blocks", small_blocks)  # workers=0: the run decodes in this process
    monkeypatch.setattr(pieces, "streamed_pieces", spy)
    src = _long_corpus(tmp_path / "long")
    out = tmp_path / "out"
    summary = batch.embed_folder(src, out, model=model_dirs[family], workers=0, frames_dtype="float32",
                                 frame_layers="all", stream_seconds=5.0, window_chunks=1)
    assert summary.ok == 3 and len(streamed) >= 8  # every file came in several windows
    assert len(blocks) > 2 * len(streamed)  # ... each window from several blocks (two passes)
    model = models[family]
    for path in sorted(src.iterdir()):
        z = np.load(out / f"{path.name}.npz")
        frames = model.embed_frames(str(path))
        np.testing.assert_allclose(z["clip"], model.embed_clip(str(path)).numpy(), atol=1e-5)
        np.testing.assert_allclose(z["frames"], frames.embeddings.numpy(), atol=1e-5)
        np.testing.assert_array_equal(z["timestamps"], frames.timestamps.numpy())


def test_window_log_mel_equals_the_whole_file_front_end():
    """Windows of a file (``frontend.frame_segment``), normalised with the whole file's peak by
    ``frontend.log_mel_segments``, put together equal ``frontend.log_mel`` of the whole file."""
    rng = np.random.default_rng(3)
    wav = (rng.standard_normal(16000 * 25 + 77) * 0.01).astype(np.float32)
    wav[16000 * 12 : 16000 * 13] *= 100
    ref, n = frontend.log_mel(torch.from_numpy(wav)[None])
    total, x = int(n[0]), torch.from_numpy(wav)
    whole = frontend.frame_segment(x, 0, total)
    peak = float(frontend.mel_db(whole[None]).max())
    starts = list(range(0, total, 1001))
    counts = [min(1001, total - s) for s in starts]
    segments = torch.nn.utils.rnn.pad_sequence([frontend.frame_segment(x, s, c) for s, c in zip(starts, counts)], batch_first=True)
    mels = frontend.log_mel_segments(segments, torch.tensor(counts), torch.full((len(starts),), peak))
    torch.testing.assert_close(torch.cat([m[:, :c] for m, c in zip(mels, counts)], dim=1), ref[0], atol=1e-5, rtol=0)
    for own_peak in (None, torch.tensor([float("nan")])):  # a whole file: its own peak
        alone = frontend.log_mel_segments(whole[None], torch.tensor([total]), own_peak)[0]
        torch.testing.assert_close(alone, ref[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- inputs and shards


def test_find_inputs_folder_list_and_file(corpus, tmp_path):
    files, ignored = batch.find_inputs(corpus)
    assert [f.rel for f in files] == sorted([*AUDIO, *BAD]) and ignored == len(NOT_AUDIO)
    listing = tmp_path / "files.txt"
    listing.write_text(f"# a comment\n{corpus / 'sub/c.flac'}\n\n{corpus / 'sub/deep/d.ogg'}\n{corpus / 'notes.txt'}\n")
    files, ignored = batch.find_inputs(listing)
    assert [f.rel for f in files] == ["c.flac", "deep/d.ogg"] and ignored == 1
    at = tmp_path / "names"
    at.write_text("sub/c.flac\nmissing.wav\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/c.flac").write_bytes((corpus / "sub/c.flac").read_bytes())
    files, _ = batch.find_inputs(f"@{at}")
    assert [f.rel for f in files] == ["missing.wav", "sub/c.flac"] and files[0].size == -1
    assert [f.rel for f in batch.find_inputs(corpus / "a.wav")[0]] == ["a.wav"]
    with pytest.raises(ValueError, match="neither an audio file"):
        batch.find_inputs(corpus / "sub/cover.jpg")
    with pytest.raises(FileNotFoundError):
        batch.find_inputs(tmp_path / "nothing")


def test_one_discovery_rule_for_folder_runs_and_training(corpus):
    assert batch.AUDIO_EXTENSIONS is audio.AUDIO_EXTENSIONS and batch.is_audio_path is audio.is_audio_path
    assert {".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".caf", ".w64", ".rf64"} <= audio.AUDIO_EXTENSIONS
    assert audio.is_audio_path("X.WAV") and not audio.is_audio_path("._x.wav") and not audio.is_audio_path("a.txt")
    listed = {p.relative_to(corpus).as_posix() for p in train_data.list_audio(corpus)}
    assert listed == {f.rel for f in batch.find_inputs(corpus)[0]} == set(AUDIO) | set(BAD)  # no hidden files


def test_one_decoder_for_paths_bytes_and_file_objects(corpus):
    path = corpus / "sub/b.wav"
    wav, sr = audio.read_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1 and sr == 44100
    for source in (path.read_bytes(), io.BytesIO(path.read_bytes()), str(path)):
        got, got_sr = audio.read_audio(source)
        np.testing.assert_array_equal(got, wav)
        assert got_sr == sr
    np.testing.assert_array_equal(audio.load_audio(path.read_bytes()), audio.load_audio(path))
    info = audio.audio_info(path.read_bytes())
    assert (info.sample_rate, info.channels) == (44100, 2) and info.duration == pytest.approx(12.5)
    for source in (corpus / "corrupt.wav", BAD["corrupt.wav"], io.BytesIO(b""), corpus / "empty.flac"):
        with pytest.raises(ValueError, match="cannot decode .* as audio"):
            audio.read_audio(source)
    with pytest.raises(FileNotFoundError, match="no audio file"):
        audio.audio_info(corpus / "missing.wav")


def test_weights_hash_is_the_loaders_or_the_state_dicts(model_dirs, models):
    sha, hashed = batch.weights_sha256(models["frame"])
    assert (sha, hashed) == (weights.sha256_file(model_dirs["frame"] / weights.WEIGHTS_NAME), "weights file")
    encoder = models["frame"].encoder
    built = [weights.build(models["frame"].config, encoder.state_dict()) for _ in range(2)]  # in memory: no weights file
    assert built[0].weights_sha256 is None
    sha, hashed = batch.weights_sha256(built[0])
    assert hashed == "state dict tensors" and sha == batch.weights_sha256(built[1])[0] != batch.weights_sha256(models["clip"])[0]


def test_importing_the_package_or_the_command_line_does_not_import_batch():
    code = ("import sys, atst_features, atst_features.cli as cli; cli.build_parser(); "
            "assert 'atst_features.batch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_list_file_input_mirrors_and_reports_missing_files(model_dirs, corpus, tmp_path):
    listing = tmp_path / "list.lst"
    listing.write_text(f"{corpus / 'sub/c.flac'}\n{corpus / 'sub/deep/gone.wav'}\n")
    out = tmp_path / "out"
    summary = batch.embed_folder(listing, out, model=model_dirs["frame"], workers=0)
    assert (summary.ok, summary.failed) == (1, 1)
    assert (out / "c.flac.npz").is_file()
    assert "no audio file" in _index(out)["deep/gone.wav"]["error"]


def test_shards_are_disjoint_deterministic_and_cover_everything(model_dirs, corpus, tmp_path):
    rels = [f"dir{i % 7}/file{i}.wav" for i in range(1000)]
    shards = [batch.shard_of(r, 4) for r in rels]
    assert shards == [batch.shard_of(r, 4) for r in rels] and set(shards) == {0, 1, 2, 3}
    assert max(np.bincount(shards)) < 300  # roughly balanced
    out = tmp_path / "out"
    summaries = [batch.embed_folder(corpus, out, model=model_dirs["frame"], workers=0, shard=f"{i}/3") for i in range(3)]
    assert sum(s.ok for s in summaries) == len(AUDIO) and sum(s.failed for s in summaries) == len(BAD)
    seen = [set(_index(out, f"index.shard-{i}-of-3.jsonl")) for i in range(3)]
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == len(AUDIO) + len(BAD)
    unsharded = batch.embed_folder(corpus, out, model=model_dirs["frame"], workers=0)
    assert unsharded.skipped == len(AUDIO) and unsharded.ok == 0  # the shards' work is reused
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="i/N"):
            batch.parse_shard(bad)


# ---------------------------------------------------------------------------- engine


def test_embedder_matches_the_api_and_halves_the_batch_on_out_of_memory(models, monkeypatch):
    model = models["clip"]
    rng = np.random.default_rng(0)
    wavs = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in (16000, 40000, 170000, 5000, 90000)]
    reference = batch.Embedder(model, frames_dtype="float32", batch_size=8).embed(wavs)

    forward = type(model.encoder).forward_intermediates
    sizes = []

    def forward_with_oom(self, mel, *args, **kwargs):
        sizes.append(mel.shape[0])
        if mel.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, mel, *args, **kwargs)

    monkeypatch.setattr(type(model.encoder), "forward_intermediates", forward_with_oom)
    embedder = batch.Embedder(model, frames_dtype="float32", batch_size=8)
    results = embedder.embed(wavs)
    assert sizes[0] == 6 and sizes[-1] <= 2  # 6 chunks per kind: tried whole, then halved until it fits
    for got, ref in zip(results, reference):
        np.testing.assert_allclose(got.clip, ref.clip, atol=1e-6)
        np.testing.assert_allclose(got.frames, ref.frames, atol=1e-6)
    monkeypatch.undo()
    for got, wav in zip(results, wavs):
        np.testing.assert_allclose(got.clip, model.embed_clip(wav, 16000).numpy(), atol=1e-5)
        np.testing.assert_allclose(got.frames, model.embed_frames(wav, 16000, layers="last").embeddings.numpy(), atol=1e-5)


def test_bad_arguments(model_dirs, corpus, tmp_path, capsys):
    with pytest.raises(ValueError, match="what="):
        batch.embed_folder(corpus, tmp_path / "o", model=model_dirs["frame"], what="spectrogram")
    with pytest.raises(ValueError, match="frames_dtype"):
        batch.embed_folder(corpus, tmp_path / "o", model=model_dirs["frame"], frames_dtype="int8")
    with pytest.raises(ValueError, match="layers"):
        batch.embed_folder(corpus, tmp_path / "o", model=model_dirs["frame"], clip_layers=[5])
    assert _cli([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--model", str(model_dirs["frame"])]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_cli_exit_status_zero_when_all_succeed(model_dirs, corpus, tmp_path, capsys):
    status = _cli([str(corpus / "sub"), "--out", str(tmp_path / "out"), "--model", str(model_dirs["clip"]),
                   "--layers", "last", "--what", "clip", "--workers", "0", "--no-progress"])
    assert status == 0
    assert f"{len(AUDIO) - 1} embedded" in capsys.readouterr().err
    z = np.load(tmp_path / "out/deep/d.ogg.npz")
    assert z["clip"].shape == (2 * 48,)


def test_command_is_registered(model_dirs, corpus, tmp_path):
    pytest.importorskip("atst_features.hub")  # the full CLI also registers the hub commands
    from atst_features import cli

    status = cli.main(["embed", str(corpus / "a.wav"), "--out", str(tmp_path / "o"), "--model", str(model_dirs["frame"]),
                       "--no-progress", "--workers", "0"])
    assert status == 0 and (tmp_path / "o/a.wav.npz").is_file()


@pytest.mark.gpu
def test_cuda_bfloat16_run_is_close_to_cpu(model_dirs, models, corpus, tmp_path):
    summary = batch.embed_folder(corpus, tmp_path / "out", model=model_dirs["frame"], device="cuda", dtype="bfloat16",
                                 workers=2, frames_dtype="float32")
    assert summary.ok == len(AUDIO)
    for rel in AUDIO:
        z = np.load(tmp_path / "out" / f"{rel}.npz")
        ref = models["frame"].embed_clip(str(corpus / rel)).numpy()
        np.testing.assert_allclose(z["clip"], ref, atol=5e-2, rtol=5e-2)
