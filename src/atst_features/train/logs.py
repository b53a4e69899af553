"""Training logs: ``OUT/train_log.csv`` (always) and TensorBoard events (``--tensorboard``).

One row per logged step with the metrics averaged over the processes and over the steps since the
previous row. A resumed run first drops the rows after its checkpoint, so the CSV never holds a
step twice.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..atomic import open_append, open_atomic

LOG_NAME = "train_log.csv"


class CSVLog:
    """Append rows of named numbers to a CSV file; the header is written once."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        self.fields: list[str] | None = None
        if resume_step is not None and self.path.is_file():
            self._truncate_after(resume_step)
        elif self.path.is_file():
            self.path.unlink()
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                self.fields = next(csv.reader(f), None)

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            fields = rows and list(rows[0].keys())
        keep = [r for r in rows if int(r["step"]) <= step]
        with open_atomic(self.path, "w", newline="", encoding="utf-8") as f:
            if fields:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(keep)

    def write(self, row: dict[str, float | int]) -> None:
        if self.fields is None:
            self.fields = list(row)
            with open_atomic(self.path, "w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow(self.fields)
        with open_append(self.path, newline="", encoding="utf-8") as f:  # never through a link
            csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore").writerow(row)


class TensorBoardLog:
    """Scalars to TensorBoard event files in ``OUT/tensorboard``."""

    def __init__(self, directory: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(f"--tensorboard needs the tensorboard package: pip install 'atst-features[train]' ({e})") from None
        self.writer = SummaryWriter(str(directory))

    def write(self, row: dict[str, float | int]) -> None:
        step = int(row["step"])
        for k, v in row.items():
            if k != "step":
                self.writer.add_scalar(f"train/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
