"""`curves.png` in a workdir: the train loss and every evaluation metric against steps.

Redrawn from `metrics.jsonl` at each evaluation, because people would rather look than read.
"""

from __future__ import annotations

import io

import numpy as np

from training import storage


# Rows that are not learning curves: throughput, the schedule, the epoch counter.
_SKIP = ("perf/", "train/lr", "epoch")


def save_png(path, image_HWC) -> None:
    """An HWC float image in [0, 1] as a PNG, renamed into place whole."""
    from matplotlib import image as mpimg
    scale = max(1, 320 // max(image_HWC.shape[0], 1))  # small pictures: pixels made visible
    image_HWC = np.repeat(np.repeat(image_HWC, scale, axis=0), scale, axis=1)
    png = io.BytesIO()
    mpimg.imsave(png, image_HWC, format="png")
    storage.write_whole(path, png.getvalue())


def curve_names(rows: list[dict]) -> list[str]:
    """train/loss first, then every evaluation metric (any prefix but train/), in first-seen order."""
    names = {}
    for row in rows:
        for key in row:
            if key != "step" and not key.startswith(_SKIP) and (key == "train/loss" or not key.startswith("train/")):
                names.setdefault(key, None)
    return sorted(names, key=lambda k: k != "train/loss")


def draw_curves(rows: list[dict], workdir, filename: str = "curves.png"):
    """One small panel per metric of `rows` (metrics.jsonl's); returns the file, or None before
    anything was logged."""
    names = curve_names(rows)
    if not names:
        return None
    plt = _pyplot()
    cols = min(3, len(names))
    rows_n = -(-len(names) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, name in zip(axes.flat, names):
        points = [(r["step"], r[name]) for r in rows if name in r]
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    return _save_figure(fig, storage.as_path(workdir) / filename)


def _pyplot():
    import matplotlib  # imported here: slow to import, and only process 0 draws
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    return plt


def _save_figure(fig, path):
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=90, format="png")
    _pyplot().close(fig)
    storage.write_whole(path, png.getvalue())  # a viewer never sees a half-written file
    return path


def draw_search(path, summary: dict, importances: dict):
    """A search's picture (training/search.py): each trial's value and the best so far, and
    the parameters' importances (optuna's fANOVA) once two trials have finished."""
    plt = _pyplot()
    fig, (history, weights) = plt.subplots(1, 2, figsize=(10, 3.6))
    best, best_so_far = None, []
    better = max if summary["direction"] == "maximize" else min
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
        points = [(r["number"], r["value"]) for r in summary["trials"]
                  if r["state"] == state and r["value"] is not None]
        if points:
            history.scatter(*zip(*points), marker=marker, label=state.lower())
    for r in summary["trials"]:
        if r["state"] == "COMPLETE" and r["value"] is not None:
            best = r["value"] if best is None else better(best, r["value"])
            best_so_far.append((r["number"], best))
    if best_so_far:
        history.step(*zip(*best_so_far), where="post", color="C3", label="best so far")
    history.set(title="optimisation history", xlabel="trial", ylabel=summary["metric"])
    history.legend(fontsize=8)
    history.grid(alpha=0.3)
    if importances:
        names = list(importances)[::-1]
        weights.barh(names, [importances[n] for n in names])
        weights.set(title="parameter importances", xlabel="importance (fANOVA)")
    else:
        weights.text(0.5, 0.5, "importances need two finished trials", ha="center", va="center")
        weights.axis("off")
    return _save_figure(fig, path)
