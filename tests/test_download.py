"""Named models without the internet: a local HTTP server, the Hugging Face cache on disk, publishing.

The download path is the real one (gdown, timeouts, progress bar, pins, temporary file + move,
convert, cache); only the URL and the pin come from a test manifest passed to
``load(name, manifest=...)``. The server can also misbehave on purpose: serve another file, an
HTML page, an endless or a dripping body, nothing at all, or cut the transfer. Every failure must
end in a clear error and a cache with nothing a rerun would reuse.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import re
import stat
import threading
import time
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from test_convert import TINY_HEADS, make_finetuned, make_lightning_pretrain, shifted, tiny

import atst_features as af
from atst_features import artifacts, cli, fetch, hub, weights
from atst_features import cache as model_cache
from atst_features.errors import CheckpointError, DownloadError, IntegrityError, LoadArgumentError, LoadError, ManifestError
from atst_features.model import ATSTConfig

NAME = "tiny-frame"
SERVER_TIMEOUT_S = 10
FILE = "/files/tiny.ckpt"
QUOTA_PAGE = (
    b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>"
    b"<p class=\"uc-error-subcaption\">Too many users have viewed or downloaded this file recently.</p></body></html>"
)


# ---------------------------------------------------------------------------- a local file server


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range: bytes=N-`` unless told not to; cuts the next
    ``server.cuts`` transfers in half; ``server.modes[path]`` makes it misbehave."""

    timeout = SERVER_TIMEOUT_S

    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        mode = srv.modes.get(self.path)
        try:
            if mode == "silent":  # accept the request, never answer
                srv.stop.wait(SERVER_TIMEOUT_S)
                return
            if mode == "html":  # a Google-Drive-like quota page, status 200
                self._headers(200, len(QUOTA_PAGE), "text/html; charset=utf-8")
                self.wfile.write(QUOTA_PAGE)
                return
            if mode == "endless":  # no Content-Length, bytes for ever
                self._headers(200, None)
                while not srv.stop.is_set():
                    self.wfile.write(b"\0" * 65536)
                return
            if mode == "drip":  # a slowloris: one byte at a time, each well inside the read timeout
                self._headers(200, 1 << 20)
                while not srv.stop.wait(0.05):
                    self.wfile.write(b"P")
                    self.wfile.flush()
                return
            if mode is not None and mode.isdigit():
                self.send_error(int(mode))
                return
            data = srv.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            start, status = 0, 200
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if m and srv.honour_range:
                start, status = int(m[1]), 206
            body = data[start:]
            extra = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if status == 206 else {}
            self._headers(status, len(body), extra=extra)
            if srv.cuts > 0:  # send half, then hang up: an interrupted download
                srv.cuts -= 1
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client closed early (it may)
            pass

    def _headers(self, status: int, length: int | None, kind: str = "application/octet-stream", extra=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        if length is not None:
            self.send_header("Content-Length", str(length))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.modes, srv.log, srv.honour_range, srv.cuts = {}, {}, [], True, 0
    srv.stop = threading.Event()
    srv.daemon_threads = True
    thread = threading.Thread(target=functools.partial(srv.serve_forever, poll_interval=0.05), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.host = f"127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=SERVER_TIMEOUT_S)


@pytest.fixture(autouse=True)
def quick_network(monkeypatch):
    """Short timeouts and one retry, so that failing transfers fail within seconds."""
    monkeypatch.setattr(fetch, "RETRIES", 1)
    monkeypatch.setattr(fetch, "CONNECT_TIMEOUT_S", 2.0)
    monkeypatch.setattr(fetch, "READ_TIMEOUT_S", 2.0)
    monkeypatch.setattr(fetch, "STALL_TIMEOUT_S", 3.0)
    monkeypatch.delenv(weights.OTHER_FILE_ENV, raising=False)


@pytest.fixture
def online(monkeypatch):
    """Downloads allowed, whatever the environment running the tests says."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def _bytes_of(tmp_path_factory, ckpt: dict) -> bytes:
    path = tmp_path_factory.mktemp("official") / "file.ckpt"
    torch.save(ckpt, path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def official_bytes(tmp_path_factory) -> bytes:
    """A synthesized official ATST-Frame pretraining file (tiny48 encoder in the real key layout)."""
    return _bytes_of(tmp_path_factory, make_lightning_pretrain("frame", compact=True))


@pytest.fixture(scope="module")
def other_bytes(tmp_path_factory) -> bytes:
    """A different, equally valid ATST-Frame file (another teacher)."""
    return _bytes_of(tmp_path_factory, make_lightning_pretrain("frame", teacher=shifted(tiny("frame"), 0.1), compact=True))


def tiny_entry(url: str, pin: tuple[int, str] | None, **source) -> dict:
    cfg = ATSTConfig(family="frame", embed_dim=48, depth=12, num_heads=TINY_HEADS).to_dict()
    size, sha256 = pin if pin is not None else (None, None)
    return {
        "name": NAME,
        "family": "frame",
        "arch": None,
        "config": cfg,
        "frontend": {"db_clamp": None},
        "head": None,
        "source": {
            "url": url,
            "page": None,
            "filename": "tiny.ckpt",
            "format": "lightning-pretrain",
            "size": size,
            "sha256": sha256,
            **source,
        },
        "hub": {"repo_id": None, "revision": None, "files": {}},
    }


def _pin(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


def _serve(server, data: bytes, pin="auto", **source) -> dict:
    """Serve ``data`` at FILE and a manifest for it: pinned to ``data`` ("auto"), to ``pin``, or not (None)."""
    server.files[FILE] = data
    return {"models": [tiny_entry(server.url + FILE, _pin(data) if pin == "auto" else pin, **source)]}


def _assert_is_tiny_frame(model: af.ATSTModel, reference) -> None:
    got = model.embed_frames(reference["chirp_3s.wav"], 16000).embeddings
    torch.testing.assert_close(got, reference["chirp_3s.frame.frames.last12"], atol=1e-4, rtol=0)


def _assert_clean(cache: Path, pinned: bool = False) -> None:
    """Nothing a rerun would reuse: no entry, no download, no temporary folder (and no first-use pin)."""
    assert not (cache / NAME).exists()
    assert not (cache / "downloads" / NAME).exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(f".{NAME}-")] if cache.exists() else True
    if not pinned:
        assert NAME not in model_cache._read_pins(cache)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atst-features")
    cli.add_weights_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------------------- download, convert, cache, offline


def test_download_convert_cache_then_offline(server, online, official_bytes, tmp_path, reference, capfd, monkeypatch):
    manifest = _serve(server, official_bytes)
    cache = tmp_path / "cache"
    model = af.load(NAME, manifest=manifest, cache_dir=cache)
    err = capfd.readouterr().err
    assert re.search(rf"downloading {NAME} \([\d.]+ [kM]B\) from {server.host}", err)  # said before the transfer
    assert "100%" in err  # the progress bar ran to the end
    assert model.name == NAME and model.source == str(cache / NAME)
    _assert_is_tiny_frame(model, reference)
    assert len(server.log) == 1
    entry = cache / NAME
    assert {p.name for p in entry.iterdir()} == {"config.json", "model.safetensors", "checksums.json"}
    record = json.loads((entry / "checksums.json").read_text())
    assert model.weights_sha256 == record["files"]["model.safetensors"]
    assert record["source"]["sha256"] == hashlib.sha256(official_bytes).hexdigest() and record["source"]["pinned"]
    assert record["source"]["name"] == NAME and record["source"]["url"].endswith(FILE)
    assert not (cache / "downloads" / NAME).exists()  # the official file is gone once converted
    assert not [p for p in cache.iterdir() if p.name.startswith(f".{NAME}-")]  # no temporary folder left

    server.shutdown()  # no network from here on
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = af.load(NAME, manifest=manifest, cache_dir=cache)
    _assert_is_tiny_frame(again, reference)
    assert weights.is_cached(NAME, cache_dir=cache, manifest=manifest)


def test_cache_dir_from_the_environment(server, online, official_bytes, tmp_path, monkeypatch):
    manifest = _serve(server, official_bytes)
    monkeypatch.setenv("ATST_FEATURES_CACHE", str(tmp_path / "env-cache"))
    path = af.download(NAME, manifest=manifest, progress=False)
    assert path == tmp_path / "env-cache" / NAME and (path / "model.safetensors").is_file()


def test_cache_files_follow_the_umask(server, online, official_bytes, tmp_path):
    """No forced 0600 / 0700: a cache built by one user (or in a container) is readable by others."""
    manifest = _serve(server, official_bytes)
    old = os.umask(0o002)
    try:
        path = af.download(NAME, manifest=manifest, cache_dir=tmp_path / "cache", progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o775
    assert {stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == {0o664}


# ---------------------------------------------------------------------------- pins


def test_wrong_sha256_is_an_error_naming_both(server, online, official_bytes, tmp_path):
    manifest = _serve(server, official_bytes, pin=(len(official_bytes), "0" * 64))
    with pytest.raises(IntegrityError) as err:
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    message = str(err.value)
    assert "0" * 64 in message and hashlib.sha256(official_bytes).hexdigest() in message
    assert "nothing was cached" in message and "atst-features convert" in message  # the way out
    assert "--allow-other-file" in message and weights.OTHER_FILE_ENV in message  # the documented opt-out
    _assert_clean(tmp_path)


def test_wrong_size_is_an_error(server, online, official_bytes, tmp_path):
    manifest = _serve(server, official_bytes, pin=(len(official_bytes) + 1, hashlib.sha256(official_bytes).hexdigest()))
    with pytest.raises((IntegrityError, DownloadError), match="bytes"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    _assert_clean(tmp_path)


def test_another_valid_file_is_refused(server, online, official_bytes, other_bytes, tmp_path):
    manifest = _serve(server, other_bytes, pin=_pin(official_bytes))
    with pytest.raises(IntegrityError, match=hashlib.sha256(other_bytes).hexdigest()):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    _assert_clean(tmp_path)


def test_the_opt_out_accepts_another_file_loudly(server, online, official_bytes, other_bytes, tmp_path, monkeypatch):
    manifest = _serve(server, other_bytes, pin=_pin(official_bytes))
    with pytest.warns(UserWarning, match="used anyway"):
        model = af.load(NAME, manifest=manifest, cache_dir=tmp_path / "a", progress=False, allow_other_file=True)
    assert model.config.embed_dim == 48
    record = artifacts.read_checksums(tmp_path / "a" / NAME)["source"]
    assert record["pinned"] is False and record["sha256"] == hashlib.sha256(other_bytes).hexdigest()
    with pytest.raises(IntegrityError, match="is pinned to"):  # the cached other file still needs the opt-out
        af.load(NAME, manifest=manifest, cache_dir=tmp_path / "a")
    monkeypatch.setenv(weights.OTHER_FILE_ENV, "1")  # the environment variable does the same
    with pytest.warns(UserWarning, match="used anyway"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path / "a")


def test_the_opt_out_never_pins(server, online, official_bytes, tmp_path):
    manifest = _serve(server, official_bytes, pin=None)
    af.download(NAME, manifest=manifest, cache_dir=tmp_path, progress=False, allow_other_file=True)
    assert NAME not in model_cache._read_pins(tmp_path)
    assert artifacts.read_checksums(tmp_path / NAME)["source"]["pinned"] is False
    with pytest.raises(IntegrityError, match="accepted with the opt-out"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path)
    assert NAME not in model_cache._read_pins(tmp_path)


def test_first_use_pins_an_unpinned_source(server, online, official_bytes, other_bytes, tmp_path, capsys):
    """Trust on first use: the first verified download pins the file; another one later is an error,
    with --force too; the opt-out replaces the copy but never the pin."""
    manifest = _serve(server, official_bytes, pin=None)
    manifest_path = tmp_path / "m.json"
    manifest_path.write_text(json.dumps(manifest))
    cache = tmp_path / "cache"
    assert weights.pin_status(NAME, cache_dir=cache, manifest=manifest) == "first-use"
    af.download(NAME, manifest=manifest, cache_dir=cache, progress=False)
    pins = model_cache._read_pins(cache)[NAME][server.url + FILE]
    assert pins["sha256"] == hashlib.sha256(official_bytes).hexdigest() and pins["size"] == len(official_bytes)
    assert weights.pin_status(NAME, cache_dir=cache, manifest=manifest) == "first-use: pinned here"
    assert _cli(["list", "--manifest", str(manifest_path), "--cache-dir", str(cache)]) == 0
    assert re.search(rf"{NAME}\s.*first-use: pinned here\s+yes", capsys.readouterr().out)

    server.files[FILE] = other_bytes  # the source changes its file
    assert _cli(["download", NAME, "--manifest", str(manifest_path), "--cache-dir", str(cache), "--quiet", "--force"]) == 1
    err = capsys.readouterr().err
    assert "first use" in err and hashlib.sha256(other_bytes).hexdigest() in err and "Traceback" not in err
    _assert_is_the(af.load(NAME, manifest=manifest, cache_dir=cache), official_bytes)  # the old copy is intact
    with pytest.warns(UserWarning, match="used anyway"):
        af.download(NAME, manifest=manifest, cache_dir=cache, progress=False, force=True, allow_other_file=True)
    assert model_cache._read_pins(cache)[NAME][server.url + FILE] == pins  # never replaced


def _assert_is_the(model: af.ATSTModel, data: bytes) -> None:
    """The model holds the teacher of the official file ``data``."""
    ckpt = torch.load(__import__("io").BytesIO(data), weights_only=False)
    want = ckpt["state_dict"]["model.teacher.encoder.blocks.0.mlp.fc1.bias"]
    assert torch.equal(model.encoder.blocks[0].mlp.fc1.bias, want)


# ---------------------------------------------------------------------------- the file must be the model


def test_manifest_config_must_match_the_file(server, online, official_bytes, tmp_path):
    manifest = _serve(server, official_bytes)
    manifest["models"][0]["config"]["embed_dim"] = 768
    with pytest.raises(CheckpointError, match="embed_dim 48"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    _assert_clean(tmp_path)


def test_a_clip_file_served_as_frame_is_refused(server, online, tmp_path_factory, tmp_path):
    clip = _bytes_of(tmp_path_factory, make_lightning_pretrain("clip", compact=True))
    manifest = _serve(server, clip, pin=None)  # unpinned: the conversion's own checks must catch it
    with pytest.raises(CheckpointError, match="ATST-Clip encoder.*ATST-Frame"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    _assert_clean(tmp_path)


def test_a_file_of_another_layout_is_refused(server, online, tmp_path_factory, tmp_path):
    finetuned = _bytes_of(tmp_path_factory, make_finetuned())
    manifest = _serve(server, finetuned, pin=None)
    with pytest.raises(CheckpointError, match="'finetuned' file"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    _assert_clean(tmp_path)


def test_a_truncated_model_is_refused(server, online, tmp_path_factory, tmp_path):
    ckpt = make_lightning_pretrain("frame", compact=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if ".blocks.11." not in k}
    manifest = _serve(server, _bytes_of(tmp_path_factory, ckpt), pin=None)
    with pytest.raises(CheckpointError, match="11 blocks"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    _assert_clean(tmp_path)


class _Marks:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_pickle_runs_nothing_and_leaves_nothing(server, online, tmp_path_factory, tmp_path):
    marker = tmp_path / "it-ran"
    ckpt = make_lightning_pretrain("frame", compact=True)
    ckpt["hook"] = _Marks(marker)
    manifest = _serve(server, _bytes_of(tmp_path_factory, ckpt), pin=None)
    with pytest.raises(CheckpointError, match="system"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path / "cache", progress=False)
    assert not marker.exists()
    _assert_clean(tmp_path / "cache")


# ---------------------------------------------------------------------------- bad transfers leave nothing behind


def test_an_html_page_is_recognised(server, online, official_bytes, tmp_path):
    manifest = _serve(server, official_bytes, pin=None)
    server.modes[FILE] = "html"
    with pytest.raises(DownloadError, match="sent an HTML page instead of the file"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    _assert_clean(tmp_path)
    drive = fetch._refused_as_html("https://drive.google.com/uc?id=1bGJSZWlAIIJ6GL5Id5dW0PTB72DL-QDQ")
    assert drive.startswith("Google Drive refused the download (quota or permission page) — ")
    assert fetch.looks_like_html(QUOTA_PAGE) and not fetch.looks_like_html(official_bytes[:1024])


def test_google_drives_refusal_is_named(monkeypatch):
    import gdown.exceptions

    error = fetch._explain(gdown.exceptions.FileURLRetrievalError("Too many users have viewed it"), "https://drive.google.com/uc?id=x")
    assert str(error).startswith("Google Drive refused the download (quota or permission page) — Too many users")


def test_an_endless_body_is_cut_off(server, online, official_bytes, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "MAX_BYTES", 3 << 20)
    manifest = _serve(server, official_bytes, pin=None)
    server.modes[FILE] = "endless"
    with pytest.raises(DownloadError, match="sent more than 3145728 bytes"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    _assert_clean(tmp_path)
    pinned = _serve(server, official_bytes)  # a pinned size is the limit
    with pytest.raises(DownloadError, match=f"sent more than {len(official_bytes)} bytes"):
        af.load(NAME, manifest=pinned, cache_dir=tmp_path, progress=False)
    _assert_clean(tmp_path)


def test_a_silent_server_times_out_after_saying_what(server, online, official_bytes, tmp_path, capfd):
    manifest = _serve(server, official_bytes)
    server.modes[FILE] = "silent"
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match=rf"{server.host} sent (nothing for|less than 512 KiB in) \d s"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=True)
    assert time.monotonic() - t0 < 15
    assert f"downloading {NAME} (" in capfd.readouterr().err
    _assert_clean(tmp_path)


def test_a_slowloris_server_is_given_up(server, online, official_bytes, tmp_path):
    manifest = _serve(server, official_bytes, pin=None)
    server.modes[FILE] = "drip"
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="sent less than 512 KiB in 3 s"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    assert time.monotonic() - t0 < 15
    _assert_clean(tmp_path)


def test_http_errors_and_no_network_are_clear(server, online, official_bytes, tmp_path):
    import socket

    manifest = _serve(server, official_bytes)
    server.modes[FILE] = "404"
    with pytest.raises(DownloadError, match="answered HTTP 404"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    _assert_clean(tmp_path)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manifest = {"models": [tiny_entry(f"http://127.0.0.1:{port}/tiny.ckpt", (10, "2" * 64))]}
    with pytest.raises(DownloadError, match="could not download") as err:
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    assert "Check the network connection" in str(err.value) and "atst-features convert FILE" in str(err.value)
    assert "cannot reach" in str(err.value) and "Connection refused" in str(err.value)
    assert err.value.__cause__ is None and err.value.__context__ is None  # one traceback, not five
    _assert_clean(tmp_path)


def test_interrupted_download_resumes(server, online, official_bytes, tmp_path, reference):
    manifest = _serve(server, official_bytes)
    server.cuts = 2  # the transfer and its one retry
    with pytest.raises(DownloadError, match="again to resume"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    folder = tmp_path / "downloads" / NAME
    partial = list(folder.iterdir())
    assert len(partial) == 1 and partial[0].name != "tiny.ckpt"  # never a half file under the final name
    half = partial[0].stat().st_size
    assert 0 < half < len(official_bytes)
    model = af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    assert (FILE, f"bytes={half}-") in server.log
    _assert_is_tiny_frame(model, reference)


def test_a_resume_spliced_from_another_file_is_refused(server, online, official_bytes, other_bytes, tmp_path):
    manifest = _serve(server, official_bytes)
    server.cuts = 2
    with pytest.raises(DownloadError, match="again to resume"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    server.files[FILE] = other_bytes[: len(official_bytes)].ljust(len(official_bytes), b"\0")  # the file changed
    with pytest.raises(IntegrityError, match="nothing was cached"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    _assert_clean(tmp_path)


def test_an_unpinned_partial_is_not_kept(server, online, official_bytes, tmp_path):
    """Without a pin nothing would catch a splice: an interrupted unpinned transfer starts over."""
    manifest = _serve(server, official_bytes, pin=None)
    server.cuts = 2
    with pytest.raises(DownloadError, match="Check the network connection"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    _assert_clean(tmp_path)


def test_download_restarts_when_the_server_ignores_ranges(server, online, official_bytes, tmp_path, reference):
    manifest = _serve(server, official_bytes)
    server.cuts = 2
    with pytest.raises(DownloadError):
        af.download(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    server.honour_range = False
    model = af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    _assert_is_tiny_frame(model, reference)
    assert server.log[-1] == (FILE, None)  # started over


def test_force_clears_partial_downloads(server, online, official_bytes, tmp_path):
    manifest = _serve(server, official_bytes)
    af.download(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    folder = tmp_path / "downloads" / NAME
    folder.mkdir(parents=True)
    (folder / "tiny.ckptabcdefgh.part").write_bytes(b"stale bytes")
    server.log.clear()
    af.download(NAME, manifest=manifest, cache_dir=tmp_path, progress=False, force=True)
    assert server.log == [(FILE, None)] and not folder.exists()


def test_the_download_lock_times_out_naming_its_holder(server, online, official_bytes, tmp_path, monkeypatch):
    from filelock import FileLock

    manifest = _serve(server, official_bytes)
    locks = tmp_path / ".locks"
    locks.mkdir()
    (locks / f"{NAME}.holder").write_text(json.dumps({"pid": 4242, "host": "elsewhere", "since": "2024-01-02 03:04:05"}))
    monkeypatch.setattr(weights, "LOCK_TIMEOUT_S", 0.3)
    held = threading.Event()
    release = threading.Event()

    def hold():
        with FileLock(str(locks / f"{NAME}.lock")):
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        with pytest.raises(DownloadError, match=r"process 4242 on elsewhere \(since 2024-01-02 03:04:05\)"):
            af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    finally:
        release.set()
        holder.join()
    assert server.log == []


# ---------------------------------------------------------------------------- offline, and the way by hand


def test_offline_and_uncached_fails_at_once_saying_how(server, official_bytes, tmp_path, monkeypatch):
    manifest = _serve(server, official_bytes)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError) as err:
        af.load(NAME, manifest=manifest, cache_dir=tmp_path)
    message = str(err.value)
    assert server.url + FILE in message and "atst-features convert FILE" in message
    assert str(tmp_path / NAME) in message
    assert server.log == []  # not one request


def test_offline_download_command_is_one_short_message(server, official_bytes, tmp_path, monkeypatch, capsys):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(_serve(server, official_bytes)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _cli(["download", NAME, "--manifest", str(path), "--cache-dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("atst-features download: model 'tiny-frame' is not in the cache")
    assert "Traceback" not in err and len(err.splitlines()) <= 6


def test_the_by_hand_route_from_the_offline_message(server, official_bytes, tmp_path, reference, monkeypatch):
    """Download the file some other way, `atst-features convert FILE CACHE/NAME`, then load offline."""
    manifest = _serve(server, official_bytes)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError) as err:
        af.load(NAME, manifest=manifest, cache_dir=tmp_path)
    target = re.search(r"atst-features convert FILE (\S+)", str(err.value))[1]
    (tmp_path / "by-hand.ckpt").write_bytes(official_bytes)
    assert _cli(["convert", str(tmp_path / "by-hand.ckpt"), target, "--num-heads", str(TINY_HEADS)]) == 0
    _assert_is_tiny_frame(af.load(NAME, manifest=manifest, cache_dir=tmp_path), reference)
    tampered = manifest["models"][0]["source"]["sha256"] = "3" * 64  # the manifest trusts another file
    with pytest.raises(IntegrityError, match=tampered):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path)


def test_tampered_cache_is_refused_then_repaired(server, online, official_bytes, tmp_path):
    manifest = _serve(server, official_bytes)
    af.download(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    weights_file = tmp_path / NAME / "model.safetensors"
    recorded = weights.sha256_file(weights_file)
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights_file.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        af.load(NAME, manifest=manifest, cache_dir=tmp_path)
    assert recorded in str(err.value) and weights.sha256_file(weights_file) in str(err.value)
    assert f"atst-features download {NAME} --force" in str(err.value)
    af.download(NAME, manifest=manifest, cache_dir=tmp_path, progress=False, force=True)
    assert weights.sha256_file(weights_file) == recorded


def test_planted_files_in_the_cache_are_refused(server, online, official_bytes, tmp_path):
    manifest = _serve(server, official_bytes)
    entry = af.download(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    artifacts.save_head({"linear.weight": torch.zeros(2, 48), "linear.bias": torch.ones(2)}, "frame", entry, ["Gunshot", "x"])
    with pytest.raises(IntegrityError, match="head.safetensors' is not listed in checksums.json"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path)
    (entry / "head.safetensors").unlink()
    (entry / "labels.json").unlink()
    record = json.loads((entry / "checksums.json").read_text())
    (entry / "checksums.json").write_text(json.dumps(dict(record, files={})))
    with pytest.raises(IntegrityError, match="not listed"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path)


# ---------------------------------------------------------------------------- paths come from data


def test_manifest_names_and_file_names_cannot_be_paths(tmp_path):
    for bad in ("../outside", "/etc", ".hidden", "a/b"):
        with pytest.raises(ManifestError, match="not a plain name"):
            af.load(bad, manifest={"models": [dict(tiny_entry("http://127.0.0.1:9/x", None), name=bad)]}, cache_dir=tmp_path)
    entry = tiny_entry("http://127.0.0.1:9/x", None, filename="../../evil")
    with pytest.raises(ManifestError, match="file name"):
        af.load(NAME, manifest={"models": [entry]}, cache_dir=tmp_path)


def test_nothing_outside_the_cache_is_written_or_removed(server, online, official_bytes, tmp_path):
    outside = tmp_path / "precious"
    (outside / NAME).mkdir(parents=True)
    (outside / NAME / "keep.txt").write_text("mine")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "downloads").symlink_to(outside)  # a link planted in the cache
    manifest = _serve(server, official_bytes)
    server.modes[FILE] = "404"
    with pytest.raises(ManifestError, match="not inside the cache"):
        af.load(NAME, manifest=manifest, cache_dir=cache, progress=False)
    assert (outside / NAME / "keep.txt").read_text() == "mine"
    (cache / "downloads").unlink()
    (cache / NAME).symlink_to(outside / NAME)
    with pytest.raises(ManifestError, match="not inside the cache"):
        af.download(NAME, manifest=manifest, cache_dir=cache, progress=False, force=True)
    assert (outside / NAME / "keep.txt").read_text() == "mine"


def test_a_name_wins_over_a_folder_of_that_name(server, online, official_bytes, tmp_path, monkeypatch, tiny_dirs, reference):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_dirs["clip"], tmp_path / NAME)  # ./tiny-frame holds another model
    manifest = _serve(server, official_bytes)
    model = af.load(NAME, manifest=manifest, cache_dir=tmp_path / "cache", progress=False)
    assert model.config.family == "frame" and model.source == str(tmp_path / "cache" / NAME)
    _assert_is_tiny_frame(model, reference)
    folder = af.load(f"./{NAME}", manifest=manifest, cache_dir=tmp_path / "cache")
    assert folder.config.family == "clip" and folder.source == str(tmp_path / NAME)  # recorded resolved
    server.shutdown()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match=f"pass './{NAME}'"):  # the hint when the name cannot be had
        af.load(NAME, manifest=manifest, cache_dir=tmp_path / "other-cache")


# ---------------------------------------------------------------------------- the Hugging Face cache, offline


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def populate_hf_cache(hub_cache: Path, repo_id: str, revision: str, files: dict[str, bytes]) -> Path:
    """The Hub cache layout: blobs named by sha256 (LFS) or git sha1, snapshot symlinks, refs/main."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        blob = (
            repo
            / "blobs"
            / (hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else _git_blob_sha1(data))
        )
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / revision / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return repo


@pytest.fixture
def hf_home(tmp_path, monkeypatch, tiny_dirs):
    """A Hugging Face cache holding the converted tiny ATST-Frame at a pinned commit; offline."""
    revision = hashlib.sha1(b"tiny").hexdigest()
    files = {f: (tiny_dirs["frame"] / f).read_bytes() for f in ("config.json", "model.safetensors")}
    home = tmp_path / "hf"
    repo = populate_hf_cache(home / "hub", "org/tiny-frame", revision, files)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_block = {
        "repo_id": "org/tiny-frame",
        "revision": revision,
        "files": {f: hashlib.sha256(d).hexdigest() for f, d in files.items()},
    }
    return {"repo": repo, "revision": revision, "hub": hub_block, "home": home}


def _hub_manifest(hub_block: dict, **config) -> dict:
    entry = tiny_entry("https://example.invalid/tiny.ckpt", None)
    entry["config"].update(config)
    return {"models": [dict(entry, hub=hub_block)]}


def test_hub_loads_offline_from_the_cache(hf_home, reference, tmp_path):
    rev = hf_home["revision"]
    pinned = af.load(f"hf://org/tiny-frame@{rev}")
    _assert_is_tiny_frame(pinned, reference)
    assert pinned.source == f"hf://org/tiny-frame@{rev}" and pinned.weights_sha256 == hf_home["hub"]["files"]["model.safetensors"]
    with pytest.warns(UserWarning, match="can move"):  # a branch is accepted, with a warning
        branch = af.load("hf://org/tiny-frame")  # refs/main
    assert branch.source == f"hf://org/tiny-frame@{rev}"  # the commit it resolved to is recorded
    named = af.load(NAME, manifest=_hub_manifest(hf_home["hub"]), cache_dir=tmp_path / "unused")
    _assert_is_tiny_frame(named, reference)
    assert named.source == f"hf://org/tiny-frame@{rev}"
    assert weights.is_cached(NAME, manifest=_hub_manifest(hf_home["hub"]))
    assert not (tmp_path / "unused").exists()  # Hub files are used in place


def test_hub_revisions_cannot_be_paths(hf_home):
    for spec in ("hf://org/tiny-frame@../../x", "hf://org/tiny-frame@/etc", "hf://../x@main", "hf://org/tiny-frame@"):
        with pytest.raises(LoadArgumentError):
            af.load(spec)


def test_named_hub_models_read_only_pinned_files_and_are_checked(hf_home, tmp_path):
    snapshot = hf_home["repo"] / "snapshots" / hf_home["revision"]
    head_dir = tmp_path / "head"
    head_dir.mkdir()
    artifacts.save_head({"linear.weight": torch.zeros(2, 48), "linear.bias": torch.ones(2)}, "frame", head_dir, ["Gunshot", "x"])
    populate_hf_cache(hf_home["home"] / "hub", "org/tiny-frame", hf_home["revision"],
                      {f: (head_dir / f).read_bytes() for f in ("head.safetensors", "labels.json")})
    assert (snapshot / "head.safetensors").exists()
    named = af.load(NAME, manifest=_hub_manifest(hf_home["hub"]))
    assert named.head is None  # not pinned by the manifest: not read
    assert af.load(f"hf://org/tiny-frame@{hf_home['revision']}").head.labels == ["Gunshot", "x"]  # the repo's own
    with pytest.raises(CheckpointError, match="embed_dim 48"):  # the same architecture checks as downloads
        af.load(NAME, manifest=_hub_manifest(hf_home["hub"], embed_dim=768))


def test_tampered_hub_cache_is_refused(hf_home):
    blob = next(p for p in (hf_home["repo"] / "blobs").iterdir() if len(p.name) == 64)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=blob.name):
        af.load(f"hf://org/tiny-frame@{hf_home['revision']}")
    with pytest.raises(IntegrityError, match=hf_home["hub"]["files"]["model.safetensors"]):
        af.load(NAME, manifest=_hub_manifest(hf_home["hub"]))
    config_blob = next(p for p in (hf_home["repo"] / "blobs").iterdir() if len(p.name) == 40)
    config_blob.write_text(config_blob.read_text().replace('"depth": 12', '"depth": 11'))
    with pytest.raises(IntegrityError, match="git blob hash"):  # small files are checked by their git hash
        af.load(f"hf://org/tiny-frame@{hf_home['revision']}")


def test_uncached_hub_revision_offline(hf_home):
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        af.load(f"hf://org/not-cached@{'a' * 40}")
    other = dict(hf_home["hub"], revision="b" * 40)
    with pytest.raises(DownloadError, match="atst-features convert"):
        af.load(NAME, manifest=_hub_manifest(other))


# ---------------------------------------------------------------------------- publishing (maintainers), no network


class FakeHfApi:
    """Records what publishing sends; ``upload_folder`` answers like the Hub with a commit id."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kw):
        folder = Path(folder_path)
        uploaded = {p.name: p.read_bytes() for p in folder.iterdir()}
        FakeHfApi.calls.append(("upload_folder", repo_id, uploaded, commit_message))
        return argparse.Namespace(oid="c" * 40, commit_url=f"https://huggingface.co/{repo_id}/commit/{'c' * 40}")


def test_publish_uploads_files_and_a_model_card(tmp_path, monkeypatch, capsys):
    src = tmp_path / "strong.ckpt"
    torch.save(make_finetuned(), src)
    out = af.convert_checkpoint(src, tmp_path / "model", num_heads=TINY_HEADS, labels=[f"c{i}" for i in range(5)])
    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    assert _cli(["publish", str(out), "--repo-id", "org/atst-test", "--name", "atst-frame-base-as-strong"]) == 0
    block = json.loads(capsys.readouterr().out)["hub"]
    assert block["repo_id"] == "org/atst-test" and re.fullmatch(r"[0-9a-f]{40}", block["revision"])
    assert block["files"] == {
        f: weights.sha256_file(out / f) for f in ("config.json", "model.safetensors", "head.safetensors", "labels.json")
    }
    (kind, repo_id, private, exist_ok), upload = FakeHfApi.calls[0], FakeHfApi.calls[1]
    assert (kind, repo_id, private, exist_ok) == ("create_repo", "org/atst-test", False, True)
    uploaded = upload[2]
    assert set(uploaded) == {"README.md", "config.json", "model.safetensors", "head.safetensors", "labels.json"}
    assert uploaded["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = uploaded["README.md"].decode()
    assert card.startswith("---\n") and "library_name: atst-features" in card
    assert "https://drive.google.com/file/d/1RWjnEnkDb-7fmNlqIcM-MovTnddOzLsh/view" in card  # source
    assert "Not stated by the authors" in card  # licence of this checkpoint
    assert "Self-Supervised Audio Teacher-Student Transformer" in card and "@article{" in card  # citation


def test_model_card_of_a_cc_by_checkpoint():
    entry = weights.manifest()["atst-frame-base"]
    card = hub.model_card(entry, entry["config"], {"model.safetensors": "f" * 64})
    assert "license: cc-by-4.0" in card and "https://creativecommons.org/licenses/by/4.0/" in card
    assert "Xian Li, Nian Shao, Xiaofei Li" in card and "Converted by atst-features" in card  # CC BY's attribution
    assert "doi = {10.1109/TASLP.2024.3352248}" in card and "f" * 64 in card


def test_publish_refuses_a_damaged_directory(tmp_path, tiny_dirs):
    import shutil

    out = shutil.copytree(tiny_dirs["frame"], tmp_path / "m")
    (out / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(IntegrityError):
        hub.publish(out, "org/x", api=FakeHfApi())


def test_list_and_download_commands(server, online, official_bytes, tmp_path, capsys):
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps(_serve(server, official_bytes)))
    cache = tmp_path / "cache"
    assert _cli(["list", "--manifest", str(manifest_path), "--cache-dir", str(cache)]) == 0
    assert re.search(rf"{NAME}\s+frame\s.*\bnot stated\s+pinned\s+no\b", capsys.readouterr().out)
    assert _cli(["download", NAME, "--manifest", str(manifest_path), "--cache-dir", str(cache), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / NAME)
    assert _cli(["list", "--manifest", str(manifest_path), "--cache-dir", str(cache)]) == 0
    assert re.search(rf"{NAME}\s+frame\s.*\byes\b", capsys.readouterr().out)
    assert _cli(["download", "no-such-model", "--manifest", str(manifest_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("atst-features download: 'no-such-model' is not a known model") and "known names" in err
    assert _cli(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in af.list_models())
    assert re.search(r"atst-frame-base\s.*CC-BY-4\.0\s+pinned\s", listed)


def test_every_loader_error_is_a_load_error():
    from atst_features import errors

    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) >= 8 and all(issubclass(c, LoadError) for c in classes)
    assert weights.DownloadError is fetch.DownloadError is DownloadError
    assert af.convert.CheckpointError is artifacts.CheckpointError is CheckpointError
