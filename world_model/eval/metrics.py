"""Evaluation metrics as pure functions on arrays (no model, no I/O), so stubs can test each one.

Conventions: frames are uint8 ``(..., H, W, 3)`` arrays; features are float ``(N, D)`` arrays;
labels are int ``(N,)`` arrays of action ids in ``[0, A)``.

* Fidelity: :func:`psnr`, :func:`frechet_distance` (the FID formula on any feature set; the suite
  uses the inverse-dynamics model's penultimate layer), :func:`color_histogram` with
  :func:`histogram_distance`, :func:`mean_brightness`, :func:`rms_gradient` (detail),
  :func:`kerb_pixels` (CarRacing's red/white kerbs), :func:`color_palette` with :func:`off_palette`
  (artifacts: colours no real frame has).
* Control: :func:`confusion_matrix`, :func:`accuracy_report` (accuracy, per-action accuracy, chance).
* Drift: :class:`DriftAccumulator` collects frame statistics per horizon bucket while a generator
  runs, without keeping the frames.
* Heads: :func:`reward_metrics`, :func:`termination_metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Bins per colour channel of the joint RGB histogram (8**3 = 512 cells): coarse enough that a few
# hundred 72x128 frames fill it, fine enough to see grass / road / sky colour shifts.
HIST_BINS = 8
# Rec. 601 luma weights: the brightness that drift plots show.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
# The drift horizons of DESIGN.md §7: [0, 100), [100, 1000), [1000, 10000) generated steps.
DEFAULT_BUCKET_EDGES = (0, 100, 1000, 10000)


# ------------------------------------------------------------------------------------- fidelity
def psnr(a: np.ndarray, b: np.ndarray, max_value: float = 255.0) -> float:
    """PSNR in dB over all elements of two equally shaped image arrays (``inf`` if identical)."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {a.shape} and {b.shape}")
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(max_value**2 / mse)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), in float64."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``. The last trace is the sum
    of the square roots of the eigenvalues of ``sigma1 sigma2`` (real and >= 0 for PSD matrices, up to
    round-off), which avoids ``scipy.linalg.sqrtm`` and its failures on singular covariances (fewer
    samples than feature dimensions).
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    eig = np.linalg.eigvals(sigma1 @ sigma2)
    tr_covmean = float(np.sqrt(np.clip(eig.real, 0.0, None)).sum())
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # round-off can push identical sets a hair below zero


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between two feature sets (N_a, D) and (N_b, D) (0 for identical sets).

    Note the estimator is biased upwards for small N (few hundred samples in D=64 dimensions): only
    compare numbers computed with the same sample sizes and the same feature network.
    """
    return frechet_from_stats(*feature_stats(features_a), *feature_stats(features_b))


def color_histogram(frames: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
    """Normalised joint RGB histogram of uint8 frames (..., H, W, 3) -> (bins**3,) summing to 1."""
    px = np.asarray(frames).reshape(-1, 3)
    if px.dtype != np.uint8:
        raise TypeError(f"frames must be uint8, got {px.dtype}")
    q = (px.astype(np.int64) * bins) // 256  # (P, 3) bin per channel
    cells = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]  # (P,)
    counts = np.bincount(cells, minlength=bins**3).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def histogram_distance(h1: np.ndarray, h2: np.ndarray) -> float:
    """Total-variation distance of two normalised histograms: 0 identical, 1 disjoint."""
    return float(0.5 * np.abs(np.asarray(h1) - np.asarray(h2)).sum())


def mean_brightness(frames: np.ndarray) -> float:
    """Mean Rec. 601 luma of uint8 frames (..., H, W, 3), in [0, 255]."""
    f = np.asarray(frames)
    return float((f.reshape(-1, 3).mean(axis=0, dtype=np.float64) * LUMA).sum())


def rms_gradient(frames: np.ndarray, rows: int | None = None, chunk: int = 256) -> float:
    """Detail: mean over frames of each frame's RMS luma gradient, in luma levels per pixel.

    Per frame (H, W, 3) on the frames' own scale (0-255 for uint8): the root mean square of the
    luma's horizontal and vertical finite differences. Blur lowers it (total variation does not
    change when an edge is merely smeared; the squared gradient does), so generated frames can be
    compared with real ones and with VAE reconstructions; noise raises it too, so the target is the
    real frames' value, not a maximum. Averaging per-frame values makes batches of any size and
    grouping comparable. ``rows`` keeps only the top rows (e.g. CarRacing's view without the
    dashboard).

    Raises:
        ValueError: fewer than 2 rows or columns are left.
    """
    f = np.asarray(frames)[:, :rows]  # (N, H', W, 3)
    if f.shape[1] < 2 or f.shape[2] < 2:
        raise ValueError(f"rms_gradient needs frames of at least 2x2 pixels, got {f.shape[1:3]} (rows={rows})")
    per_frame = []
    for i in range(0, len(f), chunk):  # bounded float32 memory for thousands of frames
        y = f[i : i + chunk].astype(np.float32) @ np.asarray(LUMA, np.float32)  # (n, H', W)
        dx, dy = np.diff(y, axis=2)[:, :-1, :], np.diff(y, axis=1)[:, :, :-1]  # (n, H'-1, W-1) each
        per_frame.append(np.sqrt((dx**2 + dy**2).mean(axis=(1, 2))))  # (n,)
    return float(np.concatenate(per_frame).mean())


# CarRacing's kerbs are the only saturated-red or near-white pixels of its view besides the car, which
# sits at a fixed place: rows 50-57, columns 62-65 of a 72x128 frame (measured over a recorded
# episode); the box adds a margin.
KERB_FRAME_HW = (72, 128)
KERB_CAR_BOX = (slice(47, 61), slice(58, 70))
CARRACING_VIEW_ROWS = 62
"""Rows of a 72x128 CarRacing frame above the dashboard (the view)."""


def _carracing_frames(frames: np.ndarray, what: str) -> np.ndarray:
    """``frames`` as uint8 (N >= 1, 72, 128, 3), or a ValueError naming ``what`` and the shape given."""
    f = np.asarray(frames)
    if f.dtype != np.uint8 or f.ndim != 4 or len(f) == 0 or f.shape[1:] != (*KERB_FRAME_HW, 3):
        raise ValueError(f"{what} needs uint8 (N, {KERB_FRAME_HW[0]}, {KERB_FRAME_HW[1]}, 3) frames with "
                         f"N >= 1, got {f.dtype} {f.shape}")
    return f


def _red(f: np.ndarray) -> np.ndarray:
    """CarRacing's saturated red (kerbs, the car): uint8 (..., 3) -> bool (...)."""
    return (f[..., 0] > 150) & (f[..., 1] < 100) & (f[..., 2] < 100)


def kerb_pixels(frames: np.ndarray, rows: int | None = None) -> float:
    """Kerbs drawn: mean over frames of the kerb-coloured pixels of a 72x128 CarRacing view.

    Kerb-coloured: saturated red (R > 150, G < 100, B < 100) or white (every channel > 200); the
    car's box is left out and ``rows`` keeps only the top rows (the view above the dashboard). Like
    :func:`rms_gradient`, a match-the-real statistic: a decoder that smooths kerbs into the road edge
    draws ~0, one that paints red noise draws too many. It assumes CarRacing's fixed colours: under
    ``domain_randomize`` the road or grass itself can be red.

    Raises:
        ValueError: the frames are not uint8 (N >= 1, 72, 128, 3), or ``rows`` is not in [1, 72].
    """
    f = _carracing_frames(frames, "kerb_pixels")
    if rows is not None and not 1 <= rows <= KERB_FRAME_HW[0]:
        raise ValueError(f"kerb_pixels rows must be in [1, {KERB_FRAME_HW[0]}], got {rows}")
    f = f[:, :rows]  # (N, H', 128, 3)
    kerb = _red(f) | (f.min(-1) > 200)  # (N, H', 128)
    kerb[:, KERB_CAR_BOX[0], KERB_CAR_BOX[1]] = False
    return float(kerb.sum(axis=(1, 2)).mean())


CAR_FADED_BELOW = 8
"""A 72x128 CarRacing frame whose car box holds fewer car-red pixels than this shows a faded car:
every recorded frame from step 20 on shows 16 or more (median 18, 4,620 frames of 20 recorded
episodes), and so do their reconstructions by the shipped VAE but for a few (minimum 10, 5th
percentile 16). In the real game's first ``ZOOM_STEPS`` steps the camera zooms in and the car is smaller."""
ZOOM_STEPS = 13
"""Recorded (frame-skip-4) steps of CarRacing's opening zoom-in: one second at 50 physics frames/s."""


def car_pixels(frames: np.ndarray) -> np.ndarray:
    """The car drawn: per frame, the car-red pixels (R > 150, G < 100, B < 100) in the car's box.

    A match-the-real statistic of 72x128 CarRacing frames (the car sits at a fixed place): a world
    that lets the car fade or flicker draws fewer in some frames (see ``CAR_FADED_BELOW``).

    Returns:
        (N,) int64 counts.

    Raises:
        ValueError: the frames are not uint8 (N >= 1, 72, 128, 3).
    """
    f = _carracing_frames(frames, "car_pixels")
    return _red(f[:, KERB_CAR_BOX[0], KERB_CAR_BOX[1]]).sum(axis=(1, 2)).astype(np.int64)  # (N,)


VOID_BELOW = 20
"""CarRacing draws nothing beyond its playfield: a pixel whose every channel is below this is that black
void (grass, road, kerbs and the car are all brighter). In recorded exit episodes it enters the view a
few steps before the ending (median 7) and fills 70-88% of it in the frame that ends them."""


def void_share(frames: np.ndarray) -> np.ndarray:
    """Per 72x128 CarRacing frame, the share of the view (above the dashboard) that is black void.

    Returns:
        (N,) float64 in [0, 1].

    Raises:
        ValueError: the frames are not uint8 (N >= 1, 72, 128, 3).
    """
    f = _carracing_frames(frames, "void_share")[:, :CARRACING_VIEW_ROWS]  # (N, 62, 128, 3)
    return (f.max(axis=-1) < VOID_BELOW).mean(axis=(1, 2))  # (N,)


def view_mask(hw: tuple[int, int], rows: int | None, ignore: tuple[slice, slice] | None) -> np.ndarray:
    """The pixels a palette counts: bool (H, W), the top ``rows`` (all if None) without the ``ignore`` box.

    Raises:
        ValueError: no pixel is left.
    """
    keep = np.ones(hw, bool)  # (H, W)
    if rows is not None:
        keep[rows:] = False
    if ignore is not None:
        keep[ignore] = False
    if not keep.any():
        raise ValueError(f"no pixel of {tuple(hw)} frames is left to count (rows={rows}, ignore={ignore})")
    return keep


def _view_pixels(frames: np.ndarray, rows: int | None, ignore: tuple[slice, slice] | None) -> np.ndarray:
    """The counted pixels of uint8 frames (N, H, W, 3) (:func:`view_mask`) -> (P, 3)."""
    f = np.asarray(frames)
    if f.dtype != np.uint8 or f.ndim != 4 or len(f) == 0 or f.shape[-1] != 3:
        raise ValueError(f"colour palettes need uint8 (N >= 1, H, W, 3) frames, got {f.dtype} {f.shape}")
    return f[:, view_mask(f.shape[1:3], rows, ignore)].reshape(-1, 3)


def _cells(px: np.ndarray, bins: int) -> np.ndarray:
    """RGB cell of each uint8 pixel (P, 3) on a grid of ``bins`` levels per channel -> int64 (P,)."""
    cell = np.zeros(len(px), np.int64)  # (P,) built channel by channel: no (P, 3) int64 copy
    for c in range(3):
        cell = cell * bins + px[:, c].astype(np.int64) * bins // 256
    return cell


def color_palette(frames: np.ndarray, rows: int | None = None, ignore: tuple[slice, slice] | None = None,
                  bins: int = HIST_BINS) -> np.ndarray:
    """The colours real frames use: bool (bins**3,), True for each RGB cell some counted pixel falls in.

    ``rows`` keeps the top rows (CarRacing: the view above the dashboard); ``ignore`` is a (rows,
    columns) box left out (CarRacing: the car, whose black wheels no other part of the view has).
    """
    return np.bincount(_cells(_view_pixels(frames, rows, ignore), bins), minlength=bins**3) > 0


def palette_colours(frames: np.ndarray, rows: int | None = None, ignore: tuple[slice, slice] | None = None,
                    bins: int = 16) -> np.ndarray:
    """The mean colour of each RGB cell real frames use: float32 (K, 3) in [0, 255], K = used cells.

    A finer grid than :func:`color_palette`'s by default (16 levels per channel), so the colours hug
    the real ones: the targets of a differentiable "stay in the palette" loss. ``rows`` / ``ignore``
    as for :func:`color_palette`.
    """
    px = _view_pixels(frames, rows, ignore)  # (P, 3)
    cells = _cells(px, bins)  # (P,)
    count = np.bincount(cells, minlength=bins**3)
    sums = np.stack([np.bincount(cells, px[:, c].astype(np.float64), minlength=bins**3)
                     for c in range(3)], 1)  # (bins**3, 3) summed colour per cell
    used = count > 0
    return (sums[used] / count[used, None]).astype(np.float32)


def off_palette(frames: np.ndarray, palette: np.ndarray, rows: int | None = None,
                ignore: tuple[slice, slice] | None = None) -> float:
    """Artifacts: the share in [0, 1] of counted pixels whose colour cell ``palette`` lacks.

    A decoder that invents colours (saturated yellow, magenta or black blobs beside CarRacing's car)
    scores high, where :func:`kerb_pixels` would count the blobs' red and white as kerbs and
    :func:`rms_gradient` as detail. Blur between two real colours mostly stays in the palette (the
    real frames' own edges are resampled too); VAE reconstructions of real frames give the floor.
    Cells are 32 levels wide by default and a real colour may sit near a cell's edge (CarRacing's
    road grey, 102, is 6 levels above one), so a decoder that shifts a whole surface by a few
    levels can score high too: look at the frames before trusting a rise. Use the same ``rows`` /
    ``ignore`` as for :func:`color_palette`.

    Raises:
        ValueError: frames not uint8 (N >= 1, H, W, 3), or ``palette`` not a bool vector of a cube size.
    """
    pal = np.asarray(palette)
    bins = round(len(pal) ** (1 / 3))
    if pal.dtype != bool or pal.ndim != 1 or bins**3 != len(pal):
        raise ValueError(f"palette must be a bool (bins**3,) vector from color_palette, got {pal.dtype} {pal.shape}")
    return float(1.0 - pal[_cells(_view_pixels(frames, rows, ignore), bins)].mean())


# -------------------------------------------------------------------------------------- control
def confusion_matrix(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """Count (true, predicted) pairs: (A, A) int64, row = true action, column = predicted action."""
    pred, true = np.asarray(pred, np.int64), np.asarray(true, np.int64)
    if pred.shape != true.shape:
        raise ValueError(f"pred {pred.shape} and true {true.shape} differ")
    return np.bincount(true * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def accuracy_report(pred: np.ndarray, true: np.ndarray, num_classes: int) -> dict:
    """Accuracy of predicted action ids against true ones, per action, and the chance levels.

    Returns:
        dict with ``accuracy``, ``n``, ``per_action`` (A floats, None where an action never
        occurs), ``chance_uniform`` (1/A), ``chance_majority`` (frequency of the most common true
        action: what a constant guess scores) and ``confusion`` (A x A nested lists).
    """
    cm = confusion_matrix(pred, true, num_classes)
    n = int(cm.sum())
    rows = cm.sum(axis=1)
    return {
        "accuracy": float(np.trace(cm) / n) if n else float("nan"),
        "n": n,
        "per_action": [float(cm[a, a] / rows[a]) if rows[a] else None for a in range(num_classes)],
        "chance_uniform": 1.0 / num_classes,
        "chance_majority": float(rows.max() / n) if n else float("nan"),
        "confusion": cm.tolist(),
    }


def hold_actions(
    num_envs: int, steps: int, num_actions: int, hold: int, rng: np.random.Generator
) -> np.ndarray:
    """Random actions, each drawn uniformly and held for ``hold`` steps: (B, T) int64."""
    blocks = -(-steps // hold)  # ceil
    draws = rng.integers(0, num_actions, size=(num_envs, blocks))  # (B, blocks)
    return np.repeat(draws, hold, axis=1)[:, :steps]  # (B, T)


# ---------------------------------------------------------------------------------------- drift
@dataclass
class _Bucket:
    start: int
    end: int
    features: list[np.ndarray] = field(default_factory=list)
    hist: np.ndarray | None = None
    luma_sum: float = 0.0
    frames: int = 0
    last_step: int = -1


class DriftAccumulator:
    """Frame statistics of a long generated rollout, per horizon bucket, against real frames.

    Feed it the frames (and their features) sampled at some generation steps; it keeps only
    per-bucket sums, so a 10k-step rollout costs no memory. Example::

        acc = DriftAccumulator(real_features, real_frames, edges=(0, 100, 1000, 10000))
        for step in sampled_steps:               # step = 1-based count of generated frames
            acc.add(step, frames, features)      # frames (B, H, W, 3) uint8, features (B, D)
        rows = acc.result()
    """

    def __init__(
        self,
        real_features: np.ndarray,
        real_frames: np.ndarray,
        edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES,
        bins: int = HIST_BINS,
    ) -> None:
        """Compute the reference statistics of the real frames.

        Args:
            real_features: (N, D) features of real frames.
            real_frames: (M, H, W, 3) uint8 real frames (histogram and brightness reference).
            edges: increasing bucket boundaries in generated steps; bucket i is [edges[i], edges[i+1]).
            bins: histogram bins per channel.
        """
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"bucket edges must increase, got {edges}")
        self.bins = bins
        self.real_stats = feature_stats(real_features)
        self.real_hist = color_histogram(real_frames, bins)
        self.real_brightness = mean_brightness(real_frames)
        self.buckets = [_Bucket(a, b) for a, b in zip(edges, edges[1:], strict=False)]
        self.trace: list[tuple[int, float]] = []  # (step, mean brightness of the frames added)

    def bucket_of(self, step: int) -> int | None:
        """Index of the bucket holding ``step`` (None beyond the last edge)."""
        for i, b in enumerate(self.buckets):
            if b.start <= step < b.end:
                return i
        return None

    def add(self, step: int, frames: np.ndarray, features: np.ndarray) -> None:
        """Add frames generated at ``step``: frames (B, H, W, 3) uint8, features (B, D)."""
        i = self.bucket_of(step)
        if i is None:
            return
        b = self.buckets[i]
        hist = color_histogram(frames, self.bins) * len(frames)
        b.hist = hist if b.hist is None else b.hist + hist
        luma = mean_brightness(frames)
        b.luma_sum += luma * len(frames)
        b.frames += len(frames)
        b.features.append(np.asarray(features, np.float64))
        b.last_step = max(b.last_step, step)
        self.trace.append((int(step), luma))

    def result(self) -> list[dict]:
        """Summarise every bucket that received frames.

        Returns:
            One dict per bucket: start, end, reached (last step seen), frames, frechet (to the real
            features), hist_distance, brightness, brightness_gap (generated - real).
        """
        rows = []
        for b in self.buckets:
            if b.frames == 0:
                continue
            feats = np.concatenate(b.features)
            fd = float("nan")
            if len(feats) > 1:
                fd = frechet_from_stats(*feature_stats(feats), *self.real_stats)
            brightness = b.luma_sum / b.frames
            rows.append({
                "start": b.start,
                "end": b.end,
                "reached": b.last_step,
                "frames": b.frames,
                "frechet": fd,
                "hist_distance": histogram_distance(b.hist / b.hist.sum(), self.real_hist),
                "brightness": brightness,
                "brightness_gap": brightness - self.real_brightness,
            })
        return rows


def drift_summary(rows: list[dict]) -> dict:
    """Last bucket minus first bucket of each drift statistic (0 = a flat curve)."""
    if len(rows) < 2:
        return {}
    first, last = rows[0], rows[-1]
    return {
        "frechet_change": last["frechet"] - first["frechet"],
        "hist_distance_change": last["hist_distance"] - first["hist_distance"],
        "abs_brightness_gap_change": abs(last["brightness_gap"]) - abs(first["brightness_gap"]),
    }


# ---------------------------------------------------------------------------------------- heads
def reward_metrics(pred: np.ndarray, true: np.ndarray, baseline: float | None = None) -> dict:
    """Predicted vs recorded rewards: MAE, RMSE, Pearson correlation (nan if either is constant).

    Args:
        pred: (N,) predicted rewards.
        true: (N,) recorded rewards.
        baseline: a constant predictor (e.g. the training mean); its MAE is reported beside.
    """
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    err = pred - true
    corr = float("nan")
    if len(pred) > 1 and pred.std() > 0 and true.std() > 0:
        corr = float(np.corrcoef(pred, true)[0, 1])
    out = {
        "n": len(pred),
        "mae": float(np.abs(err).mean()) if len(err) else float("nan"),
        "rmse": float(np.sqrt((err**2).mean())) if len(err) else float("nan"),
        "corr": corr,
    }
    if baseline is not None:
        out["mae_constant_baseline"] = float(np.abs(baseline - true).mean()) if len(true) else float("nan")
    return out


def termination_metrics(pred: np.ndarray, true: np.ndarray, weight: np.ndarray | None = None) -> dict:
    """Precision / recall / F1 of predicted terminations.

    Args:
        pred: (N,) bool predicted terminations.
        true: (N,) bool recorded terminations.
        weight: (N,) sample weights (inverse sampling rates when the transitions are a subsample
            that over-represents terminal ones); 1 when None.

    Returns:
        dict with precision, recall, f1, false_positive_rate (of the non-terminal transitions: the
        chance per step that an episode ends for nothing; nan when undefined), positives and
        predicted_positives (unweighted counts).
    """
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    w = np.ones(len(pred)) if weight is None else np.asarray(weight, np.float64)
    tp = float(w[pred & true].sum())
    fp = float(w[pred & ~true].sum())
    fn = float(w[~pred & true].sum())
    tn = float(w[~pred & ~true].sum())
    precision = tp / (tp + fp) if tp + fp > 0 else float("nan")
    recall = tp / (tp + fn) if tp + fn > 0 else float("nan")
    f1 = (2 * precision * recall / (precision + recall)
          if precision == precision and recall == recall and precision + recall > 0 else float("nan"))
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "false_positive_rate": fp / (fp + tn) if fp + tn > 0 else float("nan"),
        "positives": int(true.sum()),
        "predicted_positives": int(pred.sum()),
        "n": len(pred),
    }
