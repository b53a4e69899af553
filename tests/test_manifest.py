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
    "mirrors",
    "licence",
    "papers",
    "hub",
    "notes",
}
SOURCE_FIELDS = {"url", "page", "drive_id", "filename", "format", "size", "sha256", "pinned_by", "published_in"}
LAYOUTS = {layout.name for layout in convert.LAYOUTS}
OFFICIAL_HOSTS = {"checkpointstorage.oss-cn-beijing.aliyuncs.com", "drive.google.com"}
STABLE_HOSTS = {"github.com", "huggingface.co"}  # second sources
AUTHORS_REPOS = ("https://github.com/Audio-WestlakeU/audiossl", "https://github.com/Audio-WestlakeU/ATST-SED")
PRETRAINEDSED = "https://github.com/fschmid56/PretrainedSED"
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SSL = ("atst-clip-small", "atst-clip-base", "atst-frame-small", "atst-frame-base")
CLAMPED = ("atst-sed-stage2-encoder", "atst-frame-base-strong", "atst-frame-base-weak")


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
    assert all(PLAIN_NAME.fullmatch(n) for n in NAMES)  # names become paths in the cache


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
    if entry["name"] in CLAMPED:
        assert fe["db_clamp"] == [-50.0, 80.0]  # ATST-SED's and PretrainedSED's extra clamp, recorded
    else:
        assert fe["db_clamp"] is None
    assert entry["config"]["db_clamp"] == fe["db_clamp"]  # the config carries it to the front end


def _sources(entry: dict) -> list[dict]:
    return [entry["source"], *entry["mirrors"]]


@pytest.mark.parametrize("entry", ENTRIES, ids=NAMES)
def test_source_urls_formats_and_pins(entry):
    for i, src in enumerate(_sources(entry)):
        assert set(src) - {"possible_formats"} == SOURCE_FIELDS
        url = urlparse(src["url"])
        assert url.scheme == "https" and url.netloc in OFFICIAL_HOSTS | STABLE_HOSTS
        if url.netloc == "drive.google.com":
            assert DRIVE_ID.fullmatch(src["drive_id"])
            assert src["url"] == f"https://drive.google.com/uc?id={src['drive_id']}"
            assert src["page"] == f"https://drive.google.com/file/d/{src['drive_id']}/view"
        else:
            assert src["drive_id"] is None and src["url"].endswith("/" + src["filename"])
        if url.netloc == "huggingface.co":  # a Hub file at a pinned commit, never a branch
            assert re.fullmatch(r"/[\w.-]+/[\w.-]+/resolve/[0-9a-f]{40}/[\w.-]+", url.path)
        assert src["filename"] is None or PLAIN_NAME.fullmatch(src["filename"])
        if url.netloc in OFFICIAL_HOSTS and i == 0:
            assert src["published_in"].startswith(AUTHORS_REPOS)
        else:
            assert src["published_in"].startswith((PRETRAINEDSED, "https://huggingface.co/"))
        if src["format"] is None:  # not inspected: the candidates must all be known layouts
            assert set(src["possible_formats"]) <= LAYOUTS
        else:
            assert src["format"] in LAYOUTS
        # A pin is size and sha256 together, with who recorded them; no pin: both null (trust on first use).
        if src["sha256"] is None:
            assert src["size"] is None and src["pinned_by"] is None
        else:
            assert SHA256.fullmatch(src["sha256"]) and src["size"] > 0 and "not re-computed" in src["pinned_by"]


def test_pins_are_those_recorded_in_the_facts():
    """The known values, transcribed once (third-party records of the released files); no other source has any."""
    pins = {(e["name"], s["url"].rsplit("/", 1)[-1]): (s["size"], s["sha256"]) for e in ENTRIES for s in _sources(e) if s["sha256"]}
    assert pins == {
        ("atst-clip-small", "small.ckpt"): (411_267_681, "fcadd6411881410d27cde47f4d540ef416aa59e0197b195cf3ee7a81885a5f4a"),
        ("atst-clip-base", "base.ckpt"): (1_459_530_207, "7b20168cae0d1488a0e3334f17ca1cefb9365cbaa2401c11aa98d6ffaa668496"),
        ("atst-frame-small", "uc?id=1xZoOTuxV415icYONYbeFQzgrmJQf4a4B"): (
            411_264_805,
            "1d85b290632dd26b8725f0ae73f53f990a898888cfc2c4794c3055a8130ff5f1",
        ),
        ("atst-frame-base", "uc?id=1bGJSZWlAIIJ6GL5Id5dW0PTB72DL-QDQ"): (
            1_459_523_813,
            "9f812544983add849f45ef03c4ce10184729adee082c0bdd347764f4835bb3da",
        ),
        ("atst-frame-base-strong", "ATST-F_strong_1.pt"): (
            344_480_550,
            "fbf2577958e3648d55ee8cea7e0e5260c4505fb0c13964e1ec81bc367cee5eda",
        ),
        ("atst-sed-stage2-encoder", "model.pth"): (346_657_710, "295e9c10c4ce4d3106d5110ff51fea04ddb2173302bd5b3d546a6eef6cb119ae"),
    }
    hub_copy = by_name("atst-sed-stage2-encoder")["mirrors"][0]["url"]
    assert "/igonzf/ATST-SED/resolve/2b93c03ab210f11132a40ef39ecc29c334ff87e2/" in hub_copy


def test_the_packaged_manifest_parses_with_its_checks():
    specs = weights.registry.manifest()
    assert [s.pinned for s in specs["atst-sed-stage2-encoder"].sources] == [True, False]  # pinned sources first
    assert specs["atst-frame-base-strong"].source.format == "pretrainedsed"


@pytest.mark.parametrize("entry", ENTRIES, ids=NAMES)
def test_licence_and_papers(entry):
    lic = entry["licence"]
    assert lic["statement"] and lic["attribution"]
    if entry["name"] in SSL:  # the authors' LICENSE of 2023-10-19: checkpoints CC BY 4.0, code MIT
        assert lic["spdx"] == "CC-BY-4.0" and lic["licence_url"] == "https://creativecommons.org/licenses/by/4.0/"
        assert lic["holder"] == "Audio-WestlakeU" and lic["url"].startswith(AUTHORS_REPOS)
        assert "CC BY 4.0" in lic["statement"] and lic["as_of"].startswith("2023-10-19")
        # what CC BY asks for: authors, title, source, licence link (and the changes made)
        title = {"atst-clip-small": "ATST-Clip small", "atst-clip-base": "ATST-Clip base"}.get(
            entry["name"], entry["name"].replace("atst-frame-", "ATST-Frame ")
        )
        for part in ("Xian Li", title, "https://github.com/Audio-WestlakeU/audiossl", lic["licence_url"], "Converted"):
            assert part in lic["attribution"], part
        assert "MIT" not in lic["statement"].split("...")[0]
    elif lic["spdx"] is None:
        assert lic["holder"] == "Audio-WestlakeU" and lic["url"].startswith(AUTHORS_REPOS)
        assert "no licence is stated" in lic["statement"] and "CC BY 4.0" in lic["attribution"]
    else:  # PretrainedSED's release
        assert lic["spdx"] == "MIT" and lic["url"].startswith(PRETRAINEDSED) and "CC BY 4.0" in lic["attribution"]
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
