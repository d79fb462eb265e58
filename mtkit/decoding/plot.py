"""Attention heatmaps (source pieces x target pieces), one PNG per sentence; needs matplotlib."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mtkit.errors import MtkitError


def check_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MtkitError("--plot-attention needs matplotlib: pip install 'mtkit[plot]'") from None


def plot_attention(
    attn: torch.Tensor, src_pieces: Sequence[str], tgt_pieces: Sequence[str], path: str | Path, title: str = ""
) -> None:
    """Save ``attn`` (T target steps, S source positions) as a heatmap at ``path``, with a colour
    bar for the weights and ``title`` saying which attention it is."""
    check_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MtkitError(f"cannot create attention plot directory {path.parent}: {exc.strerror}") from None
    t, s = attn.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * s + 2.5), max(3.5, 0.35 * t + 1.5)))
    image = ax.imshow(attn.float().numpy(), cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, label="attention weight")
    if title:
        ax.set_title(title, fontsize=9, wrap=True)
    ax.set_xticks(range(s), list(src_pieces)[:s], rotation=90, fontsize=8)
    ax.set_yticks(range(t), list(tgt_pieces)[:t], fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
