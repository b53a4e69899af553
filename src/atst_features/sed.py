"""Sound event detection helpers: strong labels <-> frame targets, frame grids, event-based F1.

Everything here is a small pure function on times in **seconds** and frames in **frames**.
It works on any frame grid given by its ``timestamps``; by default a frame is one ATST token
(``FRAME_S`` = 40 ms), as returned by ``ATSTModel.embed_frames``.

Conventions:

- An event is a tuple ``(class_name, onset_s, offset_s)`` with ``onset_s < offset_s``; it covers
  the half-open interval [onset_s, offset_s).
- Frame k covers [t_k, t_k + frame_s), where t_k = ``timestamps[k]``.
- **Targets** (``events_to_frame_targets``): frame k is active for a class when one event of
  that class covers at least half of the frame (``min_overlap=0.5``). An event that covers half
  of no frame (shorter than a frame, or straddling two) still marks the one frame it overlaps
  most (the earlier on a tie), so no event is lost.
- **Decoding** (``frame_probs_to_events``): threshold, per-class median filter of the 0/1
  decisions, then every run of consecutive active frames k..j becomes one event
  [t_k, t_j + frame_s). Times are therefore exact to the frame grid.

With these two rules, targets -> events gives back every event with onset and offset each
within one frame of the original, as long as two events of the same class are at least two
frames (80 ms) apart; closer ones may merge, as they would in any frame-level detector.

Also here: ``resample_frames`` (to another grid, e.g. ATST-SED's 156 frames per 10 s) and
``event_based_scores`` (the standard event-based F1: onset collar 200 ms, offset collar
max(200 ms, 20 % of the event's length)).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .model import ATSTConfig
from .pooling import token_seconds

TOKEN_FRAMES = ATSTConfig.patch_w  # mel frames per ATST token, the default of every released model
FRAME_S = token_seconds(TOKEN_FRAMES)  # 0.04 s: one ATST token
TIME_EPS = 1e-9  # seconds; absorbs float rounding when comparing times
TIME_DECIMALS = 6  # decoded event times are rounded to the microsecond
DEFAULT_DETECT_MODEL = "atst-frame-base-strong"  # what `atst-features detect` loads by default

Event = tuple[str, float, float]
ArrayLike = torch.Tensor | np.ndarray | Sequence[float]
PerClass = int | float | Sequence | Mapping


# ---------------------------------------------------------------------------- checks


def _timestamps(timestamps: ArrayLike) -> np.ndarray:
    """(T,) increasing seconds as float64 numpy."""
    t = timestamps.detach().cpu().numpy() if isinstance(timestamps, torch.Tensor) else np.asarray(timestamps)
    t = t.astype(np.float64)
    if t.ndim != 1:
        raise ValueError(f"timestamps must be a 1-D sequence of seconds, got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("timestamps contain NaN or Inf; pass finite seconds")
    if t.size > 1 and np.any(np.diff(t) <= 0):
        raise ValueError("timestamps must be strictly increasing (seconds, one per frame)")
    return t


def _frame_s(frame_s: float) -> float:
    if isinstance(frame_s, bool) or not isinstance(frame_s, (int, float, np.floating)) or not frame_s > 0:
        raise ValueError(f"frame_s must be a positive number of seconds, got {frame_s!r}")
    return float(frame_s)


def _class_index(classes: Sequence[str]) -> dict[str, int]:
    if isinstance(classes, str) or len(classes) == 0:
        raise ValueError(f"classes must be a non-empty sequence of class names, got {classes!r}")
    index = {c: i for i, c in enumerate(classes)}
    if len(index) != len(classes):
        raise ValueError(f"classes contain a name twice: {list(classes)}")
    return index


def _per_class(value: PerClass, classes: Sequence[str], name: str) -> list:
    """A scalar, a sequence (one per class, in order) or a dict {class: value} -> one value per class."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(classes)
        missing = [c for c in classes if c not in value]
        if unknown or missing:
            raise ValueError(
                f"{name} as a dict needs exactly one entry per class; unknown: {sorted(map(str, unknown))}, "
                f"missing: {missing}"
            )
        return [value[c] for c in classes]
    if isinstance(value, (list, tuple, np.ndarray, torch.Tensor)):
        values = list(value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else value)
        if len(values) != len(classes):
            raise ValueError(f"{name} has {len(values)} values for {len(classes)} classes; give one per class")
        return values
    return [value] * len(classes)


# ---------------------------------------------------------------------------- events -> targets


def events_to_frame_targets(
    events: Iterable[Event],
    timestamps: ArrayLike,
    classes: Sequence[str],
    *,
    frame_s: float = FRAME_S,
    min_overlap: float = 0.5,
) -> torch.Tensor:
    """Strong labels -> a (frames, classes) 0/1 target aligned to a frame grid.

    Args:
        events: ``(class_name, onset_s, offset_s)`` tuples in seconds; each covers [onset, offset).
            Each event marks its frames on its own and the marks are OR-ed, so events of one
            class may overlap; parts outside the grid are ignored.
        timestamps: (T,) start of each frame in seconds (``FrameEmbeddings.timestamps``).
        classes: the class names; column c of the target is ``classes[c]``.
        frame_s: frame length in seconds; frame k covers [t_k, t_k + frame_s). Default 40 ms.
        min_overlap: fraction of a frame one event must cover for the frame to be active
            (0.5 by default). An event that reaches this fraction in no frame marks the single
            frame it overlaps most (the earlier on a tie).

    Returns:
        (T, C) float32 tensor of 0.0 / 1.0.
    """
    t = _timestamps(timestamps)
    frame_s = _frame_s(frame_s)
    index = _class_index(classes)
    if not 0.0 < min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be a fraction of a frame in (0, 1], got {min_overlap!r}")
    target = np.zeros((t.size, len(classes)), dtype=np.float32)
    for k, event in enumerate(events):
        try:
            label, onset, offset = event
        except (TypeError, ValueError):
            raise ValueError(f"event {k} is {event!r}; events are (class_name, onset_s, offset_s) tuples") from None
        if label not in index:
            raise ValueError(f"event {k} has class {label!r}, which is not in classes {list(classes)}")
        onset, offset = float(onset), float(offset)
        if not (np.isfinite(onset) and np.isfinite(offset)) or offset <= onset:
            raise ValueError(f"event {k} {event!r} needs finite times with onset_s < offset_s (seconds)")
        overlap = np.clip(np.minimum(offset, t + frame_s) - np.maximum(onset, t), 0.0, None)  # (T,) seconds
        active = overlap >= min_overlap * frame_s - TIME_EPS
        if not active.any() and t.size and overlap.max() > TIME_EPS:
            active[int(np.argmax(overlap))] = True
        target[active, index[label]] = 1.0
    return torch.from_numpy(target)


# ---------------------------------------------------------------------------- scores -> events


def binary_median_filter(decisions: np.ndarray, window: int) -> np.ndarray:
    """Median filter of a 1-D 0/1 sequence over ``window`` frames.

    Output frame i is the median of frames [i - window // 2, i - window // 2 + window), with the
    sequence mirrored at both ends (d c b a | a b c d | d c b a), and for an even window the
    upper of the two middle values: the same as ``scipy.ndimage.median_filter`` (mode "reflect")
    for windows up to twice the sequence length.
    On 0/1 input this is a majority vote; it removes active runs and gaps shorter than about
    half the window. ``window`` 1 returns the input.

    Args:
        decisions: (T,) bool or 0/1 array.
        window: window length in frames (>= 1).

    Returns:
        (T,) bool array.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"median filter window must be a whole number of frames >= 1, got {window!r}")
    x = np.asarray(decisions).astype(bool)
    if x.ndim != 1:
        raise ValueError(f"binary_median_filter takes a 1-D sequence, got shape {x.shape}")
    if window == 1 or x.size == 0:
        return x.copy()
    left = window // 2
    padded = np.pad(x.astype(np.int32), (left, window - 1 - left), mode="symmetric")
    ones = np.convolve(padded, np.ones(window, dtype=np.int32), mode="valid")  # (T,) active frames per window
    return ones >= window - window // 2  # rank window // 2 of the sorted window is 1


def frame_probs_to_events(
    probs: ArrayLike,
    timestamps: ArrayLike,
    classes: Sequence[str],
    threshold: PerClass = 0.5,
    median_filter: PerClass = 1,
    *,
    frame_s: float = FRAME_S,
) -> list[Event]:
    """Frame scores -> events ``(class_name, onset_s, offset_s)``.

    Per class: frames with score >= threshold are active; the 0/1 decisions are median-filtered
    (``median_filter`` window in frames); each run of consecutive active frames k..j becomes one
    event [t_k, t_j + frame_s), so times lie on the frame grid (rounded to the microsecond).
    Runs are split only by inactive frames: a run across a chunk boundary of the default
    ``embed_frames`` grid (where one 10 ms mel frame has no token) stays one event.

    Args:
        probs: (T, C) scores in [0, 1] (e.g. sigmoid outputs), one column per class.
        timestamps: (T,) start of each frame in seconds.
        classes: the C class names, in column order.
        threshold: one threshold for all classes, or one per class (sequence in class order, or
            dict {class: threshold}).
        median_filter: window in frames (1 = none), one for all classes or one per class
            (sequence or dict), e.g. ATST-SED's [6, 20, 7, 4, 7, 6, 6, 6, 6, 6] at its 64 ms grid.
        frame_s: frame length in seconds (40 ms for ATST tokens).

    Returns:
        Events sorted by onset, then class order.
    """
    p, t, frame_s = _scores_on_grid(probs, timestamps, classes, frame_s)
    runs = _active_runs(p, t, classes, threshold, median_filter, frame_s)
    return [(classes[c], onset, offset) for onset, offset, c, _, _ in runs]


def _scores_on_grid(scores: ArrayLike, timestamps: ArrayLike, classes: Sequence[str], frame_s: float):
    """Checked (T, C) scores as numpy, (T,) timestamps and the frame length."""
    p = scores.detach().float().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, dtype=np.float64)
    t = _timestamps(timestamps)
    _class_index(classes)
    if p.ndim != 2 or p.shape != (t.size, len(classes)):
        raise ValueError(
            f"scores must have shape (frames, classes) = ({t.size}, {len(classes)}) to match timestamps and "
            f"classes, got {tuple(p.shape)}"
        )
    return p, t, _frame_s(frame_s)


def _active_runs(
    p: np.ndarray, t: np.ndarray, classes: Sequence[str], threshold: PerClass, median_filter: PerClass, frame_s: float
) -> list[tuple[float, float, int, int, int]]:
    """(onset s, offset s, class, first frame, end frame) of every run of active frames (threshold,
    then median filter in frames), sorted by onset, then class."""
    thresholds = [float(x) for x in _per_class(threshold, classes, "threshold")]
    windows = _per_class(median_filter, classes, "median_filter")
    runs = []
    for c in range(len(classes)):
        active = binary_median_filter(p[:, c] >= thresholds[c], windows[c])
        edges = np.diff(np.concatenate([[0], active.astype(np.int8), [0]]))
        for start, stop in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):  # frames [start, stop)
            onset = round(float(t[start]), TIME_DECIMALS)
            offset = round(float(t[stop - 1] + frame_s), TIME_DECIMALS)
            runs.append((onset, offset, c, int(start), int(stop)))
    return sorted(runs, key=lambda r: (r[0], r[2]))


# ---------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detection:
    """One detected sound event: [onset, offset) in seconds, its class and its peak frame score."""

    onset: float
    offset: float
    label: str
    score: float


def detection_settings(
    classes: Sequence[str], threshold: PerClass = 0.5, median_filter: PerClass = 0.0, frame_s: float = FRAME_S
) -> tuple[list[float], list[int]]:
    """Checked per-class thresholds (in [0, 1]) and median-filter windows, given in **seconds** and
    returned in frames (``round(seconds / frame_s)``, at least 1; 0 s = no filter)."""
    thresholds = []
    for c, x in zip(classes, _per_class(threshold, classes, "threshold")):
        if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)) or not 0.0 <= x <= 1.0:
            raise ValueError(f"threshold for {c!r} must be a score in [0, 1], got {x!r}")
        thresholds.append(float(x))
    windows = []
    for c, x in zip(classes, _per_class(median_filter, classes, "median_filter")):
        if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)) or not 0.0 <= x < 3600:
            raise ValueError(f"median_filter for {c!r} must be a window in seconds >= 0 (0 = none), got {x!r}")
        windows.append(max(1, round(float(x) / frame_s)))
    return thresholds, windows


def detect_events(
    scores: ArrayLike,
    timestamps: ArrayLike,
    classes: Sequence[str],
    threshold: PerClass = 0.5,
    median_filter: PerClass = 0.0,
    *,
    frame_s: float = FRAME_S,
) -> list[Detection]:
    """Frame scores -> ``Detection`` s, as ``frame_probs_to_events`` decodes them, with the median
    filter in seconds and each event's peak score (the highest raw score of its frames).

    Args:
        scores: (T, C) scores in [0, 1]; timestamps: (T,) frame starts in seconds; classes: C names.
        threshold: a score, or one per class (sequence or dict).
        median_filter: window in seconds (0 = none), or one per class.

    Returns:
        Detections sorted by onset, then class order.
    """
    p, t, frame_s = _scores_on_grid(scores, timestamps, classes, frame_s)
    thresholds, windows = detection_settings(classes, threshold, median_filter, frame_s)
    runs = _active_runs(p, t, classes, thresholds, windows, frame_s)
    return [Detection(onset, offset, classes[c], float(p[a:b, c].max())) for onset, offset, c, a, b in runs]


# ---------------------------------------------------------------------------- other grids


def resample_frames(
    frames: torch.Tensor, timestamps: ArrayLike, num_frames: int, *, frame_s: float = FRAME_S
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Resample a frame sequence to ``num_frames`` frames by adaptive average pooling over time.

    This is how ATST-SED brings ATST-Frame's 250 tokens per 10 s to its CRNN's 156 frames
    (``torch.nn.functional.adaptive_avg_pool1d``); output frame i averages input frames
    floor(i T / n) .. ceil((i + 1) T / n) - 1. Upsampling (n > T) repeats frames.

    Args:
        frames: (T, D) or (B, T, D) frame sequence (embeddings or scores); gradients flow.
        timestamps: (T,) start of each input frame in seconds.
        num_frames: n, the output frame count.
        frame_s: input frame length in seconds.

    Returns:
        frames: (n, D) or (B, n, D), same dtype.
        timestamps: (n,) float64 seconds: output frame i starts at input position i T / n,
            read on the input grid (t_floor(x) + frac(x) * frame_s); on a uniform grid this is
            t_0 + i * new_frame_s.
        new_frame_s: the output frame length in seconds, T * frame_s / n (for 250 tokens to 156:
            0.0641 s).
    """
    t = _timestamps(timestamps)
    frame_s = _frame_s(frame_s)
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if frames.dim() not in (2, 3) or frames.shape[-2] != t.size:
        raise ValueError(
            f"frames must be (T, D) or (B, T, D) with T = {t.size} (the number of timestamps), got {tuple(frames.shape)}"
        )
    x = frames if frames.dim() == 3 else frames[None]
    out = F.adaptive_avg_pool1d(x.transpose(1, 2), int(num_frames)).transpose(1, 2)  # (B, n, D)
    out = out if frames.dim() == 3 else out[0]
    position = np.arange(num_frames, dtype=np.float64) * t.size / num_frames  # fractional input frame index
    whole = np.floor(position).astype(np.int64)
    new_t = t[whole] + (position - whole) * frame_s
    return out, torch.from_numpy(new_t), t.size * frame_s / num_frames


# ---------------------------------------------------------------------------- evaluation
# The standard event-based metric of DCASE (Mesaros et al., "Metrics for polyphonic sound event
# detection", 2016), as sed_eval's EventBasedMetrics computes it. It is written here because
# sed_eval (and sed_scores_eval, which builds on it) import ``pkg_resources`` through dcase_util,
# which current setuptools no longer ships, so they do not import in a fresh environment.


@dataclass(frozen=True)
class EventScores:
    """Event-based detection scores, micro-averaged over clips and classes.

    Attributes:
        f1, precision, recall: overall scores; ``nan`` where undefined (no estimated events for
            precision, no reference events for recall, neither for f1).
        n_ref, n_est, n_tp: reference, estimated and correctly detected events.
        per_class_f1: F1 of each class: 0.0 for a class with reference events but no
            estimates (or the reverse), where sed_eval reports ``nan``; ``nan`` only for a class
            with no events at all.
        macro_f1: mean of ``per_class_f1`` over the classes where it is defined.
    """

    f1: float
    precision: float
    recall: float
    n_ref: int
    n_est: int
    n_tp: int
    per_class_f1: dict[str, float]
    macro_f1: float


def _f1(tp: int, n_ref: int, n_est: int) -> float:
    return 2.0 * tp / (n_ref + n_est) if n_ref + n_est else float("nan")


def _max_matching(allowed: np.ndarray) -> int:
    """Size of a maximum matching in a bipartite graph given as a (refs, ests) bool matrix (augmenting paths)."""
    owner = [-1] * allowed.shape[1]  # est -> matched ref

    def augment(r: int, seen: list[bool]) -> bool:
        for e in np.flatnonzero(allowed[r]):
            if not seen[e]:
                seen[e] = True
                if owner[e] < 0 or augment(owner[e], seen):
                    owner[e] = r
                    return True
        return False

    return sum(augment(r, [False] * allowed.shape[1]) for r in range(allowed.shape[0]))


def event_based_scores(
    reference: Sequence[Sequence[Event]],
    estimated: Sequence[Sequence[Event]],
    classes: Sequence[str],
    *,
    onset_collar: float = 0.2,
    offset_collar: float = 0.2,
    offset_collar_rate: float = 0.2,
) -> EventScores:
    """Event-based precision, recall and F1 with onset/offset collars (the DCASE / sed_eval definition).

    An estimated event matches a reference event of the same class and clip when its onset is
    within ``onset_collar`` seconds of the reference onset and its offset within
    max(``offset_collar``, ``offset_collar_rate`` * reference length) seconds of the reference
    offset (both inclusive, with 1 ns of slack for float rounding). Each event matches at most
    one other; the number of true positives is the largest possible number of such pairs
    (optimal matching, sed_eval's default). The overall scores equal sed_eval's
    ``EventBasedMetrics(t_collar=0.2, percentage_of_length=0.2)``.

    Args:
        reference: one list of ``(class_name, onset_s, offset_s)`` per clip.
        estimated: one list per clip, in the same order.
        classes: every class name (events of other classes raise).
        onset_collar, offset_collar: seconds (200 ms each by default).
        offset_collar_rate: fraction of the reference length allowed at the offset (20 %).

    Returns:
        ``EventScores`` (F1 = 2 TP / (N_ref + N_est)).
    """
    index = _class_index(classes)
    if isinstance(reference, (str, tuple)) or isinstance(estimated, (str, tuple)) or len(reference) != len(estimated):
        raise ValueError("reference and estimated must be lists with one list of events per clip, of equal length")
    tp, n_ref, n_est = (np.zeros(len(classes), dtype=np.int64) for _ in range(3))
    for clip, (ref_events, est_events) in enumerate(zip(reference, estimated)):
        per_class: list[tuple[list, list]] = [([], []) for _ in classes]
        for side, events in enumerate((ref_events, est_events)):
            if isinstance(events, tuple) and len(events) == 3 and isinstance(events[0], str):
                raise ValueError("each clip's events must be a list of (class, onset_s, offset_s); got one bare event")
            for event in events:
                label, onset, offset = event
                if label not in index:
                    raise ValueError(f"clip {clip}: event {event!r} has a class not in {list(classes)}")
                per_class[index[label]][side].append((float(onset), float(offset)))
        for c, (refs, ests) in enumerate(per_class):
            n_ref[c] += len(refs)
            n_est[c] += len(ests)
            if refs and ests:
                r, e = np.array(refs), np.array(ests)  # (R, 2), (E, 2)
                offset_tol = np.maximum(offset_collar, offset_collar_rate * (r[:, 1] - r[:, 0]))[:, None]
                allowed = (np.abs(r[:, :1] - e[None, :, 0]) <= onset_collar + TIME_EPS) & (
                    np.abs(r[:, 1:] - e[None, :, 1]) <= offset_tol + TIME_EPS
                )
                tp[c] += _max_matching(allowed)
    per_class_f1 = {name: _f1(int(tp[c]), int(n_ref[c]), int(n_est[c])) for c, name in enumerate(classes)}
    defined = [v for v in per_class_f1.values() if not np.isnan(v)]
    total_tp, total_ref, total_est = int(tp.sum()), int(n_ref.sum()), int(n_est.sum())
    return EventScores(
        f1=_f1(total_tp, total_ref, total_est),
        precision=total_tp / total_est if total_est else float("nan"),
        recall=total_tp / total_ref if total_ref else float("nan"),
        n_ref=total_ref,
        n_est=total_est,
        n_tp=total_tp,
        per_class_f1=per_class_f1,
        macro_f1=float(np.mean(defined)) if defined else float("nan"),
    )
