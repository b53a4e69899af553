"""Two ``atst-features embed`` runs on one ``--out`` at the same time: what survives.

For each trial, two command-line runs are started together on a fresh output folder, once with the
same settings and once with different ``--frames-dtype`` (float16 and float32). Then, for each:

  exit / failed   each process's exit status and the failures it reported (``failed:`` lines, or
                  "refused" when it would not share the folder);
  bad ok rows     index rows marked ``ok`` / ``skipped`` whose ``.npz`` is missing, does not open
                  (bad zip or CRC), or disagrees with ``metadata.json`` (frames dtype, width, rows,
                  settings key);
  rerun           whether a plain rerun (the first run's settings, no ``--force``) exits 0 and
                  leaves every input with a valid output that matches ``metadata.json``.

Run:  python benchmarks/bench_concurrent_runs.py [--files 100] [--trials 3] [--seconds 1.0] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from atst_features import batch, weights
from atst_features.model import ATSTConfig, ATSTEncoder

SCENARIOS = {"same settings": ("float16", "float16"), "different --frames-dtype": ("float16", "float32")}


def make_inputs(root: Path, n_files: int, seconds: float) -> None:
    """``n_files`` noise clips of about ``seconds`` at 16 kHz in two sub-folders."""
    rng = np.random.default_rng(0)
    for i in range(n_files):
        path = root / f"part{i % 2}" / f"clip{i:04d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        n = int(16000 * seconds * rng.uniform(0.8, 1.2))
        sf.write(path, (rng.standard_normal(n) * 0.1).astype(np.float32), 16000)


def make_model(root: Path) -> Path:
    """A tiny random ATST-Frame saved as a converted directory (what ``--model DIR`` loads)."""
    torch.manual_seed(0)
    cfg = ATSTConfig(family="frame", embed_dim=48, depth=2, num_heads=3)
    return weights.save_converted(cfg, ATSTEncoder(cfg).state_dict(), root)


def command(src: Path, out: Path, model: Path, frames_dtype: str, workers: int) -> list[str]:
    return [sys.executable, "-m", "atst_features", "embed", str(src), "--out", str(out), "--model", str(model),
            "--frames-dtype", frames_dtype, "--workers", str(workers), "--device", "cpu", "--no-progress"]


def run_together(commands: list[list[str]]) -> list[tuple[int, str]]:
    """Start every command at once; (exit status, stderr) of each."""
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands]
    errs = [p.communicate()[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs)]


def reported(status: int, err: str) -> str:
    """One process's outcome: its exit status and how many failures it reported."""
    if "another run" in err:
        return f"exit {status}, refused ({err.strip().splitlines()[-1][:60]}...)"
    summary = [line for line in err.splitlines() if " embedded, " in line]
    if not summary:
        return f"exit {status}, no summary ({err.strip().splitlines()[-1] if err.strip() else ''})"
    return f"exit {status}, {summary[-1].split(', ')[2]}"


def output_problem(out: Path, row: dict, meta: dict) -> str | None:
    """Why an ``ok`` / ``skipped`` row's output is not what ``metadata.json`` promises, or None."""
    path = out / (row.get("output") or f"{row['path']}.npz")
    if row.get("settings") != meta["settings_key"]:
        return "row settings differ from metadata.json"
    try:
        with zipfile.ZipFile(path) as z:
            if z.testzip() is not None:
                return "bad CRC"
        with np.load(path) as z:
            frames = z["frames"]
            clip, times = z["clip"], z["timestamps"]
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # a zip that does not open, a bad member
        return f"does not open ({type(e).__name__})"
    if str(frames.dtype) != meta["frames_dtype"]:
        return f"frames {frames.dtype}, metadata says {meta['frames_dtype']}"
    width = len(meta["frame_layers"]) * meta["config"]["embed_dim"]
    if frames.shape[1] != width or frames.shape[0] != times.shape[0] or clip.dtype != np.float32:
        return "shape or dtype differs"
    if row.get("n_frames") is not None and row["n_frames"] != frames.shape[0]:
        return "row n_frames differs"
    return None


def check_folder(out: Path, n_files: int) -> dict[str, int]:
    """Counts over an output folder's index: ``ok`` (ok / skipped rows), ``bad`` (of them, with a bad
    output), ``failed`` (failed rows), ``failed_valid`` (of them, with a valid output on disk) and
    ``without`` (inputs with no ``ok`` row backed by a valid output)."""
    meta = json.loads((out / batch.METADATA_NAME).read_text())
    rows = batch.read_index(out)
    good = [r for r in rows.values() if r.get("status") in ("ok", "skipped")]
    failed = [r for r in rows.values() if r.get("status") == "failed"]
    bad = sum(output_problem(out, r, meta) is not None for r in good)
    failed_valid = sum(output_problem(out, {**r, "settings": meta["settings_key"], "n_frames": None}, meta) is None
                       for r in failed)
    return {"ok": len(good), "bad": bad, "failed": len(failed), "failed_valid": failed_valid,
            "without": n_files - (len(good) - bad)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=100)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.0, help="length of each clip (±20 %)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes per run")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_concurrent_") as tmp:
        tmp = Path(tmp)
        make_inputs(tmp / "in", args.files, args.seconds)
        model = make_model(tmp / "model")
        print(f"{args.files} files of ~{args.seconds:g} s, two concurrent runs per trial, {args.trials} trials")
        for name, (dtype_a, dtype_b) in SCENARIOS.items():
            print(f"\n== {name} ({dtype_a} / {dtype_b})")
            for trial in range(args.trials):
                out = tmp / f"out-{dtype_b}-{trial}"
                results = run_together([command(tmp / "in", out, model, d, args.workers) for d in (dtype_a, dtype_b)])
                c = check_folder(out, args.files)
                status, _ = run_together([command(tmp / "in", out, model, dtype_a, args.workers)])[0]
                r = check_folder(out, args.files)
                complete = status == 0 and r["bad"] == 0 and r["without"] == 0
                print(
                    f"trial {trial}: run A {reported(*results[0])}; run B {reported(*results[1])}\n"
                    f"   index: {c['ok']} ok rows ({c['bad']} with a corrupt or mismatching .npz), {c['failed']} failed rows "
                    f"({c['failed_valid']} with a valid .npz on disk); inputs without a valid ok output: {c['without']}\n"
                    f"   plain rerun: exit {status}, {'complete' if complete else 'INCOMPLETE'} "
                    f"({r['bad']} bad ok rows, {r['without']} inputs without a valid ok output)"
                )

if __name__ == "__main__":
    main()
