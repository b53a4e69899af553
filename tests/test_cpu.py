"""CPU choices: dtype="auto", the measured GEMM path (equal to the default one), loading without
random initialisation or a second hash, the worker default, and the backends' argument checks and
missing-extra error (which need no ONNX package)."""

from __future__ import annotations

import sys

import pytest
import torch

import atst_features as af
from atst_features import artifacts, cli, cpu, frontend
from atst_features.batch import run as batch_run
from atst_features.errors import LoadArgumentError
from atst_features.model import Linear

from conftest import CLIPS

SR = frontend.SAMPLE_RATE


def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it():
    cpu_dev = torch.device("cpu")
    for flags, want in (({"avx512f", "avx512_bf16"}, torch.bfloat16), ({"amx_bf16"}, torch.bfloat16),
                        ({"avx512f", "avx512_vnni"}, torch.float32), (set(), torch.float32)):
        dtype, why = cpu.auto_dtype(cpu_dev, frozenset(flags))
        assert dtype == want and why.startswith("auto: ") and str(want).removeprefix("torch.") in why
    assert cpu.native_bf16(frozenset({"avx512_bf16"})) and not cpu.native_bf16(frozenset({"avx2"}))


def test_load_with_auto_dtype_says_what_it_chose(tiny_dirs):
    model = af.load(tiny_dirs["frame"], dtype="auto")
    want, why = cpu.auto_dtype(torch.device("cpu"))
    assert model.dtype == want and model.choices["dtype"] == why
    assert "GEMM" in model.choices["gemm"] or "oneDNN" in model.choices["gemm"]
    assert af.load(tiny_dirs["frame"]).choices.keys() == {"gemm"}  # an explicit dtype: nothing to say


def _set_onednn(model: af.ATSTModel, on: bool) -> None:
    for m in model.encoder.modules():
        if isinstance(m, Linear):
            m.onednn = on


@pytest.mark.skipif(not cpu._onednn_available(), reason="this torch build has no oneDNN linear")
@pytest.mark.parametrize("family", ["frame", "clip"])
def test_the_onednn_gemm_equals_the_default_one(tiny_dirs, reference, family):
    model = af.load(tiny_dirs[family])
    wavs = [reference[f"{n}.wav"] for n in CLIPS]
    out = {}
    for on in (False, True):
        _set_onednn(model, on)
        out[on] = model.embed_frames(wavs, SR, batch_size=3), model.embed_clip(wavs, SR, batch_size=3)
    for a, b in zip(out[False][0], out[True][0]):
        torch.testing.assert_close(b.embeddings, a.embeddings, atol=1e-5, rtol=0)
    for a, b in zip(out[False][1], out[True][1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    if family == "frame":  # and the official reference
        torch.testing.assert_close(out[True][1][2], reference["exact_10s.frame.scene.last12"], atol=1e-4, rtol=0)


def test_the_onednn_path_leaves_autograd_alone():
    with torch.device("meta"):
        layer = Linear(8, 4)
    layer.load_state_dict({"weight": torch.randn(4, 8), "bias": torch.zeros(4)}, assign=True)
    layer.onednn = True
    x = torch.randn(3, 8)
    y = layer(x, activation="gelu")
    assert y.requires_grad  # the autograd path: F.linear + GELU
    with torch.inference_mode():
        torch.testing.assert_close(layer(x, activation="gelu"), y.detach(), atol=1e-5, rtol=0)


def test_the_gemm_check_is_measured_once_per_shape(tiny_dirs):
    model = af.load(tiny_dirs["clip"])
    before = cpu._measure.cache_info().hits
    said = cpu.choose_gemm(model.encoder)
    assert cpu._measure.cache_info().hits == before + 1 and said == model.choices["gemm"]
    flags = {m.onednn for m in model.encoder.modules() if isinstance(m, Linear)}
    assert flags == {said.startswith("oneDNN")}


def test_loading_draws_no_random_numbers_and_hashes_the_weights_once(tiny_dirs, monkeypatch):
    hashed = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    torch.manual_seed(0)
    want = torch.rand(4)
    torch.manual_seed(0)
    model = af.load(tiny_dirs["frame"])
    assert torch.equal(torch.rand(4), want)  # built on the meta device: no initialisation ran
    assert [p for p in hashed if p.endswith(artifacts.WEIGHTS_NAME)] == [str(tiny_dirs["frame"] / artifacts.WEIGHTS_NAME)]
    assert model.weights_sha256 == real(tiny_dirs["frame"] / artifacts.WEIGHTS_NAME)


def test_no_decoding_workers_by_default_on_two_cpus(monkeypatch):
    for cpus, want in ((1, 0), (2, 0), (3, 2), (16, 8)):
        monkeypatch.setattr(batch_run.os, "cpu_count", lambda c=cpus: c)
        assert batch_run._default_workers() == want


def test_backends_are_checked_before_loading(tiny_dirs):
    with pytest.raises(LoadArgumentError, match="not supported"):
        af.load(tiny_dirs["frame"], backend="tensorrt")
    with pytest.raises(LoadArgumentError, match="float32"):
        af.load(tiny_dirs["frame"], dtype="bfloat16", backend="onnxruntime")


@pytest.mark.parametrize("missing", ["onnxruntime", "onnx"])
def test_a_missing_onnx_extra_is_named(tiny_dirs, tmp_path, monkeypatch, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import fails, as without the extra
    with pytest.raises(ImportError, match=r"pip install 'atst-features\[onnx\]'"):
        af.load(tiny_dirs["frame"], backend="onnxruntime-int8")
    src = tmp_path / "in"
    src.mkdir()
    argv = ["embed", str(src), "--out", str(tmp_path / "out"), "--model", str(tiny_dirs["frame"]),
            "--backend", "onnxruntime", "--no-progress"]
    assert cli.main(argv) == 2
    assert "atst-features[onnx]" in capsys.readouterr().err
