"""The weights manifest: every published checkpoint, nothing invented, consistent with the code."""

from __future__ import annotations

import dataclasses
import json
import re
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import pytest

from atst_features import convert, frontend, weights
from atst_features.embed import DEFAULT_MODEL
from atst_features.model import ATSTConfig

ROOT_MANIFEST = Path(__file__).parents[1] / "weights_manifest.json"
RAW = json.loads(ROOT_MANIFEST.read_text(encoding="utf-8"))
ENTRIES = RAW["models"]
NAMES = [e["name"] for e in ENTRIES]
SHA256 = re.compile(r"[0-9a-f]{64}")
REVISION = re.compile(r"[0-9a-f]{40}")
DRIVE_ID = re.compile(r"[A-Za-z0-9_-]{25,}")
FIELDS = {
    "name",
    "family",
    "arch",
    "description",
    "config",
    "frontend",
    "outputs",
    "head",
    "source",
    "licence",
    "papers",
    "hub",
    "notes",
}
SOURCE_FIELDS = {"url", "page", "drive_id", "filename", "format", "size", "sha256", "reported", "published_in"}
LAYOUTS = {layout.name for layout in convert.LAYOUTS}
OFFICIAL_HOSTS = {"checkpointstorage.oss-cn-beijing.aliyuncs.com", "drive.google.com"}
AUTHORS_REPOS = ("https://github.com/Audio-WestlakeU/audiossl", "https://github.com/Audio-WestlakeU/ATST-SED")


def by_name(name: str) -> dict:
    return next(e for e in ENTRIES if e["name"] == name)


def test_the_packaged_manifest_is_the_root_manifest():
    packaged = resources.files("atst_features") / "weights_manifest.json"
    assert json.loads(packaged.read_text(encoding="utf-8")) == RAW
    assert weights.manifest() == {e["name"]: e for e in ENTRIES}


def test_every_published_checkpoint_is_listed():
    assert len(NAMES) == len(set(NAMES))
    assert {
        "atst-clip-small",
        "atst-clip-base",
        "atst-frame-small",
        "atst-frame-base",
        "atst-frame-base-as2m",
        "atst-frame-base-as-strong",
        "atst-sed-stage2-encoder",
    } <= set(NAMES)
    assert DEFAULT_MODEL in NAMES


@pytest.mark.parametrize("entry", ENTRIES, ids=NAMES)
def test_entry_fields_and_config(entry):
    assert set(entry) == FIELDS
    assert entry["family"] in ("clip", "frame") and entry["arch"] in ("small", "base")
    cfg = ATSTConfig.from_dict(entry["config"])
    assert cfg.family == entry["family"]
    width, heads = {"small": (384, 6), "base": (768, 12)}[entry["arch"]]
    assert (cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.max_tokens) == (width, heads, 12, 250)
    assert convert.infer_num_heads(cfg.embed_dim, entry["arch"]) == cfg.num_heads
    out = entry["outputs"]
    per_clip = 2 if cfg.has_cls else 1
    assert out["embed_dim"] == cfg.embed_dim and out["blocks"] == cfg.depth
    assert out["frame_dim"] == {"all": cfg.depth * cfg.embed_dim, "last": cfg.embed_dim}
    assert out["clip_dim"] == {"all": per_clip * cfg.depth * cfg.embed_dim, "last": per_clip * cfg.embed_dim}
    assert out["token_s"] == cfg.patch_w * frontend.HOP_LENGTH / frontend.SAMPLE_RATE


@pytest.mark.parametrize("entry", ENTRIES, ids=NAMES)
def test_frontend_contract_is_the_library_front_end(entry):
    fe = entry["frontend"]
    expected = {
        "sample_rate": frontend.SAMPLE_RATE,
        "n_fft": frontend.N_FFT,
        "win_length": frontend.WIN_LENGTH,
        "hop_length": frontend.HOP_LENGTH,
        "n_mels": frontend.N_MELS,
        "f_min": frontend.F_MIN,
        "f_max": frontend.F_MAX,
        "top_db": frontend.TOP_DB,
        "amin": frontend.AMIN,
        "minmax_db": [frontend.DB_MIN, frontend.DB_MAX],
        "min_samples": frontend.MIN_SAMPLES,
    }
    assert {k: fe[k] for k in expected} == expected
    if entry["name"].startswith("atst-sed"):
        assert fe["db_clamp"] == [-50.0, 80.0]  # ATST-SED's extra clamp, recorded
    else:
        assert fe["db_clamp"] is None


@pytest.mark.parametrize("entry", ENTRIES, ids=NAMES)
def test_source_urls_formats_and_no_invented_hashes(entry):
    src = entry["source"]
    assert SOURCE_FIELDS <= set(src)
    url = urlparse(src["url"])
    assert url.scheme == "https" and url.netloc in OFFICIAL_HOSTS
    if url.netloc == "drive.google.com":
        assert DRIVE_ID.fullmatch(src["drive_id"])
        assert src["url"] == f"https://drive.google.com/uc?id={src['drive_id']}"
        assert src["page"] == f"https://drive.google.com/file/d/{src['drive_id']}/view"
    else:
        assert src["drive_id"] is None and src["url"].endswith("/" + src["filename"])
    assert src["published_in"].startswith(AUTHORS_REPOS)
    if src["format"] is None:  # not inspected: the candidates must all be known layouts
        assert set(src["possible_formats"]) <= LAYOUTS
    else:
        assert src["format"] in LAYOUTS
    # Trusted values only when verified; third-party values live under "reported", marked unverified.
    if not src.get("verified"):
        assert src["sha256"] is None and src["size"] is None
    reported = src["reported"]
    if reported is not None:
        assert reported["verified"] is False and SHA256.fullmatch(reported["sha256"]) and reported["size"] > 0
        assert "third-party" in reported["by"]


def test_reported_values_are_those_recorded_in_the_facts():
    """The four third-party values, transcribed once; no other checkpoint has any."""
    reported = {e["name"]: (e["source"]["reported"] or {}).get("sha256") for e in ENTRIES}
    assert reported["atst-clip-small"].startswith("fcadd641") and reported["atst-clip-base"].startswith("7b20168c")
    assert reported["atst-frame-small"].startswith("1d85b290") and reported["atst-frame-base"].startswith("9f812544")
    assert {n for n, h in reported.items() if h} == {
        "atst-clip-small",
        "atst-clip-base",
        "atst-frame-small",
        "atst-frame-base",
    }


@pytest.mark.parametrize("entry", ENTRIES, ids=NAMES)
def test_licence_and_papers(entry):
    lic = entry["licence"]
    assert lic["spdx"] in ("MIT", None)
    assert lic["holder"] == "Audio-WestlakeU" and lic["url"].startswith(AUTHORS_REPOS)
    assert lic["statement"] and lic["attribution"]
    if lic["spdx"] is None:
        assert "no licence is stated" in lic["statement"]
    assert entry["papers"]
    for paper in entry["papers"]:
        assert paper["title"] and paper["authors"] and isinstance(paper["year"], int)
        assert re.fullmatch(r"https://arxiv\.org/abs/\d{4}\.\d{5}", paper["url"])


@pytest.mark.parametrize("entry", ENTRIES, ids=NAMES)
def test_hub_block_is_empty_or_pinned(entry):
    hub = entry["hub"]
    assert set(hub) == {"repo_id", "revision", "files"}
    if hub["repo_id"] is None:
        assert hub["revision"] is None and hub["files"] == {}
        assert not weights.hub_published(entry)
    else:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", hub["repo_id"]) and REVISION.fullmatch(hub["revision"])
        assert {"config.json", "model.safetensors"} <= set(hub["files"])
        assert all(SHA256.fullmatch(h) for h in hub["files"].values())


def test_heads():
    strong = by_name("atst-frame-base-as-strong")["head"]
    assert (strong["level"], strong["num_classes"], strong["norm"]) == ("frame", 407, False)
    assert strong["labels"] is None  # the official 407-MID list is not bundled
    assert by_name("atst-frame-base-as-strong")["source"]["format"] == "finetuned"
    for entry in ENTRIES:
        if entry["head"] is not None:
            assert entry["head"]["level"] in ("clip", "frame")


def test_clip_chunk_is_left_to_the_file():
    """ATST-Clip's pooling chunk comes from the file's crop length, so the manifest does not fix it."""
    for name in ("atst-clip-small", "atst-clip-base"):
        assert by_name(name)["config"]["clip_chunk_frames"] is None
    frame = ATSTConfig.from_dict(by_name("atst-frame-base")["config"])
    assert dataclasses.asdict(frame)["clip_chunk_frames"] == frame.spec_w
