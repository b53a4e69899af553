"""Strong labels <-> frame targets, median filtering, grid resampling, and overlapping windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atst_features import frontend, pooling
from atst_features.sed import (
    FRAME_S,
    binary_median_filter,
    events_to_frame_targets,
    frame_probs_to_events,
    resample_frames,
)

CLASSES = ["alarm", "dog", "speech"]


def uniform_grid(seconds: float) -> np.ndarray:
    return np.arange(round(seconds / FRAME_S)) * FRAME_S


def chunked_grid(n_frames: int) -> torch.Tensor:
    """The default embed_frames grid: 1001-frame chunks, 10 ms seam at every chunk boundary."""
    chunks = pooling.frame_chunks(0, n_frames, 1001, 4)
    return torch.cat([(c.start + 4 * torch.arange(c.tokens, dtype=torch.float64)) * 0.01 for c in chunks])


# ---------------------------------------------------------------------------- events -> targets


def test_aligned_event_marks_exactly_its_frames():
    t = uniform_grid(4.0)
    y = events_to_frame_targets([("dog", 1.0, 2.0)], t, CLASSES)
    assert y.shape == (100, 3) and y.dtype == torch.float32
    assert torch.equal(torch.nonzero(y[:, 1])[:, 0], torch.arange(25, 50))
    assert y[:, [0, 2]].sum() == 0


def test_partial_overlap_counts_from_half_a_frame():
    t = uniform_grid(1.0)
    # frame 10 covers [0.40, 0.44): 0.02 s (half) is in, 0.019 s is out
    y_half = events_to_frame_targets([("alarm", 0.42, 0.60)], t, CLASSES)
    y_less = events_to_frame_targets([("alarm", 0.421, 0.60)], t, CLASSES)
    assert y_half[10, 0] == 1 and y_less[10, 0] == 0
    assert y_half[11:15, 0].eq(1).all() and y_half[15:, 0].eq(0).all()
    y_strict = events_to_frame_targets([("alarm", 0.41, 0.60)], t, CLASSES, min_overlap=1.0)
    assert y_strict[10, 0] == 0 and y_strict[11, 0] == 1


def test_short_event_marks_the_frame_it_overlaps_most():
    t = uniform_grid(1.0)
    y = events_to_frame_targets([("speech", 0.205, 0.215)], t, CLASSES)  # 10 ms inside frame 5
    assert torch.nonzero(y).tolist() == [[5, 2]]
    y = events_to_frame_targets([("speech", 0.235, 0.265)], t, CLASSES)  # 30 ms straddling frames 5/6
    assert torch.nonzero(y).tolist() == [[6, 2]]  # 25 ms in frame 6 beats 5 ms in frame 5


def test_overlapping_events_are_ored_and_outside_parts_ignored():
    t = uniform_grid(2.0)
    y = events_to_frame_targets(
        [("dog", 0.2, 0.6), ("dog", 0.4, 1.0), ("dog", 1.9, 5.0), ("dog", 7.0, 8.0)], t, CLASSES
    )
    assert torch.nonzero(y[:, 1])[:, 0].tolist() == list(range(5, 25)) + [47, 48, 49]  # 1.88-1.92 is half in


@pytest.mark.parametrize(
    "events, match",
    [
        ([("cat", 0.0, 1.0)], "not in classes"),
        ([("dog", 1.0, 1.0)], "onset_s < offset_s"),
        ([("dog", 1.0, float("nan"))], "onset_s < offset_s"),
        ([("dog", 1.0)], "tuples"),
    ],
)
def test_bad_events_are_rejected(events, match):
    with pytest.raises(ValueError, match=match):
        events_to_frame_targets(events, uniform_grid(2.0), CLASSES)


def test_bad_grids_and_classes_are_rejected():
    with pytest.raises(ValueError, match="increasing"):
        events_to_frame_targets([], [0.0, 0.04, 0.04], CLASSES)
    with pytest.raises(ValueError, match="twice"):
        events_to_frame_targets([], uniform_grid(1.0), ["a", "a"])
    with pytest.raises(ValueError, match="frame_s"):
        events_to_frame_targets([], uniform_grid(1.0), CLASSES, frame_s=0)


# ---------------------------------------------------------------------------- scores -> events


def test_decoding_is_exact_to_the_grid_and_sorted():
    t = uniform_grid(2.0)
    probs = torch.zeros(50, 3)
    probs[10:20, 2] = 0.9
    probs[3:5, 0] = 0.5  # exactly at the threshold: active
    probs[30:31, 1] = 0.49
    events = frame_probs_to_events(probs, t, CLASSES)
    assert events == [("alarm", 0.12, 0.2), ("speech", 0.4, 0.8)]
    assert frame_probs_to_events(probs, t, CLASSES, threshold={"alarm": 0.6, "dog": 0.4, "speech": 0.95}) == [
        ("dog", 1.2, 1.24)
    ]


def test_run_across_a_chunk_seam_stays_one_event():
    t = chunked_grid(1500)  # tokens 249 / 250 start at 9.96 s / 10.01 s
    probs = np.zeros((len(t), 1))
    probs[240:260] = 1.0
    assert frame_probs_to_events(probs, t, ["x"]) == [("x", 9.6, 10.41)]  # token 259 starts 10.01 + 9 * 0.04


def test_median_filter_per_class_removes_short_runs_and_gaps():
    t = uniform_grid(2.0)
    probs = np.zeros((50, 2))
    probs[10:12, 0] = 1  # a 2-frame blip
    probs[20:40, 1] = 1
    probs[29, 1] = 0  # a 1-frame gap
    unfiltered = frame_probs_to_events(probs, t, ["a", "b"])
    assert len(unfiltered) == 3
    filtered = frame_probs_to_events(probs, t, ["a", "b"], median_filter={"a": 7, "b": 3})
    assert filtered == [("b", 0.8, 1.6)]
    assert frame_probs_to_events(probs, t, ["a", "b"], median_filter=[1, 3]) == [("a", 0.4, 0.48), ("b", 0.8, 1.6)]


def test_median_filter_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        window = int(rng.integers(1, 2 * n + 1))
        x = rng.random(n) < rng.random()
        expected = ndimage.median_filter(x.astype(np.int32), size=window, mode="reflect").astype(bool)
        assert np.array_equal(binary_median_filter(x, window), expected), (n, window)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_median_filter_rejects_bad_windows(bad):
    with pytest.raises(ValueError, match="window"):
        frame_probs_to_events(np.zeros((5, 1)), uniform_grid(0.2), ["a"], median_filter=bad)


def test_decoding_checks_shapes_and_per_class_values():
    t = uniform_grid(1.0)
    with pytest.raises(ValueError, match="shape"):
        frame_probs_to_events(np.zeros((24, 3)), t, CLASSES)
    with pytest.raises(ValueError, match="one per class"):
        frame_probs_to_events(np.zeros((25, 3)), t, CLASSES, median_filter=[1, 3])
    with pytest.raises(ValueError, match="missing"):
        frame_probs_to_events(np.zeros((25, 3)), t, CLASSES, threshold={"dog": 0.5})


def random_events(rng, duration: float, classes: list[str], gap: float) -> list[tuple[str, float, float]]:
    """Random events; those of one class are at least ``gap`` seconds apart, other classes overlap freely."""
    events = []
    for name in classes:
        cursor = float(rng.uniform(0, 0.5))
        while True:
            onset = cursor + float(rng.exponential(1.0))
            offset = onset + float(rng.uniform(0.005, 2.0))
            if offset > duration:
                break
            events.append((name, onset, offset))
            cursor = offset + gap
    return events


@pytest.mark.parametrize("grid", ["uniform", "chunked"])
def test_round_trip_recovers_every_event_within_one_frame(grid):
    rng = np.random.default_rng(1234)
    for trial in range(150):
        if grid == "uniform":
            t = uniform_grid(float(rng.uniform(1.0, 30.0)))
        else:
            t = chunked_grid(int(rng.integers(100, 3000)))
        duration = float(t[-1]) + FRAME_S
        events = random_events(rng, duration, CLASSES, gap=2 * FRAME_S)
        decoded = frame_probs_to_events(events_to_frame_targets(events, t, CLASSES), t, CLASSES)
        assert len(decoded) == len(events), (trial, events, decoded)
        by_class = {c: sorted(e[1:] for e in decoded if e[0] == c) for c in CLASSES}
        for name, onset, offset in events:
            est_on, est_off = by_class[name][sorted(e[1] for e in events if e[0] == name).index(onset)]
            assert abs(est_on - onset) <= FRAME_S + 1e-6 and abs(est_off - offset) <= FRAME_S + 1e-6, (
                trial,
                (name, onset, offset),
                (est_on, est_off),
            )
            assert est_on < est_off


def test_round_trip_of_decoded_events_is_exact():
    rng = np.random.default_rng(7)
    t = uniform_grid(12.0)
    probs = rng.random((len(t), 3))
    events = frame_probs_to_events(probs, t, CLASSES, median_filter=5)
    target = events_to_frame_targets(events, t, CLASSES)
    assert frame_probs_to_events(target, t, CLASSES) == events


# ---------------------------------------------------------------------------- other grids


def test_resample_to_the_atst_sed_grid_is_adaptive_average_pooling():
    t = uniform_grid(10.0)  # 250 tokens
    x = torch.randn(2, 250, 8, requires_grad=True)
    y, new_t, new_s = resample_frames(x, t, 156)
    assert y.shape == (2, 156, 8)
    assert new_s == pytest.approx(10.0 / 156)
    assert torch.allclose(new_t, torch.arange(156, dtype=torch.float64) * new_s)
    for i in (0, 77, 155):  # output frame i averages input frames floor(i T / n) .. ceil((i + 1) T / n) - 1
        lo, hi = (i * 250) // 156, -((-(i + 1) * 250) // 156)
        assert torch.allclose(y[:, i], x[:, lo:hi].mean(dim=1), atol=1e-6)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    y2, t2, _ = resample_frames(x[0], t, 156)  # (T, D) in, (n, D) out
    assert torch.allclose(y2, y[0]) and torch.equal(t2, new_t)


def test_resample_round_trip_of_targets_and_timestamps_on_a_seamed_grid():
    t = chunked_grid(2002)  # 500 tokens, a seam at 10.01 s
    assert len(t) == 500
    _, new_t, new_s = resample_frames(torch.zeros(500, 1), t, 250)
    assert new_s == pytest.approx(0.08)
    assert new_t[125].item() == pytest.approx(10.01)  # input token 250 starts 10.01 s in, not 10.00
    up, _, _ = resample_frames(torch.arange(4.0)[:, None], uniform_grid(0.16), 8)
    assert up[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_resample_checks_its_input():
    with pytest.raises(ValueError, match="num_frames"):
        resample_frames(torch.zeros(10, 2), uniform_grid(0.4), 0)
    with pytest.raises(ValueError, match="number of timestamps"):
        resample_frames(torch.zeros(9, 2), uniform_grid(0.4), 5)


# ---------------------------------------------------------------------------- overlapping windows


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.1 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * (300 + 40 * t) * t)).astype(np.float32)


@pytest.mark.parametrize("seconds", [0.37, 3.0, 10.01])
def test_overlapping_windows_equal_the_default_within_one_chunk(frame_model, seconds):
    x = noise(seconds)
    default = frame_model.embed_frames(x, 16000, layers="all")
    overlapped = frame_model.embed_frames(x, 16000, layers="all", hop_s=2.0)
    assert torch.equal(overlapped.embeddings, default.embeddings)
    assert torch.equal(overlapped.timestamps, default.timestamps)


def test_overlapping_windows_on_long_audio(frame_model):
    x = noise(25.0, seed=3)  # 2501 mel frames
    default = frame_model.embed_frames(x, 16000, layers="last")
    over = frame_model.embed_frames(x, 16000, layers="last", hop_s=5.0)
    assert len(default) == 624 and len(over) == 625  # one grid: every 4 mel frames give a token
    assert torch.allclose(over.timestamps, torch.arange(625, dtype=torch.float64) * 0.04)
    # windows start at tokens 0, 125, 250, 375 (the last ends at the clip's end); token j comes
    # from the window where it is farthest from a cut, so the first 188 come from window 0
    assert torch.equal(over.embeddings[:125], default.embeddings[:125])
    windows = pooling.frame_windows(0, 2501, 1001, 4, 125)
    assert [w.start // 4 for w in windows] == [0, 125, 250, 375]
    which, _ = pooling.central_window(windows, 625, 4)
    assert which[[0, 187, 188, 312, 313, 437, 438, 624]].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # tokens 313..437 come from the third window (mel frames 1000..1999), encoded alone: check that
    mel, _ = frontend.log_mel(torch.from_numpy(x)[None])
    with torch.inference_mode():
        window = frame_model.encoder(mel[:, :, 1000:2000])[0, 0]  # (250, D), last block
    assert torch.allclose(over.embeddings[313:438], window[63:188], atol=1e-5)


def test_overlapping_windows_batch_and_bad_hops(frame_model):
    a, b = noise(12.0, 1), noise(4.0, 2)
    both = frame_model.embed_frames([a, b], 16000, layers="last", hop_s=3.0)
    alone = frame_model.embed_frames(a, 16000, layers="last", hop_s=3.0)
    assert torch.allclose(both[0].embeddings, alone.embeddings, atol=1e-5)
    assert len(both[1]) == 100
    for bad in (0, 0.01, 10.5, float("nan"), "5"):
        with pytest.raises(ValueError, match="hop_s"):
            frame_model.embed_frames(a, 16000, hop_s=bad)
