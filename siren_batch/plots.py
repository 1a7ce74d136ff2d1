"""matplotlib figures of the frames that siren_batch.explore returns; the
notebooks show them and the run report embeds them as PNG. Every function
takes a frame and returns a Figure.

    from siren_batch import explore, plots
    plots.predicted_vs_true(explore.predicted_vs_true(cfg)).savefig("pvt.png")

No pyplot: figures are built as objects and rendered by Agg when saved, so
nothing here picks a backend (jobs and tests need no display) and a notebook's
own backend stays as it was; they show themselves in Jupyter through _repr_png_.
"""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import polars as pl
from matplotlib.figure import Figure

WIDE, TALL = (9.0, 3.6), (9.0, 5.0)


class ShownFigure(Figure):
    """A Figure that Jupyter (IPython's display) shows as PNG whatever the backend."""

    def _repr_png_(self) -> bytes:
        return png(self)


def _figure(size=WIDE, ncols: int = 1) -> tuple[Figure, list]:
    fig = ShownFigure(figsize=size, layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def predicted_vs_true(pairs: pl.DataFrame) -> Figure:
    """Left: distributions of true and predicted ratings; right: predicted per true rating."""
    fig, (hist, box) = _figure(ncols=2)
    lo, hi = np.floor(min(pairs["true_rating"].min(), pairs["predicted"].min())), pairs["true_rating"].max()
    bins = np.arange(lo - 0.25, hi + 0.5, 0.25)
    hist.hist(pairs["true_rating"].to_numpy(), bins=bins, alpha=0.6, label="true")
    hist.hist(pairs["predicted"].to_numpy(), bins=bins, alpha=0.6, label="predicted")
    hist.set(xlabel="rating", ylabel="pairs", title=f"ratings ({pairs.height} pairs with truth)")
    hist.legend()
    levels = sorted(pairs["true_rating"].unique().to_list())
    groups = [pairs.filter(pl.col("true_rating") == v)["predicted"].to_numpy() for v in levels]
    box.boxplot(groups, tick_labels=[f"{v:g}" for v in levels])
    box.plot(range(1, len(levels) + 1), levels, "k:", label="perfect")
    box.set(xlabel="true rating", ylabel="predicted rating", title="predicted by true rating")
    box.legend()
    return fig


def _error_bars(ax, labels: list[str], frame: pl.DataFrame, horizontal: bool = False) -> None:
    pos, width = np.arange(len(labels)), 0.4
    bar = ax.barh if horizontal else ax.bar
    for k, metric in enumerate(("mae", "rmse")):
        bar(pos + (k - 0.5) * width, frame[metric].to_numpy(), width, label=metric.upper())
    (ax.set_yticks if horizontal else ax.set_xticks)(pos, labels)
    ax.legend()


def error_by_history(frame: pl.DataFrame) -> Figure:
    """MAE and RMSE per history-length bucket, with the pairs per bucket."""
    fig, (ax,) = _figure()
    _error_bars(ax, [f"{h}\n(n={n})" for h, n in zip(frame["history"], frame["n"])], frame)
    ax.set(xlabel="ratings the user made before", ylabel="error", title="error by history length")
    return fig


def error_by_topic(frame: pl.DataFrame, top: int = 20) -> Figure:
    """MAE and RMSE per topic of the rated item (the `top` topics with most pairs)."""
    frame = frame.head(top)
    fig, (ax,) = _figure((9.0, 1.2 + 0.35 * frame.height))
    _error_bars(ax, [f"{name[:40]} (n={n})" for name, n in zip(frame["name"], frame["n"])], frame, True)
    ax.invert_yaxis()
    ax.set(xlabel="error", title="error by topic of the item")
    return fig


def topic_sizes(frame: pl.DataFrame) -> Figure:
    """Items per topic, largest first, labelled with the topic names."""
    fig, (ax,) = _figure((9.0, 1.2 + 0.3 * frame.height))
    ax.barh(np.arange(frame.height), frame["size"].to_numpy(), color="tab:green")
    ax.set_yticks(np.arange(frame.height), [f"{t}: {name[:45]}" for t, name in zip(frame["topic_id"], frame["name"])])
    ax.invert_yaxis()
    ax.set(xlabel="items", title=f"topic sizes ({frame.height} topics)")
    return fig


def projection(frame: pl.DataFrame, max_legend: int = 20) -> Figure:
    """Items on the first two principal components of their embeddings, coloured by topic."""
    fig, (ax,) = _figure(TALL)
    topics = frame["topic_id"].to_numpy() if "topic_id" in frame.columns else np.zeros(frame.height)
    cmap = matplotlib.colormaps["tab20"]
    for k, topic in enumerate(np.unique(topics)):
        pick = topics == topic
        name = frame["topic"][int(np.argmax(pick))] if "topic" in frame.columns else None
        ax.scatter(frame["x"].to_numpy()[pick], frame["y"].to_numpy()[pick], s=6, color=cmap(k % 20),
                   label=f"{topic}: {name[:30]}" if name and k < max_legend else None)
    ax.set(xlabel=f"PC1 ({frame['pc1_share'][0]:.0%} of variance)",
           ylabel=f"PC2 ({frame['pc2_share'][0]:.0%})", title=f"item embeddings ({frame.height} items)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def token_savings(savings) -> Figure:
    """Per-pair prompt tokens of sketch and raw-history prompts (an explore.TokenSavings)."""
    fig, (ax,) = _figure()
    pairs = savings.pairs
    top = max(pairs["raw_tokens"].max(), pairs["sketch_tokens"].max())
    bins = np.linspace(0, top, 40)
    ax.hist(pairs["raw_tokens"].to_numpy(), bins=bins, alpha=0.6, label="raw history", color="tab:red")
    ax.hist(pairs["sketch_tokens"].to_numpy(), bins=bins, alpha=0.6, label="sketch", color="tab:blue")
    saved = savings.summary["saved_fraction"]
    title = "prompt tokens per pair" + (f": sketches save {saved:.0%}" if saved is not None else "")
    ax.set(xlabel="prompt tokens", ylabel="pairs", title=title)
    ax.legend()
    return fig


def png(fig: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
