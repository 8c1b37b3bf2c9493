"""Property tests of the intervention math against the formulas written out plainly."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hooks import add_scaled, project_out, projection, unit
from hooks.ablation import ablation_hook
from hooks.addition import addition_hook
from tlrefusal.export.weights import orthogonalize_tensor

seeds = st.integers(min_value=0, max_value=2**31 - 1)
dims = st.integers(min_value=2, max_value=64)


def rand(seed: int, *shape: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@settings(max_examples=50, deadline=None)
@given(seeds, dims)
def test_unit_has_norm_one_and_keeps_direction(seed, d):
    r = rand(seed, d) * 7.3
    r_hat = unit(r)
    assert torch.isclose(r_hat.norm(), torch.tensor(1.0, dtype=torch.float64), atol=1e-7)
    assert torch.allclose(r_hat * r.norm(), r, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(seeds, dims)
def test_project_out_matches_formula_and_is_orthogonal(seed, d):
    x, r = rand(seed, 3, 5, d), rand(seed + 1, d)
    r_hat = r / (torch.sqrt((r * r).sum()) + 1e-8)
    # The paper's formula, element by element: x' = x - (sum_k x_k r_hat_k) r_hat.
    expected = x - (x * r_hat).sum(-1, keepdim=True) * r_hat
    out = project_out(x, unit(r))
    assert torch.allclose(out, expected, atol=1e-10)
    # Not exactly 0: r_hat = r / (|r| + 1e-8) is a hair shorter than a unit vector (ORIG's epsilon).
    assert projection(out, unit(r)).abs().max() < 1e-6 * (1 + x.norm(dim=-1).max())
    assert torch.allclose(project_out(out, unit(r)), out, atol=1e-6)  # idempotent


@settings(max_examples=30, deadline=None)
@given(seeds, dims, st.floats(min_value=-3, max_value=3, allow_nan=False))
def test_add_scaled_matches_formula(seed, d, c):
    x, r = rand(seed, 2, 4, d), rand(seed + 1, d)
    assert torch.allclose(add_scaled(x, r, c), x + c * r)


def test_hooks_keep_activation_dtype_and_compute_in_float32():
    r = rand(0, 16)
    x = rand(1, 2, 3, 16, dtype=torch.float32).to(torch.bfloat16)
    ablated = ablation_hook(r)(x, None)
    assert ablated.dtype == torch.bfloat16
    # Computed in float32 then rounded once: as close to the float64 result as bf16 can be.
    exact = project_out(x.to(torch.float64), unit(r))
    assert (ablated.to(torch.float64) - exact).abs().max() <= exact.abs().max() * 2**-7
    added = addition_hook(r.to(torch.float32), 2.0)(x, None)
    assert added.dtype == torch.bfloat16
    assert torch.allclose(added.double(), x.double() + 2.0 * r, atol=0.1)


def test_hook_returns_new_tensor_and_leaves_input_alone():
    x = rand(2, 2, 3, 8, dtype=torch.float32)
    before = x.clone()
    out = ablation_hook(rand(3, 8))(x, None)
    assert out.data_ptr() != x.data_ptr()
    assert torch.equal(x, before)


@pytest.mark.parametrize("block_bytes", [None, 2 * 6 * 4])  # whole, or two float32 rows of d_model 6 a block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("axis", [0, 1])
def test_orthogonalize_tensor_is_project_out_along_the_axis(axis, dtype, block_bytes):
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn((6, 5) if axis == 0 else (5, 6), generator=gen) * 2).to(dtype)  # d_model = 6 on `axis`
    r_hat = unit(torch.randn(6, generator=gen, dtype=torch.float64))
    out = orthogonalize_tensor(w, r_hat, axis, **({} if block_bytes is None else {"block_bytes": block_bytes}))
    w64, r = w.double(), r_hat
    expected = w64 - torch.outer(r, r @ w64) if axis == 0 else w64 - torch.outer(w64 @ r, r)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected.to(dtype).double(), atol=1e-2 if dtype == torch.bfloat16
                               else 1e-5, rtol=0)
    residual = (out.double().movedim(axis, -1) @ r).abs().max()
    assert residual < (1e-1 if dtype == torch.bfloat16 else 1e-5)
    bias = orthogonalize_tensor(w[:, 0] if axis == 0 else w[0], r_hat, 0)
    assert abs(bias.double() @ r) < (1e-1 if dtype == torch.bfloat16 else 1e-5)


def test_per_row_directions_ablate_and_add_each_row_along_its_own():
    """One direction per batch row ([batch, d_model]): row b is ablated along its own r_hat and gets its own
    c r added, written out here row by row."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    r = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    r_hat = unit(r)
    for b in range(3):
        assert torch.allclose(r_hat[b], r[b] / (r[b].norm() + 1e-8))
        expected = x[b] - (x[b] @ r_hat[b]).unsqueeze(-1) * r_hat[b]
        assert torch.allclose(project_out(x, r_hat)[b], expected)
        assert torch.allclose(add_scaled(x, r, -2.0)[b], x[b] - 2.0 * r[b])
    with pytest.raises(ValueError, match="do not match"):
        project_out(x, r_hat[:2])
