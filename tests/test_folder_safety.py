"""Folder runs never corrupt or lose work: one writer per output folder, no followed links, an
honest index, no leftovers, clear errors at start, escaped names (``atst_features.batch``)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import atst_features as af
from atst_features import atomic, batch, cli, weights
from atst_features.batch import folder

N_FILES = 8
OUTSIDE = "precious, outside OUT\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random ATST-Frame saved as a converted directory."""
    torch.manual_seed(0)
    cfg = af.ATSTConfig(family="frame", embed_dim=48, depth=2, num_heads=3)
    return weights.save_converted(cfg, af.ATSTEncoder(cfg).state_dict(), tmp_path_factory.mktemp("model") / "frame")


def _wav(path: Path, seconds: float = 1.0, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (rng.standard_normal(int(16000 * seconds)) * 0.05).astype(np.float32), 16000)
    return path


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    for i in range(N_FILES):
        _wav(root / ("sub" if i % 2 else "") / f"f{i}.wav", 0.6 + 0.1 * i, i)
    return root


def _rels(src: Path) -> list[str]:
    return [f.rel for f in batch.find_inputs(src)[0]]


def _embed(src: Path, out: Path, model_dir: Path, *extra: str) -> int:
    return cli.main(["embed", str(src), "--out", str(out), "--model", str(model_dir), "--workers", "0", "--no-progress", *extra])


def _command(src: Path, out: Path, model_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "atst_features", "embed", str(src), "--out", str(out), "--model", str(model_dir),
            "--workers", "0", "--device", "cpu", "--no-progress", *extra]


def _check_folder(out: Path, rels: list[str]) -> None:
    """Every input has an ok / skipped row whose output opens (CRCs included) and matches metadata.json."""
    meta = json.loads((out / batch.METADATA_NAME).read_text())
    rows = batch.read_index(out)
    assert set(rows) == set(rels)
    for rel, row in rows.items():
        assert row["status"] in ("ok", "skipped") and row["settings"] == meta["settings_key"], row
        path = out / row["output"]
        assert not path.is_symlink() and path.stat().st_size == row["output_size"]
        with zipfile.ZipFile(path) as z:
            assert z.testzip() is None
        with np.load(path) as z:
            assert str(z["frames"].dtype) == meta["frames_dtype"] and z["frames"].shape[0] == row["n_frames"]
            assert z["clip"].dtype == np.float32 and z["timestamps"].shape == (row["n_frames"],)


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if atomic.is_temp_name(p.name) or p.name.endswith(".lock")]


HOLDER = textwrap.dedent(  # a live run as other processes see it (stdlib only: starts in a blink)
    """
    import fcntl, json, os, sys
    out, name, shard, settings = sys.argv[1:]
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, name), os.O_RDWR | os.O_CREAT)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    record = {"pid": os.getpid(), "host": os.uname().nodename, "started": "2030-01-01 00:00:00",
              "shard": shard, "settings": None if settings == "-" else settings}
    os.write(fd, json.dumps(record).encode())
    print("locked", flush=True)
    sys.stdin.read()
    os.unlink(os.path.join(out, name))
    """
)


class _Holder:
    """A process holding a run's lock file in OUT (as ``FolderLock`` does) until ``close()``."""

    def __init__(self, out: Path, shard: str | None = None, settings: str | None = None):
        name = folder.run_lock_name(batch.parse_shard(shard))
        argv = [sys.executable, "-c", HOLDER, str(out), name, shard or "-", settings or "-"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------- one writer per folder


def test_a_second_run_is_refused_while_a_run_holds_the_folder(model_dir, src, tmp_path, capsys):
    out = tmp_path / "out"
    holder = _Holder(out)
    try:
        for extra in ([], ["--shard", "0/2"]):
            assert _embed(src, out, model_dir, *extra) == 2
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"atst-features embed: another run (pid {holder.proc.pid}, started 2030-01-01 00:00:00")
            assert f"is writing to {str(out)!r}" in err and len(err.splitlines()) == 1
        assert sorted(p.name for p in out.iterdir()) == [".index.jsonl.lock"]  # the refused runs wrote nothing
    finally:
        holder.close()
    assert not out.exists() or not list(out.iterdir())  # the holder removed its lock file
    assert _embed(src, out, model_dir) == 0
    _check_folder(out, _rels(src))
    assert not _leftovers(out)


def test_shards_share_a_folder_but_not_a_shard(model_dir, src, tmp_path, capsys):
    out = tmp_path / "out"
    holder = _Holder(out, "0/2")
    try:
        for extra, why in ((["--shard", "0/2"], "shard 0/2"), (["--shard", "1/3"], "shard 0/2"), ([], "shard 0/2")):
            assert _embed(src, out, model_dir, *extra) == 2
            err = capsys.readouterr().err
            assert "another run (pid" in err and why in err
        assert _embed(src, out, model_dir, "--shard", "1/2") == 0  # the other shard of the same N
    finally:
        holder.close()
    holder = _Holder(out, "0/2", settings="0123456789abcdef")  # a live shard with other settings
    try:
        assert _embed(src, out, model_dir, "--shard", "1/2", "--force") == 2
        assert "with other settings" in capsys.readouterr().err
    finally:
        holder.close()
    assert _embed(src, out, model_dir, "--shard", "0/2") == 0
    _check_folder(out, _rels(src))


@pytest.mark.slow
@pytest.mark.parametrize("dtypes", [("float16", "float16"), ("float16", "float32")], ids=["same", "other-dtype"])
def test_two_concurrent_runs_leave_a_valid_folder(model_dir, tmp_path, dtypes):
    src = tmp_path / "src"
    for i in range(40):
        _wav(src / f"d{i % 3}" / f"c{i:02d}.wav", 0.5, i)
    out = tmp_path / "out"
    procs = [subprocess.Popen(_command(src, out, model_dir, "--frames-dtype", d), stderr=subprocess.PIPE, text=True)
             for d in dtypes]
    results = [(p.communicate()[1], p.returncode) for p in procs]
    for err, status in results:
        assert status == 0 or (status == 2 and "another run (pid" in err), err
        assert "failed:" not in err and "Traceback" not in err
    assert any(status == 0 for _, status in results)
    _check_folder(out, _rels(src))
    assert subprocess.run(_command(src, out, model_dir, "--frames-dtype", dtypes[0])).returncode == 0  # a plain rerun
    _check_folder(out, _rels(src))
    assert not _leftovers(out)


# ---------------------------------------------------------------------------- no link is followed


def _outside(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "outside" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(OUTSIDE)
    return path


def test_links_at_final_and_old_temporary_names_are_never_followed(model_dir, src, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    ours = [  # final names, lock files, and temporary names of this version and the last
        "f0.wav.npz", "sub/f1.wav.npz", "index.jsonl", "metadata.json", ".index.jsonl.lock", folder.SETUP_LOCK,
        ".f4.wav.npz.0123456789abcdef.partial", "f2.wav.npz.partial",
    ]
    older = [f"metadata.json.{os.getpid()}.tmp", f"index.jsonl.{os.getpid() + 1}.tmp"]  # NAME.PID.tmp
    targets = {name: _outside(tmp_path, name.replace("/", "_")) for name in [*ours, *older]}
    for name, target in targets.items():
        (out / name).symlink_to(target)
    assert _embed(src, out, model_dir) == 0
    for name, target in targets.items():
        assert target.read_text() == OUTSIDE, name  # never written through
        assert (out / name).is_symlink() == (name in older), name  # ours are replaced or removed as links
    _check_folder(out, _rels(src))
    assert not _leftovers(out) and sorted(p.name for p in (tmp_path / "outside").iterdir()) == sorted(
        t.name for t in targets.values())


def test_an_output_folder_that_is_a_link_is_not_written_through(model_dir, src, tmp_path, capsys):
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(elsewhere, target_is_directory=True)
    assert _embed(src, out, model_dir) == 1
    err = capsys.readouterr().err
    assert err.count("failed: sub/") == N_FILES // 2 and "symbolic link" in err
    assert not list(elsewhere.iterdir())
    (out / "sub").unlink()
    assert _embed(src, out, model_dir) == 0
    _check_folder(out, _rels(src))


def test_the_atomic_writers_create_exclusively_and_replace_links(tmp_path, monkeypatch):
    target = _outside(tmp_path, "target")
    d = tmp_path / "d"
    d.mkdir()
    tokens = iter(["0" * 16, "0" * 16, "1" * 16, "2" * 16, "3" * 16, "4" * 16, "5" * 16])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(tokens))
    planted = d / ".a.txt.0000000000000000.partial"  # the next temporary name, planted as a link
    planted.symlink_to(target)
    (d / "a.txt").symlink_to(target)
    atomic.write_text_atomic(d / "a.txt", "new\n")  # skips the planted name (O_EXCL), replaces the link
    assert target.read_text() == OUTSIDE and (d / "a.txt").read_text() == "new\n" and not (d / "a.txt").is_symlink()
    assert planted.is_symlink()  # not ours: left alone
    with pytest.raises(RuntimeError):
        with atomic.open_atomic(d / "b.bin") as f:
            f.write(b"half")
            raise RuntimeError("writer failed")
    assert not (d / "b.bin").exists() and sorted(p.name for p in d.iterdir()) == [planted.name, "a.txt"]
    (d / "c.bin").symlink_to(target)
    atomic.atomic_write(d / "c.bin", lambda tmp: tmp.write_bytes(b"by name"))
    assert (d / "c.bin").read_bytes() == b"by name" and target.read_text() == OUTSIDE
    assert (d / "c.bin").stat().st_mode & 0o777 == 0o666 & ~_umask()
    (d / "log.csv").symlink_to(target)
    with atomic.open_append(d / "log.csv", encoding="utf-8") as f:
        f.write("row\n")
    with atomic.open_append(d / "log.csv", encoding="utf-8") as f:
        f.write("row\n")
    assert (d / "log.csv").read_text() == "row\nrow\n" and target.read_text() == OUTSIDE
    (d / "link").symlink_to(target)
    os.replace(d / "a.txt", d / "link")  # what every writer relies on: rename replaces a link, not its target
    assert target.read_text() == OUTSIDE and not (d / "link").is_symlink() and (d / "link").read_text() == "new\n"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_training_checkpoints_and_logs_never_write_through_links(tmp_path):
    checkpoint = pytest.importorskip("atst_features.train.checkpoint")
    logs = pytest.importorskip("atst_features.train.logs")
    target = _outside(tmp_path, "target")
    path = checkpoint.checkpoint_path(tmp_path / "run", 5)
    path.parent.mkdir(parents=True)
    path.symlink_to(target)
    (path.parent / "step-00000005.pt.tmp").symlink_to(target)  # the old predictable name
    checkpoint.save_atomic({"step": torch.tensor(5)}, path)
    assert torch.load(path, weights_only=True)["step"] == 5 and target.read_text() == OUTSIDE
    assert checkpoint.list_checkpoints(tmp_path / "run") == [path]
    log_path = tmp_path / "run" / logs.LOG_NAME
    log_path.symlink_to(target)
    log = logs.CSVLog(log_path, resume_step=None)
    log.write({"step": 1, "loss": 0.5})
    log_path.unlink()
    log_path.symlink_to(target)
    log.write({"step": 2, "loss": 0.25})
    assert target.read_text() == OUTSIDE and not log_path.is_symlink()


# ---------------------------------------------------------------------------- an honest index


def test_an_ok_row_whose_output_changed_is_redone(model_dir, src, tmp_path):
    out = tmp_path / "out"
    assert _embed(src, out, model_dir) == 0
    rows = batch.read_index(out)
    assert all(r["output_size"] > 0 and len(r["output_digest"]) == 64 for r in rows.values())
    truncated, replaced, linked, old_row = "f0.wav", "sub/f1.wav", "f2.wav", "f4.wav"
    with open(out / f"{truncated}.npz", "r+b") as f:
        f.truncate(100)
    shutil.copyfile(out / "f6.wav.npz", out / f"{replaced}.npz")  # a valid .npz, of another input
    real = out / f"{linked}.npz"
    real.rename(tmp_path / "moved.npz")
    real.symlink_to(tmp_path / "moved.npz")  # the same bytes, but through a link
    index = out / batch.INDEX_NAME
    lines = [json.loads(line) for line in index.read_text().splitlines()]
    for row in lines:
        if row["path"] == old_row:
            del row["output_digest"]  # a row written before digests were recorded
    index.write_text("".join(json.dumps(r) + "\n" for r in lines))

    summary = batch.embed_folder(src, out, model=model_dir, workers=0)
    assert summary.ok == 4 and summary.skipped == N_FILES - 4
    rows = batch.read_index(out)
    assert {r for r, row in rows.items() if row["status"] == "ok"} == {truncated, replaced, linked, old_row}
    assert (tmp_path / "moved.npz").stat().st_size > 0 and not real.is_symlink()
    _check_folder(out, _rels(src))
    assert batch.embed_folder(src, out, model=model_dir, workers=0).skipped == N_FILES


def test_a_stopped_run_keeps_only_rows_that_match_the_disk(model_dir, src, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _embed(src, out, model_dir) == 0
    (out / "f0.wav.npz").unlink()  # its row says ok; the file is gone
    index = out / batch.INDEX_NAME
    stale = batch.read_index(out)["f0.wav"]

    def full(self, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch.NpzSink, "write_frames", full)
    summary = batch.embed_folder(src, out, model=model_dir, workers=0, force=True)
    assert summary.aborted and "disk full" in summary.aborted and summary.ok == 0
    rows = {json.loads(line)["path"]: json.loads(line) for line in index.read_text().splitlines()}
    assert "f0.wav" not in rows and set(rows) == set(_rels(src)) - {"f0.wav"}  # not the stale view
    assert stale["status"] == "ok"
    monkeypatch.undo()
    assert _embed(src, out, model_dir) == 0
    _check_folder(out, _rels(src))


# ---------------------------------------------------------------------------- leftovers


def test_leftovers_of_a_killed_run_are_removed_at_the_next_start(model_dir, src, tmp_path):
    out = tmp_path / "out"
    assert _embed(src, out, model_dir) == 0
    target = _outside(tmp_path, "target")
    leftovers = [out / ".f0.wav.npz.0123456789abcdef.partial", out / "sub" / ".f1.wav.npz.fedcba9876543210.partial",
                 out / "sub" / "f3.wav.npz.partial", out / ".index.jsonl.00000000000000aa.partial",
                 out / ".metadata.json.00000000000000bb.partial"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    linked = out / ".f2.wav.npz.00000000000000cc.partial"
    linked.symlink_to(target)
    (out / "sub" / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    beyond = tmp_path / "outside" / ".x.npz.00000000000000dd.partial"  # matches, but outside OUT (through a link)
    beyond.write_bytes(b"not ours")
    kept = [out / "notes.partial", out / ".notes.partial", out / "sub" / ".f1.wav.npz.partial", out / "keep.tmp"]
    for path in kept:
        path.write_text("not a temporary file of the package")
    assert _embed(src, out, model_dir) == 0
    assert not any(p.exists() or p.is_symlink() for p in [*leftovers, linked])
    assert target.read_text() == OUTSIDE and beyond.read_bytes() == b"not ours"
    assert all(p.exists() for p in kept)


def test_a_shard_removes_only_its_own_leftovers(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rels = [f"f{i}.wav" for i in range(8)]
    paths = {rel: out / atomic.temp_name(rel + batch.OUTPUT_SUFFIX) for rel in rels}
    for path in paths.values():
        path.write_bytes(b"")
    (out / atomic.temp_name("index.shard-1-of-2.jsonl")).write_bytes(b"")
    (out / atomic.temp_name("index.shard-0-of-2.jsonl")).write_bytes(b"")
    folder.clean_leftovers(out, (0, 2))
    for rel, path in paths.items():
        assert path.exists() == (batch.shard_of(rel, 2) == 1)
    assert [p.name.startswith(".index.shard-1") for p in out.glob(".index*")] == [True]


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_a_rerun_completes(model_dir, tmp_path):
    src = tmp_path / "src"
    for i in range(30):
        _wav(src / f"c{i:02d}.wav", 1.0, i)
    out = tmp_path / "out"
    runner = tmp_path / "runner.py"
    runner.write_text(textwrap.dedent(
        """
        import sys, time
        from atst_features import cli
        from atst_features.model import ATSTEncoder

        forward = ATSTEncoder.forward_intermediates
        def slow_forward(self, *args, **kwargs):
            time.sleep(0.1)
            return forward(self, *args, **kwargs)
        ATSTEncoder.forward_intermediates = slow_forward
        sys.exit(cli.main(["embed", *sys.argv[1:]]))
        """
    ))
    argv = [str(src), "--out", str(out), "--model", str(model_dir), "--batch-size", "1", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen([sys.executable, str(runner), *argv], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while len(list(out.rglob("*.npz"))) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1 and "stopped early: interrupted" in err and "Traceback" not in err
    assert 5 <= len(list(out.rglob("*.npz"))) < 30 and not _leftovers(out)
    assert _embed(src, out, model_dir) == 0
    _check_folder(out, _rels(src))


# ---------------------------------------------------------------------------- clear errors at start


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_out_is_a_file_or_below_a_file(model_dir, src, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("a file")
    assert _embed(src, a_file, model_dir) == 2
    assert "is a file, not a folder" in _one_line(capsys)
    assert _embed(src, a_file / "sub", model_dir) == 2
    assert "is a file" in _one_line(capsys)
    assert a_file.read_text() == "a file" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_out_not_writable(model_dir, src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:  # permissions stop everyone but root
        out.chmod(0o555)
        try:
            assert _embed(src, out, model_dir) == 2
            assert "permission denied" in _one_line(capsys)
        finally:
            out.chmod(0o755)

    def refuse(path, flags, mode=0o666):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(folder, "open_no_follow", refuse)  # root: as the kernel would refuse anyone else
    assert _embed(src, out, model_dir) == 2
    assert f"cannot write to the output folder {str(out)!r}: permission denied" in _one_line(capsys)
    assert _embed(src, tmp_path / "new" / "out", model_dir) == 2
    _one_line(capsys)
    assert not list(out.iterdir()) and not (tmp_path / "new").exists()  # nothing left behind


def test_a_full_disk_at_start(model_dir, src, tmp_path, capsys, monkeypatch):
    real = atomic.open_no_follow

    def full(path, flags, mode=0o666):
        if flags & os.O_EXCL:  # every new file of the atomic writers
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, flags, mode)

    monkeypatch.setattr(atomic, "open_no_follow", full)
    out = tmp_path / "deep" / "out"
    assert _embed(src, out, model_dir) == 2
    assert "no space left on its device" in _one_line(capsys)
    assert not (tmp_path / "deep").exists()  # the folders it created are gone again
    existing = tmp_path / "existing"
    existing.mkdir()
    assert _embed(src, existing, model_dir) == 2
    assert "no space left" in _one_line(capsys) and not list(existing.iterdir())


# ---------------------------------------------------------------------------- names on the terminal


def test_names_are_escaped_in_messages(model_dir, tmp_path, capsys):
    src = tmp_path / "src"
    _wav(src / "fine.wav")
    (src / "\x1b[31mred.wav").write_bytes(b"RIFF but not a wave file")
    undecodable = os.fsdecode(b"bad\xff.wav")
    (src / undecodable).write_bytes(b"")
    assert _embed(src, tmp_path / "out", model_dir) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\udcff" not in err
    assert "failed: \\x1b[31mred.wav: " in err and "failed: bad\\udcff.wav: " in err
    assert batch.printable("tab\there \x1b[0m é ✓") == "tab\\there \\x1b[0m é ✓"
