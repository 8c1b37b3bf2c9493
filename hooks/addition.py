"""Activation addition at one layer's residual-stream input, every position."""
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from hooks import sites
from hooks.ablation import HookFn
from hooks.ops import add_scaled, cast_once, compute_dtype


def addition_hook(vector: Float[Tensor, "*rows d_model"], coeff: float) -> HookFn:
    """A hook that returns x + coeff * r with the raw r (its norm matters), computed in >= float32.

    `vector` is one vector for every row, or `[batch, d_model]`: one per row of the batch.
    """
    if vector.ndim not in (1, 2):
        raise ValueError(f"an activation-addition vector must be 1-D or one per row, got shape {tuple(vector.shape)}")
    on = cast_once(vector.detach().to(torch.float64))

    def hook(x: Tensor, hook: object) -> Tensor:
        dtype = compute_dtype(x.dtype)
        return add_scaled(x.to(dtype), on(x.device, dtype), coeff).to(x.dtype)

    return hook


def addition_hooks(vector: Float[Tensor, "*rows d_model"], layer: int | Sequence[int],
                   coeff: float = 1.0) -> list[tuple[str, HookFn]]:
    """Add `coeff * vector` to resid_pre of `layer` at all positions (paper: c=+1 induces refusal).

    With one vector per row (`[batch, d_model]`), `layer` may name each row's own layer: each layer's hook
    adds the vectors of its rows and exactly 0 to the others.
    """
    if isinstance(layer, int):
        return [(sites.resid_pre(layer), addition_hook(vector, coeff))]
    if vector.ndim != 2 or len(layer) != vector.shape[0]:
        raise ValueError(f"one layer per row needs one vector per row: {len(layer)} layers, shape {tuple(vector.shape)}")
    rows = torch.tensor(list(layer), device=vector.device)
    return [(sites.resid_pre(at), addition_hook(torch.where((rows == at).unsqueeze(-1), vector, 0), coeff))
            for at in sorted(set(layer))]
