"""What every analysis of ``segrouter analyze`` shares: its figure, one value per LLM layer and series."""

from __future__ import annotations

from pathlib import Path


def plot_per_layer(series: dict[str, list[float]], path: Path, *, title: str, ylabel: str,
                   reference: tuple[str, float] | None = None) -> None:
    """One line per labelled series over the LLM layers (values in [0, 1]), with an optional horizontal
    ``(label, value)`` reference line, saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, values in series.items():
        ax.plot(range(len(values)), values, marker="o", label=label)
    if reference is not None:
        ax.axhline(reference[1], color="grey", linestyle="--", label=reference[0])
    ax.set_xlabel("LLM layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
