"""Intervention kernels for the refusal direction: pure torch, no model loading, no files, no console.

`hooks` knows hook names (`sites`), the tensor math (`ops`) and how to turn a direction into
TransformerLens hook functions (`ablation`, `addition`, `recording`). It never imports `tlrefusal`.
"""
from hooks.ablation import ablation_hooks
from hooks.addition import addition_hooks
from hooks.ops import add_scaled, project_out, projection, unit
from hooks.recording import MeanRecorder

__all__ = [
    "MeanRecorder",
    "ablation_hooks",
    "add_scaled",
    "addition_hooks",
    "project_out",
    "projection",
    "unit",
]
