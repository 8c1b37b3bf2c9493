"""Heatmaps of the selection scores over (position, layer), as in the paper's Figure 9-style plots."""
import math

from tlrefusal.selection import SelectionResult


def selection_heatmaps(result: SelectionResult, eoi_tokens: list[str]):
    """One figure with bypass, induce and KL heatmaps; the chosen candidate is circled."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window (set here, not at import time)
    import matplotlib.pyplot as plt
    import numpy as np

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
