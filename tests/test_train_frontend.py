"""Training uses each encoder's own front end: the dB clamp of ATST-SED / PretrainedSED encoders
(``ATSTConfig.db_clamp``) reaches the training log-mel, the export keeps it, and in C2F a teacher
with another front end sees its own mels under the same augmentation.

Tiny encoders (32 dims, 2 blocks), 1 s generated clips, one or two steps per run.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import atst_features as af
from atst_features import artifacts, frontend
from atst_features.model import ATSTConfig, ATSTEncoder
from atst_features.train.__main__ import main
from atst_features.train.config import TrainConfig, finalize, resolve
from atst_features.train.tasks import Finetuning

pytestmark = [pytest.mark.train, pytest.mark.usefixtures("scan_cache")]

CLAMP = (-50.0, 80.0)
TINY = {"family": "frame", "embed_dim": 32, "depth": 2, "num_heads": 2}
RUNTIME = ["--batch-size", "4", "--crop-seconds", "1.0", "--num-workers", "0", "--device", "cpu", "--precision", "fp32"]
RUNTIME += ["--lr", "0.5", "--save-every", "0", "--no-progress"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Eight quiet 1 s clips in two classes (quiet, so that the -50 dB clamp changes the mels)."""
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        t = np.arange(16000) / 16000
        x = 0.002 * np.sin(2 * np.pi * (300 if i % 2 else 1200) * t) + 1e-4 * rng.standard_normal(16000)
        sf.write(root / f"c{i}.wav", x.astype(np.float32), 16000)
        rows.append(f"c{i}.wav,{'low' if i % 2 else 'high'}\n")
    (root / "labels.csv").write_text("file,labels\n" + "".join(rows))
    return root / "labels.csv"


def encoder_dir(path: Path, db_clamp) -> Path:
    cfg = ATSTConfig(**TINY, db_clamp=db_clamp)
    torch.manual_seed(0)
    return artifacts.save_converted(cfg, ATSTEncoder(cfg).state_dict(), path)


@pytest.fixture
def front_ends(monkeypatch) -> list:
    """The ``db_clamp`` of every training log-mel computed while the test runs."""
    seen = []
    real = frontend.log_mel

    def spy(waveforms, lengths=None, db_clamp=None):
        seen.append(db_clamp)
        return real(waveforms, lengths, db_clamp=db_clamp)

    monkeypatch.setattr(frontend, "log_mel", spy)
    return seen


def test_finetune_trains_on_the_encoders_front_end(labelled, tmp_path, front_ends, capsys):
    init = encoder_dir(tmp_path / "sed", CLAMP)
    out = tmp_path / "ft"
    assert main(["finetune", "--data", str(labelled), "--out", str(out), "--init", str(init), "--max-steps", "1", *RUNTIME]) == 0
    assert front_ends == [CLAMP]  # one log-mel per step, clamped
    assert "front end with dB clamp [-50, 80]" in capsys.readouterr().err
    assert json.loads((out / "export" / "config.json").read_text())["db_clamp"] == list(CLAMP)
    assert af.load(out / "export").config.db_clamp == CLAMP  # inference uses the front end it was trained with


def test_c2f_teacher_sees_its_own_front_end(labelled, tmp_path, front_ends):
    """A clamped (PretrainedSED-style) student with an unclamped teacher: two log-mels per step."""
    teacher = tmp_path / "teacher"
    assert main(["finetune", "--data", str(labelled), "--out", str(teacher), "--init", str(encoder_dir(tmp_path / "t", None)),
                 "--max-steps", "1", *RUNTIME]) == 0  # fmt: skip
    front_ends.clear()
    args = ["--init", str(encoder_dir(tmp_path / "s", CLAMP)), "--teacher", str(teacher / "export"), "--max-steps", "2"]
    assert main(["c2f", "--data", str(labelled), "--out", str(tmp_path / "c2f"), *args, *RUNTIME]) == 0
    assert front_ends == [CLAMP, None, CLAMP, None]


def test_both_front_ends_get_the_same_augmentation(labelled, tmp_path):
    """The other front end's mel gets the very same mixup and random-resize-crop draws."""
    cfg = resolve(TrainConfig(command="finetune", data=str(labelled), out=str(tmp_path / "o"), family="frame", mixup_prob=1.0), False)
    cfg = finalize(cfg, "frame", batches_per_epoch=2, multilabel=False)
    clamped = ATSTConfig(**TINY, db_clamp=CLAMP)
    plain = replace(clamped, db_clamp=None)
    task = Finetuning(cfg, torch.device("cpu"), np.random.default_rng(3), clamped, ["a", "b"], False, False)
    rng = np.random.default_rng(7)
    wav = torch.from_numpy(2e-5 * rng.standard_normal((4, 16000)).astype(np.float32))  # about -70 dB
    lengths = torch.tensor([16000, 12000, 16000, 9000])
    batch = {"views": [(wav, lengths)], "target": torch.eye(2)[[0, 1, 0, 1]]}

    start = task.rng.bit_generator.state
    mel, n_frames, target, other = task.batch(batch, plain)
    end = task.rng.bit_generator.state
    expected = {}
    for name, enc in (("clamped", clamped), ("plain", plain)):
        task.rng.bit_generator.state = start
        expected[name] = task.augment(*frontend.log_mel(wav, lengths, db_clamp=enc.db_clamp), batch["target"])
        assert task.rng.bit_generator.state == end  # one set of draws, consumed once
    assert torch.equal(mel, expected["clamped"][0]) and torch.equal(other, expected["plain"][0])
    assert torch.equal(target, expected["clamped"][2]) and torch.equal(n_frames, expected["plain"][1])
    assert not torch.equal(target, batch["target"])  # mixup happened (probability 1)
    assert not torch.allclose(mel, other)  # the clamp matters for these quiet clips
    task.rng.bit_generator.state = start
    assert task.batch(batch, clamped)[3] is None  # the same front end: one log-mel only
