"""The model card (README.md, `artifacts.MODEL_CARD`) of an orthogonalized checkpoint: its record in prose."""
from tlrefusal.export.record import ExportRecord
from tlrefusal.export.verify import EDITED_UNEMBEDDING, HOOK_ABLATION, Verification
from tlrefusal.export.weights_check import WeightsCheck


def model_card(record: ExportRecord) -> str:
    """What was edited, against which direction, and what verification measured."""
    d = record.direction
    gap = ("" if record.exact else
           f"\n**Approximate**: this architecture puts norms ({', '.join(record.post_norms)}) between the output "
           "projections and the residual stream, so these weights do not equal hook ablation; the gap is above.\n")
    untied = _TIED.get(record.tied_embeddings, "")
    return f"""# {record.source.path.name}, refusal direction orthogonalized

Written by tlrefusal {record.tool_version}: every tensor that writes to the residual stream (embeddings,
attention and MLP output projections, their biases; {len(record.edited_tensors)} tensors) had the refusal
direction projected out, W' = W - r r^T W (Arditi et al. 2024, Appendix E). It is meant for research
on refusal; it will follow harmful instructions.

- source: `{record.source.spec}` ({record.model_type})
- direction: layer {d.layer}, position {d.position}, norm {d.norm:.4g}, `{d.file}` (sha256 {d.sha256[:16]}...)
- tied embeddings: `{record.tied_embeddings or "not tied"}`
{_quantized(d.quantize)}{untied}{gap}
## Verification
{_verified(record.verification)}
"""


_TIED = {
    "untie": "The source ties its unembedding to the embedding; this export unties them, and `lm_head` keeps the "
             "original matrix, as hook ablation does.\n",
    "shared": "\n**Not equal to hook ablation** (`--tied-embeddings shared`, as the paper's code did): the source "
              "ties its unembedding to the embedding, and the shared matrix was orthogonalized once, so the "
              "unembedding lost its component along the direction too (W_U' = W_U - (W_U r) r^T) and the logits "
              "differ from hook ablation's. The checkpoint stays tied.\n",
}
_REFERENCE = {
    HOOK_ABLATION: "the source under directional-ablation hooks (TransformerLens)",
    EDITED_UNEMBEDDING: "the source under directional-ablation hooks (TransformerLens) with its unembedding "
                        "orthogonalized the same way (not hook ablation alone)",
}


def _quantized(quantize: str | None) -> str:
    if quantize is None:
        return ""
    return (f"- the direction was extracted from a {quantize}-quantized (bitsandbytes) load of the model; the "
            "weights edited here are its full-precision checkpoint's\n")


def _verified(check: Verification | WeightsCheck | None) -> str:
    if check is None:
        return "Not verified (`--verify none`)."
    if isinstance(check, WeightsCheck):
        outcome = "passed" if check.passed else f"FAILED for {check.n_failed} tensors: {'; '.join(check.failures)}"
        return (f"`--verify weights` (no model loaded): each of the {check.n_edited} edited tensors, read back, "
                f"has a component along the direction of at most {check.max_residual:.3g} of a typical "
                f"direction's and differs from W - r r^T W recomputed from the source by at most "
                f"{check.max_edit_error:.3g} relative (tolerances {_tolerances(check.tolerances)}); the other "
                f"{check.n_unedited} tensors are byte-for-byte the source's. {outcome}.")
    cut = "" if check.layers is None else (
        f" Both models were cut to their first {check.layers} layers (`--verify layers:{check.layers}`): this "
        "checks the embeddings, those layers' output projections and the unembedding, not the later layers.")
    return (f"Reloaded with plain `transformers` and compared with {_REFERENCE[check.reference]} "
            f"on {check.n_prompts} chat prompts, {check.dtype}: max |logit "
            f"difference| {check.max_abs_logit_diff:.3g} (tolerance {check.tolerance:.3g}); greedy "
            f"continuations of {check.n_tokens} tokens equal for {check.greedy_equal} of "
            f"{check.n_prompts}.{cut}")


def _tolerances(tolerances: dict[str, float]) -> str:
    return ", ".join(f"{dtype} {value:.3g}" for dtype, value in sorted(tolerances.items())) or "none"
