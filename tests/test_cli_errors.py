"""The command line turns the package's own errors into one clear line and a non-zero exit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import soundfile as sf


def test_embed_offline_without_the_model_is_one_clean_message(tmp_path):
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, np.float32), 16000)
    env = dict(os.environ, HF_HUB_OFFLINE="1", ATST_FEATURES_CACHE=str(tmp_path / "cache"))
    run = subprocess.run(
        [sys.executable, "-m", "atst_features.cli", "embed", str(wav), "--out", str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False,
    )
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("atst-features embed: "), run.stderr
    assert "atst-frame-base" in run.stderr and "atst-features download" in run.stderr
