"""The ONNX Runtime backend: the exported graph gives the official reference through the one engine,
int8 stays close to it, graphs are cached and checked, and the command line exports them.

Exports take seconds each (the dynamo exporter), so everything that exports the 12-block reference
encoders is marked slow; the fast set exports one 2-block encoder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import atst_features as af
from atst_features import cli, frontend, onnx_export
from atst_features.batch import embed_folder
from atst_features.model import ATSTConfig, ATSTEncoder
from atst_features.onnx_export import OnnxForward, attach_backend, export_onnx, graph_metadata

from conftest import CLIPS, DATA, TINY_HEADS

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SR = frontend.SAMPLE_RATE
EMB_TOL = 1e-4
# The int8 bound, against the float32 encoder on the reference clips (measured: per-frame min 0.99973,
# clip-vector min 0.99992 for both families; ATST-Frame base geometry: benchmarks/bench_cpu.py).
INT8_COSINE = 0.999  # per frame and block
INT8_CLIP_COSINE = 0.9995  # per clip vector


def close(actual, expected, tol: float = EMB_TOL) -> None:
    actual, expected = torch.as_tensor(np.asarray(actual)), torch.as_tensor(np.asarray(expected))
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


# ---------------------------------------------------------------------------- fast: a 2-block encoder


@pytest.fixture(scope="module")
def small_graph(tmp_path_factory):
    torch.manual_seed(0)
    encoder = ATSTEncoder(ATSTConfig(family="clip", embed_dim=48, depth=2, num_heads=3)).eval()
    path = export_onnx(encoder, tmp_path_factory.mktemp("onnx") / "small.onnx", weights_sha256="ab" * 32)
    return encoder, path


def test_the_graph_equals_forward_intermediates_padded_or_not(small_graph):
    encoder, path = small_graph
    forward = OnnxForward(path)
    assert forward.blocks == [0, 1] and not forward.int8 and forward.config == encoder.cfg
    mel = torch.randn(3, 64, 403)
    for n_tokens in (None, torch.tensor([100, 37, 1])):
        for blocks in ([1], [1, 0], [0, 1]):
            got = forward(mel, n_tokens, blocks)
            with torch.inference_mode():
                want = encoder.forward_intermediates(mel, n_tokens, blocks)
            close(got.cls, want.cls, 1e-5)
            close(got.tokens, want.tokens, 1e-5)


def test_the_graph_records_what_it_was_made_from(small_graph):
    encoder, path = small_graph
    meta = graph_metadata(path)
    assert meta["config"] == encoder.cfg.to_dict() and meta["blocks"] == [0, 1]
    assert meta["weights_sha256"] == "ab" * 32 and meta["int8"] is False and meta["format"] == onnx_export.GRAPH_FORMAT


def test_blocks_that_were_not_exported_are_refused(small_graph, tmp_path):
    encoder, _ = small_graph
    with pytest.raises(ValueError, match="distinct 0-based"):
        export_onnx(encoder, tmp_path / "x.onnx", blocks=[2])
    forward = OnnxForward(small_graph[1])
    with pytest.raises(ValueError, match="not exported"):
        forward(torch.randn(1, 64, 40), None, [5])


def test_backends_are_checked(tmp_path):
    torch.manual_seed(0)
    model = af.ATSTModel(ATSTEncoder(ATSTConfig(family="frame", embed_dim=48, depth=2, num_heads=3)))
    with pytest.raises(ValueError, match="not supported"):
        attach_backend(model, "tensorrt")
    model.to(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        attach_backend(model, "onnxruntime", tmp_path)
    model.to(dtype=torch.float32)
    model.use_forward(lambda *a: None, "onnxruntime")  # as attach_backend leaves it
    with pytest.raises(ValueError, match="compile"):
        model.compile()
    model.to(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="runs float32 on the CPU"):
        model.encode(torch.zeros(1, 64, 40), [10], [1])
    assert attach_backend(model.to(dtype=torch.float32), "torch").backend == "torch"


# ---------------------------------------------------------------------------- slow: the reference encoders


@pytest.fixture(scope="module")
def onnx_models(tiny_dirs, tmp_path_factory):
    """Both reference encoders on each ONNX backend (graphs cached in one folder)."""
    cache = tmp_path_factory.mktemp("graphs")
    out = {}
    for family in ("frame", "clip"):
        for backend in ("onnxruntime", "onnxruntime-int8"):
            out[family, backend] = attach_backend(af.load(tiny_dirs[family]), backend, cache)
    return out, cache


@pytest.mark.slow
@pytest.mark.parametrize("family", ["frame", "clip"])
def test_onnx_gives_the_official_embeddings_alone_and_in_a_padded_batch(onnx_models, reference, family):
    model = onnx_models[0][family, "onnxruntime"]
    wavs = [reference[f"{n}.wav"] for n in CLIPS]
    clips = model.embed_clip(wavs, SR, batch_size=3)  # padded passes (widths differ)
    for name, wav, vec in zip(CLIPS, wavs, clips):
        close(vec, reference[f"{name}.{family}.scene.last12"])
        close(model.embed_clip(wav, SR), vec)
        if family == "frame":
            close(model.embed_frames(wav, SR).embeddings, reference[f"{name}.frame.frames.last12"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["frame", "clip"])
def test_int8_stays_close_to_float32(onnx_models, tiny_dirs, reference, family):
    model, exact = onnx_models[0][family, "onnxruntime-int8"], af.load(tiny_dirs[family])
    wavs = [reference[f"{n}.wav"] for n in CLIPS]
    for got, want in zip(model.embed_frames(wavs, SR), exact.embed_frames(wavs, SR)):
        cos = F.cosine_similarity(got.embeddings.reshape(-1, 48), want.embeddings.reshape(-1, 48), dim=-1)
        assert cos.min() >= INT8_COSINE, cos.min()
    got, want = torch.stack(model.embed_clip(wavs, SR)), torch.stack(exact.embed_clip(wavs, SR))
    cos = F.cosine_similarity(got.double(), want.double(), dim=-1)
    assert cos.min() >= INT8_CLIP_COSINE, cos.min()


@pytest.mark.slow
def test_graphs_are_reused_checked_and_redone(onnx_models, tiny_dirs, monkeypatch):
    _, cache = onnx_models
    graphs = sorted(cache.glob("*.onnx"))
    assert len(graphs) == 4  # two families x float32 / int8
    for graph in graphs:
        assert json.loads(graph.with_suffix(".json").read_text())["sha256"] == onnx_export.sha256_file(graph)

    exported = []
    real = onnx_export.export_onnx
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: exported.append(k) or real(*a, **k))
    attach_backend(af.load(tiny_dirs["frame"]), "onnxruntime", cache)
    assert exported == []  # a cache hit
    records = {g: json.loads(g.with_suffix(".json").read_text()) for g in graphs}
    (target,) = [g for g, r in records.items() if r["config"]["family"] == "frame" and not r["int8"]]
    target.write_bytes(target.read_bytes()[:-10])  # a damaged graph is exported anew
    model = attach_backend(af.load(tiny_dirs["frame"]), "onnxruntime", cache)
    assert len(exported) == 1
    assert json.loads(target.with_suffix(".json").read_text())["sha256"] == onnx_export.sha256_file(target)
    attach_backend(model, "onnxruntime", cache, blocks=[11])  # other blocks: another graph
    assert len(exported) == 2 and len(list(cache.glob("*.onnx"))) == 5


@pytest.mark.slow
def test_load_with_a_backend_caches_the_graph_beside_the_converted_weights(tmp_path, monkeypatch):
    src = af.convert_checkpoint(DATA / "tiny48_frame_weights.safetensors", tmp_path / "m", num_heads=TINY_HEADS)
    model = af.load(src, backend="onnxruntime", dtype="auto")  # auto: float32 for ONNX Runtime
    assert model.backend == "onnxruntime" and model.dtype == torch.float32 and "ONNX" in model.choices["dtype"]
    (record,) = (src / onnx_export.GRAPH_DIR).glob("*.json")
    assert str(record.with_suffix(".onnx")) in model.choices["backend"]
    assert json.loads(record.read_text())["weights_sha256"] == model.weights_sha256
    assert af.weights.verify_directory(src)  # the extra folder leaves the model directory valid
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    assert af.load(src, backend="onnxruntime").backend == "onnxruntime"  # the cached graph


@pytest.mark.slow
def test_the_embed_command_on_onnxruntime_writes_what_torch_writes(reference, tmp_path, capsys):
    import soundfile as sf

    model_dir = af.convert_checkpoint(DATA / "tiny48_clip_weights.safetensors", tmp_path / "m", num_heads=TINY_HEADS)
    src = tmp_path / "src"
    src.mkdir()
    for name in CLIPS:
        sf.write(src / f"{name}.wav", reference[f"{name}.wav"].numpy(), SR, subtype="FLOAT")
    runs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        argv = ["embed", str(src), "--out", str(out), "--model", str(model_dir), "--device", "cpu", "--backend", backend,
                "--frames-dtype", "float32", "--layers", "all", "--batch-size", "2", "--no-progress"]
        assert cli.main(argv) == 0
        runs[backend] = {n: dict(np.load(out / f"{n}.wav.npz")) for n in CLIPS}
    assert "backend: onnxruntime" in capsys.readouterr().err  # the command says what it runs on
    for name in CLIPS:
        for key in ("clip", "frames", "timestamps"):
            close(runs["onnxruntime"][name][key], runs["torch"][name][key])


@pytest.mark.slow
def test_a_folder_run_on_onnx_equals_torch(onnx_models, tiny_dirs, reference, tmp_path):
    import soundfile as sf

    src = tmp_path / "src"
    src.mkdir()
    for name in CLIPS:
        sf.write(src / f"{name}.wav", reference[f"{name}.wav"].numpy(), SR, subtype="FLOAT")
    runs = {}
    for backend, model in (("torch", af.load(tiny_dirs["frame"])), ("onnxruntime", onnx_models[0]["frame", "onnxruntime"])):
        out = tmp_path / backend
        assert embed_folder(src, out, model=model, frames_dtype="float32", workers=0, batch_size=2).failed == 0
        runs[backend] = {n: dict(np.load(out / f"{n}.wav.npz")) for n in CLIPS}
    for name in CLIPS:
        close(runs["onnxruntime"][name]["clip"], runs["torch"][name]["clip"])
        close(runs["onnxruntime"][name]["frames"], runs["torch"][name]["frames"])


@pytest.mark.slow
def test_the_export_command(tiny_dirs, reference, tmp_path, capsys):
    out = tmp_path / "frame-last.onnx"
    assert cli.main(["export", "onnx", str(tiny_dirs["frame"]), str(out), "--layers", "last", "--int8"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    meta = graph_metadata(out)
    assert meta["blocks"] == [11] and meta["int8"] is True
    assert meta["weights_sha256"] == af.load(tiny_dirs["frame"]).weights_sha256
    assert cli.main(["export", "onnx", str(tmp_path / "missing"), str(tmp_path / "x.onnx")]) == 1
