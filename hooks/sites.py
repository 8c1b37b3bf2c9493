"""The only module that spells TransformerLens hook names.

We use the legacy aliases (`blocks.{l}.hook_resid_pre`, ...) everywhere and never the canonical names
(`blocks.{l}.hook_in`, ...): adding a hook under both would attach it twice, which doubles an addition.
"""


def resid_pre(layer: int) -> str:
    """Input of decoder block `layer`: x^(l) in the paper. Layer 0 is the embedding output."""
    return f"blocks.{layer}.hook_resid_pre"


def attn_out(layer: int) -> str:
    """Output of the attention module of block `layer`, before it is added to the residual stream."""
    return f"blocks.{layer}.hook_attn_out"


def mlp_out(layer: int) -> str:
    """Output of the MLP module of block `layer`, before it is added to the residual stream."""
    return f"blocks.{layer}.hook_mlp_out"


def residual_writers(n_layers: int) -> list[str]:
    """Every site directional ablation edits: resid_pre, attn_out and mlp_out of every block.

    Together they keep resid_pre, resid_mid and resid_post of every layer orthogonal to the direction.
    """
    return [site(layer) for layer in range(n_layers) for site in (resid_pre, attn_out, mlp_out)]
