"""Line plots, heatmaps and bar charts as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_lines(path: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
               title: str, markers: bool = True, legend: bool = True) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, points in series.items():
    ax.plot([x for x, _ in points], [y for _, y in points], marker="o" if markers else None,
            label=name, linewidth=1.0 if markers else 0.7)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.grid(alpha=0.3)
  if legend and len(series) > 1:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_intervals(path: str, series: dict[str, list[tuple[float, float, float | None, float | None]]],
                   xlabel: str, ylabel: str, title: str, logx: bool = True) -> None:
  """One line per series through (x, y) points, with a bar from lo to hi where given."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for i, (name, points) in enumerate(series.items()):
    points = sorted(points)
    xs = [x * (1 + 0.02 * (i - len(series) / 2)) for x, *_ in points]  # bars side by side
    ys = [y for _, y, _, _ in points]
    err = [[y - lo if lo is not None else 0 for _, y, lo, _ in points],
           [hi - y if hi is not None else 0 for _, y, _, hi in points]]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, linewidth=1.0, label=name)
  ax.axhline(0, color="black", linewidth=0.6)
  if logx:
    ax.set_xscale("log")
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.title.set_fontsize(9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_heatmap(path: str, values: np.ndarray, xlabel: str, ylabel: str, title: str,
                 yticklabels=None, cmap: str = "viridis") -> None:
  plt = _plt()
  from matplotlib.ticker import MaxNLocator
  fig, ax = plt.subplots(figsize=(max(6.5, values.shape[1] * 0.12 + 2.5),
                                  max(2.5, values.shape[0] * 0.35 + 1.4)))
  im = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  if yticklabels is not None:
    ax.set_yticks(range(len(yticklabels)), yticklabels)
  else:
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def bar_chart(path: str, values: dict[str, float], title: str, xlabel: str) -> None:
  """Horizontal bars, largest on top."""
  plt = _plt()
  items = sorted(values.items(), key=lambda kv: kv[1])
  fig, ax = plt.subplots(figsize=(6, 0.35 * len(items) + 1.2))
  ax.barh([k for k, _ in items], [v for _, v in items])
  ax.set(xlabel=xlabel, title=title)
  ax.title.set_fontsize(9)
  ax.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
