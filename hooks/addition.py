"""Activation addition at one layer's residual-stream input, every position."""
import torch
from jaxtyping import Float
from torch import Tensor

from hooks import sites
from hooks.ablation import HookFn
from hooks.ops import add_scaled, compute_dtype


def addition_hook(vector: Float[Tensor, " d_model"], coeff: float) -> HookFn:
    """A hook that returns x + coeff * r with the raw r (its norm matters), computed in >= float32."""
    if vector.ndim != 1:
        raise ValueError(f"an activation-addition vector must be 1-D, got shape {tuple(vector.shape)}")
    raw = vector.detach().to(torch.float64)

    def hook(x: Tensor, hook: object) -> Tensor:
        dtype = compute_dtype(x.dtype)
        return add_scaled(x.to(dtype), raw.to(device=x.device, dtype=dtype), coeff).to(x.dtype)

    return hook


def addition_hooks(vector: Float[Tensor, " d_model"], layer: int, coeff: float = 1.0) -> list[tuple[str, HookFn]]:
    """Add `coeff * vector` to resid_pre of `layer` at all positions (paper: c=+1 induces refusal)."""
    return [(sites.resid_pre(layer), addition_hook(vector, coeff))]
