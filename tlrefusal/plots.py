"""Figures: heatmaps of the selection scores over (position, layer), as in the paper's Figure 9-style
plots, and the eval report's refusal bars and projection scatter."""
import math

from tlrefusal.evaluation.magnitude import MagnitudeStudy
from tlrefusal.evaluation.scores import DatasetScores
from tlrefusal.selection import SelectionResult


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (set here, not at import time: never open a window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def selection_heatmaps(result: SelectionResult, eoi_tokens: list[str]):
    """One figure with bypass, induce and KL heatmaps; the chosen candidate is circled."""
    import numpy as np

    plt = _pyplot()

    positions = sorted({c.position for c in result.candidates})
    layers = sorted({c.layer for c in result.candidates})
    grids = {name: np.full((len(positions), len(layers)), np.nan)
             for name in ("bypass_score", "induce_score", "kl_score")}
    for c in result.candidates:
        for name, grid in grids.items():
            value = getattr(c, name)
            grid[positions.index(c.position), layers.index(c.layer)] = value if not math.isnan(value) else np.nan
    labels = [f"{p} {tok!r}" for p, tok in zip(positions, eoi_tokens, strict=False)]
    fig, axes = plt.subplots(3, 1, figsize=(max(6, len(layers) * 0.35), 2.2 * len(positions) * 0.55 + 5))
    titles = {"bypass_score": "bypass (refusal log-odds under ablation; lower is better)",
              "induce_score": "induce (refusal log-odds under +r at the layer; higher is better)",
              "kl_score": "KL on harmless val under ablation"}
    for ax, (name, grid) in zip(axes, grids.items(), strict=True):
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_title(titles[name], fontsize=9)
        ax.set_yticks(range(len(positions)), labels, fontsize=7)
        ax.set_xticks(range(len(layers)), layers, fontsize=6)
        ax.set_xlabel("layer", fontsize=8)
        fig.colorbar(im, ax=ax)
        if result.chosen is not None:
            ax.scatter([layers.index(result.chosen.layer)], [positions.index(result.chosen.position)],
                       s=80, facecolors="none", edgecolors="red")
    fig.tight_layout()
    return fig


def refusal_bars(scores: dict[str, DatasetScores]):
    """Refusal score per dataset (groups) and intervention (bars), from an eval report's scores."""
    plt = _pyplot()

    datasets = list(scores)
    interventions = list(dict.fromkeys(iv for entry in scores.values() for iv in entry.interventions))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(datasets) * len(interventions) / 2), 3.2))
    width = 0.8 / len(interventions)
    for i, iv in enumerate(interventions):
        values = [scores[d].interventions[iv].refusal_score if iv in scores[d].interventions else float("nan")
                  for d in datasets]
        ax.bar([x + i * width for x in range(len(datasets))], values, width, label=iv)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(datasets))], datasets, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("refusal score (substring)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def projection_scatter(magnitude: MagnitudeStudy, layer: int):
    """Projection ratio vs baseline refusal log-odds, one colour per dataset (the magnitude study)."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, s in magnitude.datasets.items():
        r = "n/a" if s.pearson_r is None else f"{s.pearson_r:.2f}"
        ax.scatter(s.projection_ratio, s.refusal_log_odds, s=10, label=f"{name} (r = {r})")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel(f"projection ratio (a . r) / |r|^2 at layer {layer}, position -1")
    ax.set_ylabel("refusal log-odds (baseline)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
