"""Float64 running means of residual-stream activations at chosen positions and layers."""
import einops
import torch
from jaxtyping import Float
from torch import Tensor

from hooks import sites
from hooks.ablation import HookFn


class MeanRecorder:
    """Accumulates sum_i x_i^(l)[pos] in float64 over prompts, without keeping per-prompt activations.

    `positions` are negative indices from the end of the (left-padded) sequence, e.g. range(-5, 0), so
    every prompt contributes its own post-instruction tokens whatever its length.
    """

    def __init__(self, positions: list[int], layers: list[int], d_model: int) -> None:
        if not positions or any(p >= 0 for p in positions):
            raise ValueError(f"positions must be non-empty negative indices, got {positions}")
        self.positions = list(positions)
        self.layers = list(layers)
        self._sum = torch.zeros(len(self.positions), len(self.layers), d_model, dtype=torch.float64)
        self.count = 0

    def hooks(self) -> list[tuple[str, HookFn]]:
        """One read-only hook per layer; the first layer's hook also counts the prompts."""
        pos = torch.tensor(self.positions)

        def make(index: int) -> HookFn:
            def hook(x: Tensor, hook: object) -> None:
                picked = einops.reduce(x[:, pos.to(x.device), :].to(torch.float64),
                                       "batch n_pos d_model -> n_pos d_model", "sum")
                self._sum[:, index, :] += picked.cpu()
                if index == 0:
                    self.count += x.shape[0]
                return None

            return hook

        return [(sites.resid_pre(layer), make(i)) for i, layer in enumerate(self.layers)]

    def mean(self) -> Float[Tensor, "n_pos n_layer d_model"]:
        if self.count == 0:
            raise ValueError("no prompts were recorded")
        return self._sum / self.count
