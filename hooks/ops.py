"""Pure tensor operators of the paper (Arditi et al. 2024, section 2.3).

Shared dimension names: `batch pos d_model`.
"""
import torch
from jaxtyping import Float
from torch import Tensor

# The original code's epsilon for r_hat = r / (||r|| + eps).
UNIT_EPS = 1e-8


def unit(direction: Float[Tensor, " d_model"]) -> Float[Tensor, " d_model"]:
    """r_hat = r / (||r|| + 1e-8), in the direction's own dtype."""
    if direction.ndim != 1:
        raise ValueError(f"a direction must be a vector, got shape {tuple(direction.shape)}")
    return direction / (direction.norm() + UNIT_EPS)


def projection(x: Float[Tensor, "... d_model"], unit_dir: Float[Tensor, " d_model"]) -> Float[Tensor, "..."]:
    """The scalar component of x along r_hat: x . r_hat."""
    return x @ unit_dir


def project_out(
    x: Float[Tensor, "... d_model"], unit_dir: Float[Tensor, " d_model"]
) -> Float[Tensor, "... d_model"]:
    """Directional ablation: x - (x . r_hat) r_hat. Returns a new tensor."""
    return x - projection(x, unit_dir).unsqueeze(-1) * unit_dir


def add_scaled(
    x: Float[Tensor, "... d_model"], vector: Float[Tensor, " d_model"], coeff: float
) -> Float[Tensor, "... d_model"]:
    """Activation addition: x + c r, with the raw (unnormalised) r. Returns a new tensor."""
    return x + coeff * vector


def compute_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """Hooks compute in at least float32, whatever the model's dtype, then cast back."""
    return torch.promote_types(activation_dtype, torch.float32)
