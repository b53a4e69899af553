"""Named models without the internet: a local HTTP server, the Hugging Face cache on disk, publishing.

The download path is the real one (gdown, progress bar, sha256, temporary file + move, convert,
cache); only the URL and hash come from a test manifest passed to ``load(name, manifest=...)``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import re
import threading
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from test_convert import TINY_HEADS, make_finetuned, make_lightning_pretrain

import atst_features as af
from atst_features import cli, hub, weights
from atst_features.model import ATSTConfig

NAME = "tiny-frame"
SERVER_TIMEOUT_S = 10


# ---------------------------------------------------------------------------- a local file server


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range: bytes=N-`` unless told not to; can cut a transfer."""

    timeout = SERVER_TIMEOUT_S

    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and srv.honour_range:
            start, status = int(m[1]), 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        try:
            if srv.cut_next:  # send half, then hang up: an interrupted download
                srv.cut_next = False
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client closed early (it may, when resuming)
            pass

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.log, srv.honour_range, srv.cut_next = {}, [], True, False
    srv.daemon_threads = True
    thread = threading.Thread(target=functools.partial(srv.serve_forever, poll_interval=0.05), daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=SERVER_TIMEOUT_S)


@pytest.fixture
def online(monkeypatch):
    """Downloads allowed, whatever the environment running the tests says."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def official_bytes(tmp_path_factory) -> bytes:
    """A synthesized official ATST-Frame pretraining file (tiny48 encoder in the real key layout)."""
    path = tmp_path_factory.mktemp("official") / "tiny.ckpt"
    torch.save(make_lightning_pretrain("frame", compact=True), path)
    return path.read_bytes()


def tiny_entry(url: str, sha256: str | None, **source) -> dict:
    cfg = ATSTConfig(family="frame", embed_dim=48, depth=12, num_heads=TINY_HEADS).to_dict()
    return {
        "name": NAME,
        "family": "frame",
        "arch": None,
        "config": cfg,
        "head": None,
        "source": {
            "url": url,
            "page": None,
            "filename": "tiny.ckpt",
            "format": "lightning-pretrain",
            "size": None,
            "sha256": sha256,
            "reported": None,
            **source,
        },
        "hub": {"repo_id": None, "revision": None, "files": {}},
    }


def _serve(server, data: bytes, sha256: str | None = "auto", **source) -> dict:
    server.files["/files/tiny.ckpt"] = data
    sha = hashlib.sha256(data).hexdigest() if sha256 == "auto" else sha256
    return {"models": [tiny_entry(server.url + "/files/tiny.ckpt", sha, **source)]}


def _assert_is_tiny_frame(model: af.ATSTModel, reference) -> None:
    got = model.embed_frames(reference["chirp_3s.wav"], 16000).embeddings
    torch.testing.assert_close(got, reference["chirp_3s.frame.frames.last12"], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- download, convert, cache, offline


def test_download_convert_cache_then_offline(server, online, official_bytes, tmp_path, reference, capfd, monkeypatch):
    manifest = _serve(server, official_bytes)
    cache = tmp_path / "cache"
    model = af.load(NAME, manifest=manifest, cache_dir=cache)
    assert "100%" in capfd.readouterr().err  # the progress bar ran to the end
    assert model.name == NAME
    _assert_is_tiny_frame(model, reference)
    assert len(server.log) == 1
    entry = cache / NAME
    assert {p.name for p in entry.iterdir()} == {"config.json", "model.safetensors", "checksums.json"}
    record = json.loads((entry / "checksums.json").read_text())
    assert record["source"]["sha256"] == hashlib.sha256(official_bytes).hexdigest()
    assert record["source"]["name"] == NAME and record["source"]["url"].endswith("/files/tiny.ckpt")
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


def test_wrong_sha256_is_an_error_naming_both(server, online, official_bytes, tmp_path):
    manifest = _serve(server, official_bytes, sha256="0" * 64)
    with pytest.raises(weights.IntegrityError) as err:
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    message = str(err.value)
    assert "0" * 64 in message and hashlib.sha256(official_bytes).hexdigest() in message
    assert "atst-features convert" in message  # the way out
    assert not (tmp_path / NAME).exists() and not (tmp_path / "downloads" / NAME / "tiny.ckpt").exists()


def test_reported_hash_mismatch_only_warns(server, online, official_bytes, tmp_path):
    manifest = _serve(server, official_bytes, sha256=None, reported={"sha256": "1" * 64, "verified": False})
    with pytest.warns(UserWarning, match="1" * 64):
        model = af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    assert model.config.embed_dim == 48


def test_manifest_config_must_match_the_file(server, online, official_bytes, tmp_path):
    manifest = _serve(server, official_bytes)
    manifest["models"][0]["config"]["embed_dim"] = 768
    with pytest.raises(af.convert.CheckpointError, match="embed_dim 48"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    assert not (tmp_path / NAME).exists()


def test_offline_and_uncached_fails_at_once_saying_how(server, official_bytes, tmp_path, monkeypatch):
    manifest = _serve(server, official_bytes)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(weights.DownloadError) as err:
        af.load(NAME, manifest=manifest, cache_dir=tmp_path)
    message = str(err.value)
    assert server.url + "/files/tiny.ckpt" in message and "atst-features convert FILE" in message
    assert str(tmp_path / NAME) in message
    assert server.log == []  # not one request


def test_the_by_hand_route_from_the_offline_message(server, official_bytes, tmp_path, reference, monkeypatch):
    """Download the file some other way, `atst-features convert FILE CACHE/NAME`, then load offline."""
    manifest = _serve(server, official_bytes)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(weights.DownloadError) as err:
        af.load(NAME, manifest=manifest, cache_dir=tmp_path)
    target = re.search(r"atst-features convert FILE (\S+)", str(err.value))[1]
    (tmp_path / "by-hand.ckpt").write_bytes(official_bytes)
    assert _cli(["convert", str(tmp_path / "by-hand.ckpt"), target, "--num-heads", str(TINY_HEADS)]) == 0
    _assert_is_tiny_frame(af.load(NAME, manifest=manifest, cache_dir=tmp_path), reference)
    tampered = manifest["models"][0]["source"]["sha256"] = "3" * 64  # the manifest trusts another file
    with pytest.raises(weights.IntegrityError, match=tampered):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path)


def test_no_network_is_a_clear_error(online, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manifest = {"models": [tiny_entry(f"http://127.0.0.1:{port}/tiny.ckpt", "2" * 64)]}
    with pytest.raises(weights.DownloadError, match="could not download") as err:
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    assert "Check the network connection" in str(err.value) and "atst-features convert FILE" in str(err.value)
    assert not (tmp_path / "downloads" / NAME).exists()  # nothing half-done left behind


def test_tampered_cache_is_refused_then_repaired(server, online, official_bytes, tmp_path):
    manifest = _serve(server, official_bytes)
    af.download(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    weights_file = tmp_path / NAME / "model.safetensors"
    recorded = weights.sha256_file(weights_file)
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights_file.write_bytes(bytes(data))
    with pytest.raises(weights.IntegrityError) as err:
        af.load(NAME, manifest=manifest, cache_dir=tmp_path)
    assert recorded in str(err.value) and weights.sha256_file(weights_file) in str(err.value)
    assert f"atst-features download {NAME} --force" in str(err.value)
    af.download(NAME, manifest=manifest, cache_dir=tmp_path, progress=False, force=True)
    assert weights.sha256_file(weights_file) == recorded


def test_interrupted_download_resumes(server, online, official_bytes, tmp_path, reference):
    manifest = _serve(server, official_bytes)
    server.cut_next = True
    with pytest.raises(weights.DownloadError, match="again to resume"):
        af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    folder = tmp_path / "downloads" / NAME
    partial = [p for p in folder.iterdir()]
    assert len(partial) == 1 and partial[0].name != "tiny.ckpt"  # never a half file under the final name
    half = partial[0].stat().st_size
    assert 0 < half < len(official_bytes)
    model = af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    assert ("/files/tiny.ckpt", f"bytes={half}-") in server.log
    _assert_is_tiny_frame(model, reference)


def test_download_restarts_when_the_server_ignores_ranges(server, online, official_bytes, tmp_path, reference):
    manifest = _serve(server, official_bytes)
    server.cut_next = True
    with pytest.raises(weights.DownloadError):
        af.download(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    server.honour_range = False
    model = af.load(NAME, manifest=manifest, cache_dir=tmp_path, progress=False)
    _assert_is_tiny_frame(model, reference)
    assert server.log[-1] == ("/files/tiny.ckpt", None)  # started over


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
    return {"repo": repo, "revision": revision, "hub": hub_block}


def test_hub_loads_offline_from_the_cache(hf_home, reference, tmp_path):
    rev = hf_home["revision"]
    _assert_is_tiny_frame(af.load(f"hf://org/tiny-frame@{rev}"), reference)
    _assert_is_tiny_frame(af.load("hf://org/tiny-frame"), reference)  # refs/main
    manifest = {"models": [dict(tiny_entry("https://example.invalid/tiny.ckpt", None), hub=hf_home["hub"])]}
    named = af.load(NAME, manifest=manifest, cache_dir=tmp_path / "unused")
    _assert_is_tiny_frame(named, reference)
    assert weights.is_cached(NAME, manifest=manifest)
    assert not (tmp_path / "unused").exists()  # Hub files are used in place


def test_tampered_hub_cache_is_refused(hf_home):
    blob = next(p for p in (hf_home["repo"] / "blobs").iterdir() if len(p.name) == 64)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(weights.IntegrityError, match=blob.name):
        af.load(f"hf://org/tiny-frame@{hf_home['revision']}")
    manifest = {"models": [dict(tiny_entry("https://example.invalid/tiny.ckpt", None), hub=hf_home["hub"])]}
    with pytest.raises(weights.IntegrityError, match=hf_home["hub"]["files"]["model.safetensors"]):
        af.load(NAME, manifest=manifest)


def test_uncached_hub_revision_offline(hf_home):
    with pytest.raises(weights.DownloadError, match="HF_HUB_OFFLINE"):
        af.load("hf://org/not-cached")
    other = dict(hf_home["hub"], revision="b" * 40)
    manifest = {"models": [dict(tiny_entry("https://example.invalid/tiny.ckpt", None), hub=other)]}
    with pytest.raises(weights.DownloadError, match="atst-features convert"):
        af.load(NAME, manifest=manifest)


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


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="atst-features")
    cli.add_weights_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


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


def test_model_card_of_an_mit_checkpoint():
    entry = weights.manifest()["atst-frame-base"]
    card = hub.model_card(entry, entry["config"], {"model.safetensors": "f" * 64})
    assert "license: mit" in card and "Copyright (c) 2023 Audio-WestlakeU" in card
    assert "doi = {10.1109/TASLP.2024.3352248}" in card and "f" * 64 in card


def test_publish_refuses_a_damaged_directory(tmp_path, tiny_dirs):
    import shutil

    out = shutil.copytree(tiny_dirs["frame"], tmp_path / "m")
    (out / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(weights.IntegrityError):
        hub.publish(out, "org/x", api=FakeHfApi())


def test_list_and_download_commands(server, online, official_bytes, tmp_path, capsys):
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps(_serve(server, official_bytes)))
    cache = tmp_path / "cache"
    assert _cli(["list", "--manifest", str(manifest_path), "--cache-dir", str(cache)]) == 0
    assert re.search(rf"{NAME}\s+frame\s.*\bno\b", capsys.readouterr().out)
    assert _cli(["download", NAME, "--manifest", str(manifest_path), "--cache-dir", str(cache), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / NAME)
    assert _cli(["list", "--manifest", str(manifest_path), "--cache-dir", str(cache)]) == 0
    assert re.search(rf"{NAME}\s+frame\s.*\byes\b", capsys.readouterr().out)
    assert _cli(["download", "no-such-model", "--manifest", str(manifest_path)]) == 1
    assert "known names" in capsys.readouterr().err
    assert _cli(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in af.list_models())
