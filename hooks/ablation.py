"""Directional ablation hooks at every residual writer of every layer."""
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

from hooks import sites
from hooks.ops import cast_once, compute_dtype, project_out, unit

HookFn = Callable[[Tensor, object], Tensor]


def ablation_hook(direction: Float[Tensor, "*rows d_model"]) -> HookFn:
    """One hook function that returns x - (x . r_hat) r_hat, with r_hat normalised once, here.

    `direction` is one vector for every row, or `[batch, d_model]`: each row of the batch along its own.

    The math runs in float32 (or float64 if the direction is float64) and the result is cast back to the
    activation's dtype, so a bf16 model is ablated as precisely as its activations allow.
    """
    unit_dir = unit(direction.detach().to(torch.float64))
    on = cast_once(unit_dir)

    def hook(x: Tensor, hook: object) -> Tensor:
        dtype = compute_dtype(x.dtype)
        return project_out(x.to(dtype), on(x.device, dtype)).to(x.dtype)

    return hook


def ablation_hooks(direction: Float[Tensor, "*rows d_model"], n_layers: int) -> list[tuple[str, HookFn]]:
    """(hook name, function) pairs that ablate `direction` at every layer and every position.

    Use as `with model.hooks(fwd_hooks=ablation_hooks(r, n_layers)): ...`.
    """
    hook = ablation_hook(direction)
    return [(name, hook) for name in sites.residual_writers(n_layers)]
