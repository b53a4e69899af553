"""Sound events of many files: a folder run of a frame-level head's scores, decoded into events.

``detect_files`` runs ``batch.embed_folder(what="scores")`` -- the same discovery, decoding
workers, engine, atomic ``.npz`` outputs, index and resume as ``atst-features embed`` -- into a
scores folder, then decodes every file's scores with ``sed.detect_events``. The scores folder is
the run's state: a rerun skips the files whose scores are up to date (so new thresholds cost no
encoder pass), and a file that fails is recorded and skipped. The events tables are written
whole or not at all (``atomic.write_text_atomic``).

Files: ``events.csv`` (``file,onset,offset,label,score``, one row per event, sorted by file then
onset), ``events.jsonl`` (one JSON object per event, the same fields), the scores folder
(``NAME.npz``: ``scores`` (T', classes) float32, ``timestamps`` (T',) s, ``labels``) and, with
``plot_detections``, one PNG per file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import frontend, weights
from .atomic import open_atomic, write_text_atomic
from .audio import PathLike, load_audio, prepare_waveform
from .batch import BatchSummary, embed_folder
from .batch.embedder import SCORES
from .batch.folder import output_dir
from .batch.index import STATUS_FAILED
from .embed import ATSTModel
from .sed import DEFAULT_DETECT_MODEL, Detection, PerClass, detect_events, detection_settings

EVENT_FIELDS = ("file", "onset", "offset", "label", "score")


@dataclass
class DetectRun:
    """What ``detect_files`` did: the folder run's summary and the events of each file that has scores.

    Attributes:
        summary: the ``BatchSummary`` of the scores run (failures, counts, index).
        events: relative path -> its ``Detection`` s, for every input with scores, in path order.
        inputs: relative path -> the input file.
        scores_dir: the folder holding the scores.
    """

    summary: BatchSummary
    events: dict[str, list[Detection]] = field(default_factory=dict)
    inputs: dict[str, Path] = field(default_factory=dict)
    scores_dir: Path | None = None

    def rows(self) -> list[dict]:
        """One dict per event (``EVENT_FIELDS``), sorted by file, then onset."""
        return [{"file": rel, **asdict(d)} for rel in sorted(self.events) for d in self.events[rel]]


def detect_files(
    input: PathLike | Sequence[PathLike],
    scores_dir: PathLike,
    *,
    model: str | PathLike | ATSTModel = DEFAULT_DETECT_MODEL,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    threshold: PerClass = 0.5,
    median_filter: PerClass = 0.0,
    hop_s: float | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> DetectRun:
    """Detect sound events in every audio file of folders, files or lists (see the module docstring).

    Args:
        input: as ``batch.embed_folder``: folders (recursive), audio files, list files, or a sequence.
        scores_dir: the scores folder (created; a rerun resumes from it).
        model: a model with a frame-level head (default ``atst-frame-base-strong``).
        device, dtype, batch_size, workers, force, progress: as ``batch.embed_folder``.
        threshold, median_filter, hop_s: as ``ATSTModel.detect`` (median filter in seconds).

    Returns:
        a ``DetectRun``; ``run.summary.exit_status`` is 1 when a file failed or the run stopped early.

    Raises:
        ValueError: a model without a frame-level head, or settings out of range (before any audio).
        As ``batch.embed_folder`` otherwise.
    """
    if not isinstance(model, ATSTModel):
        model = weights.load(model, device=device, dtype="float32" if dtype is None else dtype)
    classes = model.frame_head().class_names
    detection_settings(classes, threshold, median_filter)
    summary = embed_folder(
        input, scores_dir, model=model, what=SCORES, frames_dtype="float32", batch_size=batch_size,
        workers=workers, force=force, progress=progress, hop_s=hop_s,
    )
    run = DetectRun(summary, inputs=dict(summary.inputs), scores_dir=Path(scores_dir))
    for rel in sorted(summary.rows):
        row = summary.rows[rel]
        if row.get("status") == STATUS_FAILED or not row.get("output"):
            continue
        scores, timestamps = read_scores(Path(scores_dir) / row["output"])
        run.events[rel] = detect_events(scores, timestamps, classes, threshold, median_filter)
    return run


def read_scores(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(scores (T', classes) float32, timestamps (T',) seconds) of one file of a scores folder."""
    with np.load(path, allow_pickle=False) as f:
        return f["scores"], f["timestamps"]


# ---------------------------------------------------------------------------- output


def events_csv(rows: list[dict]) -> str:
    """The events as CSV text: a header, then ``file,onset,offset,label,score`` rows (seconds to the ms)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(EVENT_FIELDS)
    for r in rows:
        writer.writerow([r["file"], f"{r['onset']:.3f}", f"{r['offset']:.3f}", r["label"], f"{r['score']:.4f}"])
    return text.getvalue()


def events_jsonl(rows: list[dict]) -> str:
    """The events as JSON lines, one object per event with the fields of the CSV."""
    return "".join(json.dumps({k: r[k] for k in EVENT_FIELDS}, ensure_ascii=False) + "\n" for r in rows)


def write_events(path: PathLike, rows: list[dict]) -> Path:
    """Write the events to ``path`` atomically (never a half table): JSON lines for ``.jsonl``, else CSV."""
    path = Path(path)
    write_text_atomic(path, events_jsonl(rows) if path.suffix.lower() == ".jsonl" else events_csv(rows))
    return path


def events_table(rows: list[dict], max_label: int = 40) -> str:
    """A readable fixed-width table of the events for a terminal."""
    if not rows:
        return "no events detected"
    width = max(len("file"), *(len(r["file"]) for r in rows))
    label_w = min(max_label, max(len("label"), *(len(r["label"]) for r in rows)))
    lines = [f"{'file':<{width}}  {'onset':>8}  {'offset':>8}  {'label':<{label_w}}  score"]
    for r in rows:
        label = r["label"] if len(r["label"]) <= label_w else r["label"][: label_w - 1] + "~"
        lines.append(f"{r['file']:<{width}}  {r['onset']:8.2f}  {r['offset']:8.2f}  {label:<{label_w}}  {r['score']:.3f}")
    return "\n".join(lines)


def plot_detections(audio_path: PathLike, detections: list[Detection], png: PathLike, title: str | None = None) -> Path:
    """One PNG: the file's log-mel spectrogram above its events as labelled bars (one row per class).

    Needs matplotlib (``pip install 'atst-features[plot]'``). Written atomically; the folder of
    ``png`` must exist (``plot_run`` makes them without following links).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"plots need matplotlib: pip install 'atst-features[plot]' ({e})") from None
    wav = prepare_waveform(load_audio(audio_path), frontend.SAMPLE_RATE, str(audio_path))
    mel = frontend.log_mel(wav[None])[0][0].numpy()  # (64, frames), in [-1, 1]
    seconds = wav.shape[0] / frontend.SAMPLE_RATE
    classes = sorted({d.label for d in detections}, key=lambda c: min(d.onset for d in detections if d.label == c))
    fig_w = min(40.0, max(8.0, seconds / 3))
    fig, (ax_mel, ax_ev) = plt.subplots(
        2, 1, figsize=(fig_w, 3 + 0.3 * max(1, len(classes))), sharex=True,
        gridspec_kw={"height_ratios": [3, max(1, 0.3 * len(classes))]},
    )
    ax_mel.imshow(mel, origin="lower", aspect="auto", extent=(0, seconds, 0, mel.shape[0]), cmap="magma")
    ax_mel.set_ylabel("mel band")
    ax_mel.set_title(title or Path(audio_path).name)
    for row, label in enumerate(classes):
        spans = [(d.onset, d.offset - d.onset) for d in detections if d.label == label]
        ax_ev.broken_barh(spans, (row - 0.4, 0.8))
    ax_ev.set_yticks(range(len(classes)), classes)
    ax_ev.set_ylim(-0.6, max(0.6, len(classes) - 0.4))
    ax_ev.set_xlabel("seconds")
    ax_ev.set_xlim(0, seconds)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    png = Path(png)
    with open_atomic(png, "wb") as f:
        f.write(buf.getvalue())
    return png


def plot_run(run: DetectRun, folder: PathLike) -> list[Path]:
    """``plot_detections`` for every file of a run with events: ``folder/<relative path>.png``,
    the folders made as a folder run makes its outputs' (a link on the way is refused)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    made: set[str] = set()
    written = []
    for rel, events in run.events.items():
        png = f"{rel}.png"
        written.append(plot_detections(run.inputs[rel], events, output_dir(folder, png, made) / Path(png).name, title=rel))
    return written
