"""The trainable frame backbone: equality to embed_frames, gradients, freezing, layer-wise learning rates."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import atst_features as af
from atst_features.backbone import FrameBackbone
from atst_features.model import ATSTEncoder


def waveforms(seconds: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    rng = np.random.default_rng(seed)
    wavs = [torch.from_numpy((0.2 * rng.standard_normal(int(s * 16000))).astype(np.float32)) for s in seconds]
    lengths = torch.tensor([w.shape[0] for w in wavs])
    return torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lengths, wavs


def tiny_encoder(depth: int = 2) -> ATSTEncoder:
    torch.manual_seed(0)
    return ATSTEncoder(af.ATSTConfig(family="frame", embed_dim=48, depth=depth, num_heads=3))


@pytest.mark.parametrize("layers", ["last", "all", [0, 5]])
def test_eval_output_equals_embed_frames(frame_model, layers):
    x, lengths, wavs = waveforms([13.3, 0.37, 25.0, 10.01, 3.0])
    backbone = FrameBackbone(frame_model, layers=layers).eval()
    with torch.no_grad():
        emb, mask = backbone(x, lengths)
    reference = frame_model.embed_frames(wavs, 16000, layers=layers)
    assert emb.shape == (5, max(len(r) for r in reference), backbone.output_dim)
    assert backbone.output_dim == frame_model.frame_dim(layers)
    for i, ref in enumerate(reference):
        n = len(ref)
        assert mask[i].sum() == n and mask[i, :n].all()
        assert torch.allclose(emb[i, :n], ref.embeddings, atol=1e-5)
        assert not emb[i, n:].any()  # rows past the item's tokens are zero
        assert torch.equal(backbone.timestamps(int(lengths[i])), ref.timestamps)


def test_atst_clip_tokens_equal_embed_frames(clip_model):
    x, lengths, wavs = waveforms([11.0, 2.0], seed=4)
    with torch.no_grad():
        emb, mask = FrameBackbone(clip_model).eval()(x, lengths)
    for i, ref in enumerate(clip_model.embed_frames(wavs, 16000, layers="last")):
        assert mask[i].sum() == len(ref)
        assert torch.allclose(emb[i, : len(ref)], ref.embeddings, atol=1e-5)


def test_lengths_default_to_the_full_width(frame_model):
    x, _, _ = waveforms([2.0, 2.0])
    backbone = FrameBackbone(frame_model).eval()
    with torch.no_grad():
        emb, mask = backbone(x)
    assert mask.all() and emb.shape == (2, 50, 48)
    assert torch.allclose(emb[0], frame_model.embed_frames(x[0], 16000, layers="last").embeddings, atol=1e-5)


def test_gradients_reach_every_parameter_and_training_changes_the_output():
    backbone = FrameBackbone(tiny_encoder(), layers="all").train()
    x, lengths, _ = waveforms([11.0, 4.0], seed=1)  # two chunks for the first item
    emb, mask = backbone(x, lengths)
    assert emb.requires_grad and mask.dtype == torch.bool
    (emb[mask] ** 2).mean().backward()
    missing = [n for n, p in backbone.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == ["encoder.mask_embed"]  # only used in masked pretraining
    before = emb.detach().clone()
    torch.optim.SGD(backbone.parameters(), lr=0.5).step()
    after, _ = backbone(x, lengths)
    assert not torch.allclose(after, before)


def test_padding_gets_no_gradient():
    backbone = FrameBackbone(tiny_encoder()).train()
    x, lengths, _ = waveforms([1.0, 3.0], seed=2)
    x.requires_grad_(True)
    emb, _ = backbone(x, lengths)
    emb[0].sum().backward()
    assert x.grad[1].abs().max() == 0 and x.grad[0].abs().max() > 0


def test_freeze_and_unfreeze_last():
    depth = 3
    backbone = FrameBackbone(tiny_encoder(depth))

    def trainable() -> set[str]:
        return {
            n.split(".")[1] + ("." + n.split(".")[2] if n.startswith("encoder.blocks") else "")
            for n, p in backbone.named_parameters()
            if p.requires_grad
        }

    assert backbone.freeze() is backbone and trainable() == set()
    x, lengths, _ = waveforms([1.0])
    assert not backbone(x, lengths)[0].requires_grad
    assert backbone.unfreeze_last(0) is backbone and trainable() == {"norm"}
    backbone.unfreeze_last(2)
    assert trainable() == {"norm", "blocks.1", "blocks.2"}
    backbone.unfreeze_last(depth)
    assert trainable() == {"norm", "blocks.0", "blocks.1", "blocks.2"}
    backbone.unfreeze_last(depth + 1)
    assert trainable() == {"norm", "blocks.0", "blocks.1", "blocks.2", "patch_embed", "pos_embed", "mask_embed"}
    emb, _ = backbone.unfreeze_last(1)(x, lengths)
    emb.sum().backward()
    grads = {n for n, p in backbone.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith(("encoder.norm.", "encoder.blocks.2.")) for n in grads)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="unfreeze_last"):
            backbone.unfreeze_last(bad)


def test_param_groups_decay_the_learning_rate_layer_by_layer():
    depth = 4
    backbone = FrameBackbone(tiny_encoder(depth))
    groups = backbone.param_groups(base_lr=1e-3, decay=0.5, weight_decay=0.1)
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr["norm.no_decay"] == pytest.approx(5e-4)
    for b in range(depth):
        assert lr[f"block{b}"] == pytest.approx(1e-3 * 0.5 ** (depth - b))
        assert lr[f"block{b}.no_decay"] == lr[f"block{b}"]
    assert lr["embed"] == pytest.approx(1e-3 * 0.5**depth) == lr["block0"]
    for g in groups:
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else 0.1)
        assert all((p.dim() >= 2) == (g["weight_decay"] > 0) for p in g["params"])
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(backbone.parameters()))

    backbone.unfreeze_last(1)
    groups = backbone.param_groups(base_lr=1e-3)
    assert {g["name"] for g in groups} == {"norm.no_decay", "block3", "block3.no_decay"}
    optimizer = torch.optim.AdamW(groups)
    frozen = backbone.encoder.blocks[0].mlp.fc1.weight.detach().clone()
    x, lengths, _ = waveforms([1.5])
    backbone(x, lengths)[0].pow(2).mean().backward()
    optimizer.step()
    assert torch.equal(backbone.encoder.blocks[0].mlp.fc1.weight, frozen)
    for bad in ({"base_lr": 0}, {"base_lr": 1e-3, "decay": 0}, {"base_lr": 1e-3, "weight_decay": -1}):
        with pytest.raises(ValueError, match="base_lr"):
            backbone.param_groups(**bad)


def test_gradient_checkpointing_gives_the_same_gradients():
    encoder = tiny_encoder()
    plain, ckpt = FrameBackbone(encoder).train(), FrameBackbone(copy.deepcopy(encoder)).train()
    ckpt.set_gradient_checkpointing(True)
    x, lengths, _ = waveforms([2.0, 1.0], seed=3)
    for b in (plain, ckpt):
        b(x, lengths)[0].pow(2).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_bad_inputs():
    with pytest.raises(TypeError, match="ATSTModel or an ATSTEncoder"):
        FrameBackbone(torch.nn.Linear(2, 2))
    backbone = FrameBackbone(tiny_encoder())
    with pytest.raises(ValueError, match="batch, samples"):
        backbone(torch.zeros(16000))
    with pytest.raises(ValueError, match="at least"):
        backbone(torch.zeros(2, 16000), torch.tensor([16000, 100]))
