"""`tlrefusal orthogonalize --out FILE.gguf`: GGUF in, GGUF out (issue 18).

Checked against independent statements, on tiny GGUF files written by tests/tiny_gguf.py: the metadata and
every untouched tensor byte for byte (read with gguf's own reader); each edited tensor against
W - r_hat r_hat^T W computed here in float64 from the dequantized source, within one quantization step of
its written type per value (the step computed here from each block's values, by ggml's definition of the
format); the file loaded with plain transformers against hook ablation written out here as torch forward
hooks on the source; and bad input leaving nothing behind.
"""
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.tiny_gguf import read_gguf_types, write_tiny_gguf
from tlrefusal.artifacts import RefusalDirection
from tlrefusal.cli import app
from tlrefusal.errors import TlrefusalError
from tlrefusal.export import gguf_export
from tlrefusal.export.gguf_export import CONTROL_FACTOR, export_gguf, record_path
from tlrefusal.model import ModelSource

# Per-value error of one requantization, in units of the block's step (ggml's definitions: Q8_0 d = amax/127;
# Q4_1 d = (max - min)/15), or relative to the block's largest |value| for float types.
STEP = {"Q8_0": ("amax", 127), "Q4_1": ("range", 15)}
FLOAT_REL = {"F32": 1e-5, "F16": 2 ** -10}


def gguf_source(path):
    return ModelSource(str(path), "gguf", path.parent, gguf_file=path.name)


def direction_for(width, seed=0):
    vector = torch.randn(width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return RefusalDirection(vector, 1, -1, "tiny")


def export(src, direction, out, **options):
    """export_gguf with the direction saved beside the source first (the record hashes its file)."""
    file = direction.save(Path(tempfile.mkdtemp(prefix="tlrefusal-test-direction-")) / "direction.safetensors")
    return export_gguf(gguf_source(src), direction, file, out, **options)


def tensors_and_types(path):
    """name -> (type name, torch-order float64 values, raw bytes), read with the gguf package directly."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64).reshape(shape)
        out[t.name] = (t.tensor_type.name, values, bytes(np.asarray(t.data).tobytes()))
    return out


def metadata_bytes(path):
    """key -> the raw bytes of its key-value pair in the file."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: b"".join(bytes(p.tobytes()) for p in f.parts) for k, f in reader.fields.items()
            if not k.startswith("GGUF.")}


def hand_edit(w, r, name):
    """W - r r^T W along d_model: rows of an embedding, the output axis of a projection, a whole bias."""
    if w.ndim == 1:
        return w - (w @ r) * r
    if name.startswith(("token_embd", "position_embd")):
        return w - np.outer(w @ r, r)
    return w - np.outer(r, r @ w)


def within_step(written, expected, type_name):
    """Each written value within one quantization step of the exact edit (per block of 32 for block types)."""
    if type_name in FLOAT_REL:
        scale = np.abs(expected).max()
        return np.abs(written - expected).max() <= FLOAT_REL[type_name] * scale + 1e-7
    measure, levels = STEP[type_name]
    blocks_e = expected.reshape(-1, 32)
    blocks_w = written.reshape(-1, 32)
    if measure == "amax":
        step = np.abs(blocks_e).max(axis=1) / levels
    else:
        step = (blocks_e.max(axis=1) - blocks_e.min(axis=1)) / levels
    return bool((np.abs(blocks_w - blocks_e) <= 1.01 * step[:, None] + 1e-7).all())


WRITERS = ("token_embd.weight", "position_embd.weight", "attn_output.weight", "attn_output.bias",
           "ffn_down.weight", "ffn_down.bias")

CASES = [("llama", "F32", True), ("llama", "F16", True), ("llama", "Q8_0", True), ("llama", "Q4_1", True),
         ("llama", "Q4_K", True), ("llama", "Q8_0", False), ("gpt2", "Q8_0", True), ("gpt2", "F32", False)]


@pytest.mark.parametrize(("arch", "qtype", "tied"), CASES,
                         ids=[f"{a}-{q}-{'tied' if t else 'untied'}" for a, q, t in CASES])
def test_gguf_export_edits_only_the_writers(tmp_path, arch, qtype, tied):
    src = write_tiny_gguf(tmp_path / "src.gguf", arch, qtype, tied)
    before = tensors_and_types(src)
    d_model = before["token_embd.weight"][1].shape[1]
    direction = direction_for(d_model)
    out = tmp_path / "out" / "edited.gguf"
    result = export(src, direction, out, verify="weights")
    after = tensors_and_types(out)
    r = (direction.vector / direction.vector.norm()).numpy()

    assert metadata_bytes(out) == metadata_bytes(src)  # every pair, byte for byte, nothing added
    expected_names = set(before) | ({"output.weight"} if tied else set())
    assert set(after) == expected_names
    edited = 0
    for name, (type_name, w, raw) in before.items():
        new_type, w_new, raw_new = after[name]
        if name.endswith(WRITERS):
            edited += 1
            written_type = "Q8_0" if type_name == "Q4_K" else type_name  # K-quants fall back to Q8_0
            assert new_type == written_type, name
            expected = hand_edit(w, r, name)
            assert within_step(w_new, expected, written_type), name
            # and the edit is really there: without it, values would be more than a step off somewhere
            assert not np.allclose(w_new, w), name
        else:
            assert (new_type, raw_new) == (type_name, raw), name  # untouched: byte for byte
    assert edited == len(result.record.edited_tensors) == 1 + (arch == "gpt2") + 2 * 2 * (1 + (arch == "gpt2"))
    if tied:  # the untied unembedding: the source's embedding bytes, in its own type
        assert after["output.weight"][0] == before["token_embd.weight"][0]
        assert after["output.weight"][2] == before["token_embd.weight"][2]
    assert record_path(out).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, record_path(out).name])
    from transformers import AutoModelForCausalLM  # and transformers loads it, untied where it was untied

    model = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
    assert model.config.tie_word_embeddings is False
    changes = {c.name: (c.source_type, c.written_type) for c in result.record.type_changes}
    assert changes == ({name: ("Q4_K", "Q8_0") for name in result.record.edited_tensors
                        if before[name][0] == "Q4_K"})


def test_gguf_export_loads_in_transformers_and_equals_hook_ablation(tmp_path):
    """An F32 file (no quantization) orthogonalized: transformers' logits equal the source's under ablation
    hooks written out here (the projection removed from the embedding's output and every attention and MLP
    output), and differ from the unedited source's."""
    from transformers import AutoModelForCausalLM

    src = write_tiny_gguf(tmp_path / "src.gguf", "llama", "F32", tied=True)
    direction = direction_for(64, seed=3)
    out = tmp_path / "edited.gguf"
    export(src, direction, out, verify="none")
    r = (direction.vector / direction.vector.norm()).float()
    ids = torch.tensor([[1, 5, 9, 30, 77, 120, 3, 11]])

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    edited, source = load(out), load(src)
    assert not edited.config.tie_word_embeddings
    hooks = [m.register_forward_hook(lambda _m, _i, o: o - (o @ r)[..., None] * r)
             for m in [source.model.embed_tokens]
             + [layer.self_attn.o_proj for layer in source.model.layers]
             + [layer.mlp.down_proj for layer in source.model.layers]]
    with torch.no_grad():
        ablated = source(ids).logits
        for h in hooks:
            h.remove()
        plain = source(ids).logits
        mine = edited(ids).logits
    assert (mine - ablated).abs().max() < 1e-4
    assert (plain - ablated).abs().max() > 1e-2  # the check can fail: ablation changes this model


def test_gguf_full_verification_measures_its_tolerance(tmp_path):
    src = write_tiny_gguf(tmp_path / "src.gguf", "llama", "Q8_0", tied=True)
    result = export(src, direction_for(64, seed=1), tmp_path / "edited.gguf", verify="full")
    record = result.record
    assert record.weights.passed and record.logits.passed
    assert record.exact_check.passed and record.exact_check.max_abs_logit_diff <= 1e-3
    assert record.logits.tolerance == pytest.approx(max(1e-3, CONTROL_FACTOR * record.control.max_abs_logit_diff))
    assert record.control.max_abs_logit_diff > 0  # Q8_0 requantization is not free
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the staging folder is gone


def test_gguf_full_verification_fails_a_plan_that_misses_a_writer(tmp_path, monkeypatch):
    """A writer the plan does not know (here: every FFN down projection dropped from it, as an architecture
    with an extra writer would be) passes the weights check, which reads the plan, but not the exactness
    check, whose hooks ablate the stream itself; nothing is left behind."""
    real_plan = gguf_export.gguf_plan

    def missing_down(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        return replace(plan, edits={n: e for n, e in plan.edits.items() if "ffn_down" not in n})

    monkeypatch.setattr(gguf_export, "gguf_plan", missing_down)
    src = write_tiny_gguf(tmp_path / "src.gguf", "llama", "Q8_0", tied=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(TlrefusalError, match="not edited, or edited wrongly"):
        export(src, direction_for(64, seed=1), tmp_path / "edited.gguf", verify="full")
    assert _nothing_new(tmp_path, before)


def test_gguf_alignment_of_the_source_is_kept(tmp_path):
    src = write_tiny_gguf(tmp_path / "src.gguf", "gpt2", "Q8_0", tied=True, alignment=64)
    out = tmp_path / "edited.gguf"
    export(src, direction_for(64), out, verify="weights")
    import gguf

    reader = gguf.GGUFReader(out)
    assert reader.alignment == 64 and reader.data_offset % 64 == 0
    assert all((t.data_offset - reader.data_offset) % 64 == 0 for t in reader.tensors)
    assert metadata_bytes(out) == metadata_bytes(src)


def test_gguf_shared_keeps_one_matrix(tmp_path):
    src = write_tiny_gguf(tmp_path / "src.gguf", "llama", "Q8_0", tied=True)
    out = tmp_path / "shared.gguf"
    export(src, direction_for(64), out, tied_embeddings="shared",
                verify="weights")
    assert "output.weight" not in read_gguf_types(out)


def _nothing_new(folder, before):
    return sorted(p.name for p in folder.iterdir()) == before


def test_gguf_bad_inputs_leave_nothing_behind(tmp_path):
    import gguf

    src = write_tiny_gguf(tmp_path / "src.gguf", "llama", "Q8_0", tied=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (direction_for(65), tmp_path / "o.gguf", "width 64"),  # a direction of the wrong width
        (direction_for(64), src, "is the source model file"),  # out == source
    ]
    for direction, out, message in cases:
        with pytest.raises(TlrefusalError, match=message):
            export(src, direction, out)
        assert _nothing_new(tmp_path, before)
    with pytest.raises(TlrefusalError, match="choose one the gguf package can write"):
        export(src, direction_for(64), tmp_path / "o.gguf",
                    fallback_type="Q4_K")
    assert _nothing_new(tmp_path, before)

    # an architecture the gguf package does not know
    unknown = tmp_path / "unknown" / "u.gguf"
    unknown.parent.mkdir()
    writer = gguf.GGUFWriter(unknown, "notanarch")
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TlrefusalError, match="unknown GGUF architecture 'notanarch'"):
        export(unknown, direction_for(64), tmp_path / "o.gguf")
    assert _nothing_new(tmp_path, [*before, "unknown"])


def test_cli_gguf_route_and_one_line_errors(tmp_path, tiny_dirs):
    src = write_tiny_gguf(tmp_path / "src.gguf", "llama", "Q4_1", tied=True)
    direction_file = direction_for(64).save(tmp_path / "direction.safetensors")
    runner = CliRunner()
    ok = runner.invoke(app, ["orthogonalize", str(direction_file), "--model", str(src), "--out",
                             str(tmp_path / "o.gguf"), "--verify", "weights"])
    assert ok.exit_code == 0, ok.output
    assert "verified weights" in ok.output and (tmp_path / "o.gguf").is_file()
    again = runner.invoke(app, ["orthogonalize", str(direction_file), "--model", str(src), "--out",
                                str(tmp_path / "o.gguf")])
    assert again.exit_code != 0 and "exists" in again.output and "Traceback" not in again.output
    # a Hugging Face folder cannot become a GGUF here: one line naming the converter
    hf = runner.invoke(app, ["orthogonalize", str(direction_file), "--model", str(tiny_dirs["llama"]), "--out",
                             str(tmp_path / "hf.gguf")])
    assert hf.exit_code != 0 and "convert_hf_to_gguf.py" in hf.output
    assert not (tmp_path / "hf.gguf").exists()


def test_checkpoint_written_in_a_gguf_layout_loads_as_itself(tmp_path):
    """A Hugging Face llama checkpoint (a tiny GGUF loaded, saved, its weights changed) written into the GGUF's
    layout: transformers loads parameters equal to the checkpoint's, q/k included (it un-interleaves what
    the writer interleaved: a wrong permutation would not round-trip)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tlrefusal.export.gguf_layout import write_in_gguf_layout

    template = write_tiny_gguf(tmp_path / "template.gguf", "llama", "Q8_0", tied=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=template.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # a model loaded from GGUF refuses save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a fine-tune of the template's model
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tmp_path, gguf_file=template.name).save_pretrained(folder)
    result = write_in_gguf_layout(folder, template, tmp_path / "out" / "layout.gguf", type_name="F32")
    loaded = AutoModelForCausalLM.from_pretrained(result.out.parent, gguf_file=result.out.name,
                                                  dtype=torch.float32)
    theirs = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(theirs[name], p), name
    assert result.max_abs_logit_diff < 1e-4 and result.argmax_equal == result.n_prompts
    assert metadata_bytes(result.out)["tokenizer.ggml.tokens"] == metadata_bytes(template)["tokenizer.ggml.tokens"]
    assert read_gguf_types(result.out)["blk.0.attn_q.weight"] == "F32"


def test_gguf_edited_type_upgrades_only_the_edited_matrices(tmp_path):
    gpt2 = write_tiny_gguf(tmp_path / "gpt2.gguf", "gpt2", "Q8_0", tied=True)
    result = export(gpt2, direction_for(64), tmp_path / "gpt2-f16.gguf", edited_type="F16", verify="weights")
    types = read_gguf_types(tmp_path / "gpt2-f16.gguf")
    assert {types[n] for n in result.record.edited_tensors if n.endswith(".bias")} == {"F32"}  # 1-D stays F32
    assert {types[n] for n in result.record.edited_tensors if n.endswith(".weight")} == {"F16"}
    src = write_tiny_gguf(tmp_path / "src.gguf", "llama", "Q4_1", tied=True)
    out = tmp_path / "q8.gguf"
    result = export(src, direction_for(64), out, edited_type="Q8_0", verify="weights")
    types, before = read_gguf_types(out), read_gguf_types(src)
    assert {types[name] for name in result.record.edited_tensors} == {"Q8_0"}
    assert types["blk.0.attn_q.weight"] == before["blk.0.attn_q.weight"] == "Q4_1"
    assert types["output.weight"] == before["token_embd.weight"]  # the original embedding, as stored
    assert {c.name for c in result.record.type_changes} == {n for n in result.record.edited_tensors
                                                            if before[n] != "Q8_0"}
    assert result.record.written_bytes > result.record.source_bytes


def test_quantization_steps_are_the_formats_own():
    """The control's noise scale: Q8_0's step is its block's amax / 127, Q4_1's its block's range / 15 (ggml's
    definitions), F16's a value's last-place unit."""
    from tlrefusal.export.gguf_export import quantization_steps

    rows = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    blocks = rows.reshape(3, 2, 32)
    q8 = quantization_steps(rows, "Q8_0").reshape(3, 2, 32)
    assert np.allclose(q8, np.abs(blocks).max(axis=2, keepdims=True) / 127)
    q41 = quantization_steps(rows, "Q4_1").reshape(3, 2, 32)
    assert np.allclose(q41, (blocks.max(axis=2, keepdims=True) - blocks.min(axis=2, keepdims=True)) / 15)
    assert np.allclose(quantization_steps(rows, "F16"), np.abs(rows) / 1024)
