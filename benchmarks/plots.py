"""The benchmarks' figures: panels of grouped bars, one bar per server or stack."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Panel:
    title: str
    bars: dict[str, list[float]]  # name -> a value per group, in the order of `groups`
    groups: list[str]  # the x labels


def grouped_bars(
    panels: list[Panel], colors: dict[str, str], title: str, path: Path, legend_from: int = 0
) -> None:
    """Panels side by side (Agg, PNG), a legend of names below, `title` above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    for ax, panel in zip(axes, panels, strict=True):
        names = list(panel.bars)
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(panel.groups))]
            bars = ax.bar(xs, panel.bars[name], width, color=colors.get(name), label=name)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(panel.groups)), panel.groups)
        ax.set_title(panel.title, fontsize=10)
    handles, labels = axes[legend_from].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(len(labels), 1), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
