"""Training plots (matplotlib, Agg backend): PNG files written next to the model.

* ``label_distribution.png``: cells and images per class;
* ``labels_per_image.png``: how many classes each image carries;
* ``cooccurrence.png``: class co-occurrence heatmap over images;
* ``history.png``: train/validation loss and PR-AUC per epoch;
* ``per_class_ap.png``: validation average precision per class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from locus.service.classes import CLASS_NAMES, NUM_CLASSES

__all__ = [
    "plot_label_distribution",
    "plot_labels_per_image",
    "plot_cooccurrence",
    "plot_history",
    "plot_per_class_ap",
    "write_all",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _short(name: str, n: int = 22) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _image_matrix(image_labels: Mapping[str, Sequence[int]]) -> np.ndarray:
    y = np.zeros((len(image_labels), NUM_CLASSES), dtype=np.int64)
    for i, labs in enumerate(image_labels.values()):
        for c in labs:
            y[i, int(c)] = 1
    return y


def plot_label_distribution(
    cell_labels: np.ndarray, image_labels: Mapping[str, Sequence[int]], path: str | Path
) -> Path:
    """Bar chart of cells and images per class.

    Parameters
    ----------
    cell_labels : numpy.ndarray
        (N, 19) 0/1 cell targets.
    image_labels : mapping
        Field ID -> class ids.
    path : str or Path
        Output PNG.

    Returns
    -------
    Path
        The written file.
    """
    plt = _plt()
    cells = np.asarray(cell_labels).sum(axis=0)
    images = _image_matrix(image_labels).sum(axis=0)
    x = np.arange(NUM_CLASSES)
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    axes[0].bar(x, cells, color="tab:green")
    axes[0].set_ylabel("cells")
    axes[0].set_title("Label distribution")
    axes[1].bar(x, images, color="tab:blue")
    axes[1].set_ylabel("images")
    axes[1].set_xticks(x, [f"{i} {_short(n)}" for i, n in enumerate(CLASS_NAMES)], rotation=75, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_labels_per_image(image_labels: Mapping[str, Sequence[int]], path: str | Path) -> Path:
    """Histogram of the number of classes per image.

    Parameters
    ----------
    image_labels : mapping
        Field ID -> class ids.
    path : str or Path
        Output PNG.

    Returns
    -------
    Path
        The written file.
    """
    plt = _plt()
    counts = _image_matrix(image_labels).sum(axis=1)
    fig, ax = plt.subplots(figsize=(6, 4))
    top = int(counts.max()) if counts.size else 1
    ax.hist(counts, bins=np.arange(-0.5, top + 1.5, 1.0), color="tab:purple", rwidth=0.85)
    ax.set_xlabel("classes per image")
    ax.set_ylabel("images")
    ax.set_title(f"Labels per image (n = {len(counts)})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_cooccurrence(image_labels: Mapping[str, Sequence[int]], path: str | Path) -> Path:
    """Heatmap of how often two classes occur in the same image.

    Parameters
    ----------
    image_labels : mapping
        Field ID -> class ids.
    path : str or Path
        Output PNG.

    Returns
    -------
    Path
        The written file.
    """
    plt = _plt()
    y = _image_matrix(image_labels)
    co = y.T @ y
    fig, ax = plt.subplots(figsize=(9, 8))
    im = ax.imshow(np.log1p(co), cmap="viridis")
    ticks = [f"{i} {_short(n, 16)}" for i, n in enumerate(CLASS_NAMES)]
    ax.set_xticks(range(NUM_CLASSES), ticks, rotation=80, fontsize=7)
    ax.set_yticks(range(NUM_CLASSES), ticks, fontsize=7)
    for i in range(NUM_CLASSES):
        for j in range(NUM_CLASSES):
            if co[i, j]:
                ax.text(j, i, str(int(co[i, j])), ha="center", va="center", fontsize=5, color="w")
    ax.set_title("Class co-occurrence (images; colour log(1 + n))")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_history(history: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Train/validation loss and PR-AUC per epoch.

    Parameters
    ----------
    history : mapping
        Keras ``History.history``: ``loss``, ``val_loss``, ``pr_auc``, ``val_pr_auc`` lists.
    path : str or Path
        Output PNG.

    Returns
    -------
    Path
        The written file.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "loss", "binary cross-entropy"), (axes[1], "pr_auc", "PR-AUC")):
        for prefix, style in (("", "-"), ("val_", "--")):
            vals = history.get(prefix + key)
            if vals:
                ax.plot(np.arange(1, len(vals) + 1), vals, style, marker="o", label=(prefix or "train_") + key)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_per_class_ap(aps: Sequence[float | None], path: str | Path, title: str = "Validation AP per class") -> Path:
    """Bar chart of per-class average precision (classes without positives marked n/a).

    Parameters
    ----------
    aps : sequence of float or None
        19 values.
    path : str or Path
        Output PNG.
    title : str
        Plot title.

    Returns
    -------
    Path
        The written file.
    """
    plt = _plt()
    vals = np.array([np.nan if a is None else a for a in aps], dtype=float)
    fig, ax = plt.subplots(figsize=(11, 5))
    x = np.arange(len(vals))
    ax.bar(x, np.nan_to_num(vals), color="tab:orange")
    for i, v in enumerate(vals):
        ax.text(i, (0 if np.isnan(v) else v) + 0.01, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", fontsize=7)
    defined = vals[~np.isnan(vals)]
    if defined.size:
        ax.axhline(defined.mean(), color="k", ls="--", lw=1, label=f"mean {defined.mean():.3f}")
        ax.legend()
    ax.set_ylim(0, 1.08)
    ax.set_xticks(x, [f"{i} {_short(n)}" for i, n in enumerate(CLASS_NAMES)], rotation=75, ha="right", fontsize=8)
    ax.set_ylabel("average precision")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_all(
    out_dir: str | Path,
    cell_labels: np.ndarray,
    image_labels: Mapping[str, Sequence[int]],
    history: Mapping[str, Sequence[float]] | None,
    aps: Sequence[float | None] | None,
) -> list[Path]:
    """Write every training plot into a folder.

    Parameters
    ----------
    out_dir : str or Path
        Folder (created).
    cell_labels : numpy.ndarray
        (N, 19) cell targets.
    image_labels : mapping
        Field ID -> class ids.
    history : mapping, optional
        Keras history.
    aps : sequence, optional
        Validation AP per class.

    Returns
    -------
    list of Path
        The PNG files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_label_distribution(cell_labels, image_labels, out / "label_distribution.png"),
        plot_labels_per_image(image_labels, out / "labels_per_image.png"),
        plot_cooccurrence(image_labels, out / "cooccurrence.png"),
    ]
    if history:
        paths.append(plot_history(history, out / "history.png"))
    if aps is not None:
        paths.append(plot_per_class_ap(aps, out / "per_class_ap.png"))
    return paths
