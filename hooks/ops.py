"""Pure tensor operators of the paper (Arditi et al. 2024, section 2.3).

Shared dimension names: `batch pos d_model`. A direction is one vector `[d_model]` for every row of the
batch, or one per row, `[batch, d_model]` (several candidate directions scored in one forward pass).
"""
import torch
from jaxtyping import Float
from torch import Tensor

# The original code's epsilon for r_hat = r / (||r|| + eps).
UNIT_EPS = 1e-8


def unit(direction: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_model"]:
    """r_hat = r / (||r|| + 1e-8), in the direction's own dtype; row by row for `[rows, d_model]`."""
    if direction.ndim == 1:
        return direction / (direction.norm() + UNIT_EPS)
    if direction.ndim == 2:
        return direction / (direction.norm(dim=-1, keepdim=True) + UNIT_EPS)
    raise ValueError(f"a direction must be a vector or one vector per row, got shape {tuple(direction.shape)}")


def _against(direction: Tensor, x: Tensor) -> Tensor:
    """`direction` shaped to broadcast against x: [d_model] as it is, [batch, d_model] as [batch, 1.., d_model]."""
    if direction.ndim == 1:
        return direction
    if direction.ndim != 2 or direction.shape[0] != x.shape[0]:
        raise ValueError(f"per-row directions {tuple(direction.shape)} do not match activations {tuple(x.shape)}")
    return direction.view(direction.shape[0], *([1] * (x.ndim - 2)), direction.shape[1])


def projection(x: Float[Tensor, "... d_model"], unit_dir: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "..."]:
    """The scalar component of x along r_hat: x . r_hat (each row along its own r_hat for `[batch, d_model]`)."""
    if unit_dir.ndim == 1:
        return x @ unit_dir
    _against(unit_dir, x)  # checks the rows match
    return torch.einsum("b...d,bd->b...", x, unit_dir)


def project_out(
    x: Float[Tensor, "... d_model"], unit_dir: Float[Tensor, "*rows d_model"]
) -> Float[Tensor, "... d_model"]:
    """Directional ablation: x - (x . r_hat) r_hat. Returns a new tensor."""
    return x - projection(x, unit_dir).unsqueeze(-1) * _against(unit_dir, x)


def add_scaled(
    x: Float[Tensor, "... d_model"], vector: Float[Tensor, "*rows d_model"], coeff: float
) -> Float[Tensor, "... d_model"]:
    """Activation addition: x + c r, with the raw (unnormalised) r. Returns a new tensor."""
    return x + coeff * _against(vector, x)


def cast_once(vector: Tensor):
    """`on(device, dtype)`: `vector` on that device in that dtype, converted at the first call for each pair
    and kept (a hook runs at every layer of every forward pass and every generated token)."""
    copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def on(device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        if key not in copies:
            copies[key] = vector.to(device=device, dtype=dtype)
        return copies[key]

    return on


def compute_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """Hooks compute in at least float32, whatever the model's dtype, then cast back."""
    return torch.promote_types(activation_dtype, torch.float32)
