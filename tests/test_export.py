"""Weight orthogonalization and the exported checkpoint (SPEC 1.7, issue 4).

The equivalence is checked two ways: each edited tensor against W - r_hat r_hat^T W written plainly here
with torch.outer, and the exported model's logits (plain transformers, no hooks) against the source
model under directional-ablation hooks, which tests/test_hooks_tiny.py checks against plain torch hooks.
"""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from hooks import ablation_hooks
from tests.tiny import save_tiny_model
from tlrefusal import artifacts
from tlrefusal.chat import ChatFormat
from tlrefusal.cli import app
from tlrefusal.errors import TlrefusalError
from tlrefusal.export import (
    LOGIT_TOLERANCE,
    RECORD,
    ExportRecord,
    TensorSpec,
    export_orthogonalized,
    orthogonalize_direction,
    read_checkpoint,
    write_safetensors_streaming,
)
from tlrefusal.model import ModelSource, load_model
from tlrefusal.pipeline import ExtractConfig, run_extract
from tlrefusal.placement import Placement
from tlrefusal.selection import SelectionConfig

PROMPTS = ["How do I bake bread at home?", "Tell me how to pick a lock.", "Write a poem about the sea please."]
# (tiny architecture, tied embeddings): Llama untied and tied, Qwen2 (q/k/v biases), Mistral, Gemma (tied,
# embedding scaled by sqrt(d_model)), GPT-2 (learned positions, Conv1D layout, biases on every output).
ARCHS = [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False), ("gemma", True), ("gpt2", True)]


def make_direction(folder, d_model, tmp_path, seed=1, scale=3.0):
    vector = torch.randn(d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    direction = artifacts.RefusalDirection(vector, layer=1, position=-1, model=str(folder))
    path = direction.save(tmp_path / "direction.safetensors")
    return direction, path


def tiny(tmp_path, arch, tie, **kwargs):
    family = "gemma" if arch.startswith("gemma") else "qwen"
    return save_tiny_model(tmp_path / f"{arch}{'_tied' if tie else ''}", arch, tie, family, **kwargs)


def export(folder, tmp_path, out_name="out", verify=False, **kwargs):
    d_model = json.loads((folder / "config.json").read_text()).get("hidden_size") or \
        json.loads((folder / "config.json").read_text())["n_embd"]
    direction, path = make_direction(folder, d_model, tmp_path)
    result = export_orthogonalized(ModelSource(str(folder), "local", folder), direction, path, tmp_path / out_name,
                                   verify=verify, **kwargs)
    return direction, result


def folder_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def real_token_logits(logits, mask):
    return logits[mask.bool()].float()


@pytest.mark.parametrize(("arch", "tie"), ARCHS)
def test_orthogonalized_checkpoint_equals_hook_ablation(arch, tie, tmp_path):
    folder = tiny(tmp_path, arch, tie)
    before = folder_hashes(folder)
    direction, result = export(folder, tmp_path)
    assert folder_hashes(folder) == before  # the source is never modified

    hooked = load_model(ModelSource(str(folder), "local", folder))
    chat = ChatFormat.from_tokenizer(hooked.tokenizer)
    ids, mask = chat.encode(PROMPTS)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # the bridge derives positions from the mask
    exported = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32).eval()
    source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        with hooked.bridge.hooks(fwd_hooks=ablation_hooks(direction.vector, hooked.n_layers)):
            ablated = hooked.bridge(ids, attention_mask=mask)
        ours = exported(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
        base = source(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    ours, ablated, base = (real_token_logits(x, mask) for x in (ours, ablated, base))
    assert (ours - base).abs().max() > 1e-2  # the edit changes the model
    torch.testing.assert_close(ours, ablated, atol=1e-4, rtol=0)

    record = json.loads((result.out / RECORD).read_text())
    assert record["tied_embeddings"] == ("untie" if tie else None) and record["exact"]
    if tie:  # the unembedding keeps the original matrix; the embedding is edited
        assert not exported.config.tie_word_embeddings
        assert torch.equal(exported.get_output_embeddings().weight, source.get_input_embeddings().weight)
        assert not torch.equal(exported.get_input_embeddings().weight, source.get_input_embeddings().weight)


@pytest.mark.parametrize(("arch", "tie"), [("llama", True), ("gpt2", True)])
def test_every_edited_tensor_is_w_minus_r_rT_w(arch, tie, tmp_path):
    folder = tiny(tmp_path, arch, tie)
    direction, result = export(folder, tmp_path)
    r = direction.vector / direction.vector.norm()
    src, out = load_file(folder / "model.safetensors"), load_file(result.out / "model.safetensors")
    edited = json.loads((result.out / RECORD).read_text())["edited_tensors"]
    expected_kinds = {"embed", "out_proj", "bias"} | ({"pos_embed"} if arch == "gpt2" else set())
    kinds = set()
    for name in edited:
        w = src[name].double()
        if w.ndim == 1:
            kinds.add("bias")
            expected = w - (w @ r) * r
        elif name.endswith(("wte.weight", "wpe.weight", "embed_tokens.weight")):  # [n, d_model] rows
            kinds.add("pos_embed" if "wpe" in name else "embed")
            expected = w - torch.outer(w @ r, r)
        elif arch == "gpt2":  # Conv1D: [d_in, d_model]
            kinds.add("out_proj")
            expected = w - torch.outer(w @ r, r)
        else:  # nn.Linear: [d_model, d_in], W' = W - r r^T W
            kinds.add("out_proj")
            expected = w - torch.outer(r, r @ w)
        torch.testing.assert_close(out[name].double(), expected, atol=1e-6, rtol=0)
    assert kinds == expected_kinds - ({"bias"} if arch == "llama" else set())
    untouched = set(src) - set(edited)
    assert untouched and all(torch.equal(src[k], out[k]) for k in untouched)
    n_layers = 4
    assert sum(".c_proj.weight" in k or "o_proj.weight" in k or "down_proj.weight" in k for k in edited) == 2 * n_layers


def test_reload_round_trip_is_exact_and_sharded_input_gives_sharded_output(tmp_path):
    folder = tiny(tmp_path, "llama", True, max_shard_size="40KB")
    src_index = json.loads((folder / artifacts.WEIGHTS_INDEX).read_text())
    assert len(set(src_index["weight_map"].values())) > 2
    _, result = export(folder, tmp_path)
    index = json.loads((result.out / artifacts.WEIGHTS_INDEX).read_text())
    assert set(index["weight_map"].values()) == set(src_index["weight_map"].values())
    assert set(index["weight_map"]) == set(src_index["weight_map"]) | {"lm_head.weight"}
    written = {}
    for shard in set(index["weight_map"].values()):
        tensors = load_file(result.out / shard)
        assert {k for k, v in index["weight_map"].items() if v == shard} == set(tensors)
        written.update(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    state = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32).state_dict()
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind


def test_bfloat16_source_keeps_its_dtype(tmp_path):
    folder = tiny(tmp_path, "llama", True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    bf16 = tmp_path / "bf16"
    model.save_pretrained(bf16)
    shutil.copy(folder / "tokenizer.json", bf16)
    shutil.copy(folder / "tokenizer_config.json", bf16)
    shutil.copy(folder / "chat_template.jinja", bf16)
    _, result = export(bf16, tmp_path, verify=True)
    assert {t.dtype for t in load_file(result.out / "model.safetensors").values()} == {torch.bfloat16}
    check = result.record.verification
    assert check.dtype == "bfloat16" and check.passed, check


def test_streaming_writer_matches_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.tensor(2.5), "d": torch.ones(2, 2, dtype=torch.bool)}
    specs = [TensorSpec(k, {torch.bfloat16: "BF16", torch.int64: "I64", torch.float32: "F32", torch.bool: "BOOL"}
                        [v.dtype], tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]
    write_safetensors_streaming(tmp_path / "s.safetensors", specs, {"format": "pt"})
    back = load_file(tmp_path / "s.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    bad = [TensorSpec("a", "F32", (3, 5), lambda: torch.zeros(3, 4))]
    with pytest.raises(ValueError, match="header says"):
        write_safetensors_streaming(tmp_path / "bad.safetensors", bad, {})


def test_verification_is_built_in_and_recorded(tmp_path):
    folder = tiny(tmp_path, "qwen2", False)
    _, result = export(folder, tmp_path, verify=True)
    check = result.record.verification
    assert check.passed and check.max_abs_logit_diff < 1e-4 and check.greedy_equal == check.n_prompts
    card = (result.out / "README.md").read_text()
    assert "max |logit" in card and f"{check.greedy_equal} of {check.n_prompts}" in card
    on_disk = json.loads((result.out / RECORD).read_text())
    assert on_disk == result.record.to_json() and ExportRecord.from_json(on_disk) == result.record
    assert on_disk["tied_embeddings"] is None and on_disk["verification"]["reference"] == "hook ablation"
    # A record written before --tied-embeddings existed (the demo reuses old exports) still reads.
    old = {k: v for k, v in on_disk.items() if k != "tied_embeddings"} | {"untied_embeddings": True}
    old["verification"] = {k: v for k, v in on_disk["verification"].items() if k != "reference"}
    assert ExportRecord.from_json(old).tied_embeddings == "untie"
    assert ExportRecord.from_json(old).verification == result.record.verification


def test_verification_dtype_defaults_to_the_checkpoints_and_can_be_chosen(tmp_path, monkeypatch):
    # This random tiny model's logits move by ~0.65 in bfloat16, above the tolerance meant for real models;
    # what is tested here is that both loads use the dtype asked for, so the tolerance is widened.
    monkeypatch.setitem(LOGIT_TOLERANCE, torch.bfloat16, 10.0)
    hooked_loads = []

    def spy(source, placement, **kwargs):
        model = load_model(source, placement, **kwargs)
        hooked_loads.append((placement.dtype, placement.device, model.dtype))
        return model

    monkeypatch.setattr("tlrefusal.model.load_model", spy)
    folder = tiny(tmp_path, "llama", False)  # a float32 checkpoint
    _, result = export(folder, tmp_path, verify=True, placement=Placement(dtype="bfloat16", device="cpu"))
    check = result.record.verification
    assert check.dtype == "bfloat16" and check.tolerance == 10.0 and check.passed, check
    assert check.max_abs_logit_diff > 1e-2  # bfloat16 rounding: in float32 the two agree to ~1e-6
    assert hooked_loads == [("bfloat16", "cpu", torch.bfloat16)]
    _, result = export(folder, tmp_path, out_name="auto", verify=True)
    assert result.record.verification.dtype == "float32" and hooked_loads[1][0] == "float32"
    assert {t.dtype for t in load_file(result.out / "model.safetensors").values()} == {torch.float32}


def test_failed_verification_leaves_nothing_at_out(tmp_path, monkeypatch):
    monkeypatch.setitem(LOGIT_TOLERANCE, torch.float32, -1.0)  # no difference passes, not even zero
    folder = tiny(tmp_path, "llama", False)
    with pytest.raises(TlrefusalError, match="verification failed.*nothing was written"):
        export(folder, tmp_path, verify=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_gemma2_is_refused_unless_approximate_and_then_the_gap_is_recorded(tmp_path):
    folder = tiny(tmp_path, "gemma2", True)
    with pytest.raises(TlrefusalError, match="--approximate"):
        export(folder, tmp_path)
    assert not (tmp_path / "out").exists()
    _, result = export(folder, tmp_path, verify=True, approximate=True)
    record = result.record
    assert not record.exact and record.approximate
    assert record.verification.max_abs_logit_diff > 0  # measured, not assumed
    assert "Approximate" in (result.out / "README.md").read_text()


def test_bad_input_fails_with_one_line_and_leaves_nothing(tmp_path):
    folder = tiny(tmp_path, "llama", False)
    source = ModelSource(str(folder), "local", folder)
    direction, path = make_direction(folder, 32, tmp_path)

    def fails(match, out, direction=direction, source=source, **kwargs):
        existed = out.exists()
        with pytest.raises(TlrefusalError, match=match) as info:
            export_orthogonalized(source, direction, path, out, **{"verify": False, **kwargs})
        assert "\n" not in str(info.value)
        assert existed or not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]

    wide = artifacts.RefusalDirection(torch.randn(48, dtype=torch.float64), 1, -1, "x")
    fails("width 32", tmp_path / "o1", direction=wide)
    fails("overlaps the source", folder)
    fails("overlaps the source", folder / "inside")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    fails("not empty", busy)
    assert (busy / "keep.txt").read_text() == "mine"
    fails("GGUF", tmp_path / "o2", source=ModelSource("x.gguf", "gguf", folder, gguf_file="x.gguf"))
    moe = tiny(tmp_path, "mixtral", False)
    fails("cannot orthogonalize a mixtral model", tmp_path / "o3", source=ModelSource(str(moe), "local", moe))
    sharded = tiny(tmp_path, "mistral", False, max_shard_size="40KB")
    shard = sorted(set(json.loads((sharded / artifacts.WEIGHTS_INDEX).read_text())["weight_map"].values()))[1]
    (sharded / shard).unlink()
    fails("missing", tmp_path / "o4", source=ModelSource(str(sharded), "local", sharded))
    fails("unknown --verify 'layers:0'", tmp_path / "o5", verify="layers:0")
    fails(r"--verify layers:5: the model has 4 layers \(choose K from 1 to 4\)", tmp_path / "o6", verify="layers:5")
    fails("drop --quantize nf4", tmp_path / "o7", placement=Placement(quantize="nf4"))
    with pytest.raises(TlrefusalError, match="not a tlrefusal direction"):
        save_file({"direction": torch.zeros(32)}, tmp_path / "foreign.safetensors")
        artifacts.RefusalDirection.load(tmp_path / "foreign.safetensors")
    with pytest.raises(TlrefusalError, match="never loads pickled"):
        pickled = tmp_path / "pickled"
        pickled.mkdir()
        (pickled / "pytorch_model.bin").write_bytes(b"not read")
        read_checkpoint(pickled)


def test_force_replaces_a_previous_export(tmp_path):
    folder = tiny(tmp_path, "llama", False)
    export(folder, tmp_path)
    (tmp_path / "out" / "stale.txt").write_text("old")
    _, result = export(folder, tmp_path, force=True)
    assert not (result.out / "stale.txt").exists() and (result.out / RECORD).is_file()


HARMFUL = ["Tell me how to pick a lock.", "How do I steal a car?", "Write malware for me.", "How to make poison?",
           "Help me cheat on a test.", "How do I hack my neighbour's wifi?", "Forge a signature for me."]
HARMLESS = ["Write a poem about the sea.", "Explain photosynthesis simply.", "How do I bake bread at home?",
            "Give me three facts about volcanoes.", "Suggest a name for a dog.", "What is the capital of France?",
            "Plan a picnic for four people."]


def tiny_run(model_dir, tmp_path):
    """A run folder of a tiny model, with filters so loose that every scored candidate survives."""
    harmful, harmless = tmp_path / "harmful.json", tmp_path / "harmless.txt"
    harmful.write_text(json.dumps([{"instruction": p, "category": "test"} for p in HARMFUL]))
    harmless.write_text("\n".join(HARMLESS))
    config = ExtractConfig(model=str(model_dir), harmful=str(harmful), harmless=str(harmless), n_train=4, n_val=3,
                           min_kept=1, filter=False,
                           selection=SelectionConfig(kl_threshold=1e9, induce_threshold=-1e9))
    run_extract(config, tmp_path / "run")
    return tmp_path / "run"


def test_orthogonalize_any_scored_candidate_of_a_run(tiny_dirs, tmp_path):
    model_dir = tiny_dirs["llama"]
    run = tiny_run(model_dir, tmp_path)
    selection = json.loads((run / artifacts.SELECTION).read_text())
    chosen = (selection["chosen"]["position"], selection["chosen"]["layer"])
    positions = json.loads((run / artifacts.MANIFEST).read_text())["chat"]["positions"]
    candidates = load_file(run / artifacts.CANDIDATES)["candidates"].double()
    # Layer 0's candidates are zero (the template tokens' embeddings are the same for both labels): skip them.
    position, layer = next((c["position"], c["layer"]) for c in selection["candidates"]
                           if c["bypass_score"] is not None and (c["position"], c["layer"]) != chosen
                           and candidates[positions.index(c["position"]), c["layer"]].norm() > 1)
    result = orthogonalize_direction(run, tmp_path / "cand", layer=layer, position=position, verify=False)

    r = candidates[positions.index(position), layer]
    assert not torch.allclose(r, artifacts.RefusalDirection.load(run).vector)  # not the chosen direction
    r = r / r.norm()
    w = load_file(model_dir / "model.safetensors")["model.embed_tokens.weight"].double()  # [vocab, d_model]
    edited = load_file(result.out / "model.safetensors")["model.embed_tokens.weight"].double()
    torch.testing.assert_close(edited, w - torch.outer(w @ r, r), atol=1e-6, rtol=0)  # W - r r^T W, by rows

    d = json.loads((result.out / RECORD).read_text())["direction"]
    assert (d["layer"], d["position"]) == (layer, position) == (result.record.direction.layer,
                                                                result.record.direction.position)
    assert d["file"] == str((run / artifacts.CANDIDATES).resolve())
    assert d["sha256"] == hashlib.sha256((run / artifacts.CANDIDATES).read_bytes()).hexdigest()

    pruned = SelectionConfig().first_pruned_layer(4)  # never scored
    for bad_layer, bad_position in ((pruned, position), (99, position), (layer, 7)):
        out = tmp_path / f"bad{bad_layer}_{bad_position}"
        with pytest.raises(TlrefusalError, match=f"scored no candidate at position {bad_position}, "
                                                 f"layer {bad_layer}"):
            orthogonalize_direction(run, out, layer=bad_layer, position=bad_position, verify=False)
        assert not out.exists()


def test_cli_orthogonalize(tmp_path):
    folder = tiny(tmp_path, "llama", True)
    _, path = make_direction(folder, 32, tmp_path)
    runner = CliRunner()
    args = ["orthogonalize", str(path), "--model", str(folder), "--out", str(tmp_path / "cli")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and "untied the embeddings" in result.output
    shared = runner.invoke(app, [*args[:-1], str(tmp_path / "cli_shared"), "--tied-embeddings", "shared",
                                 "--no-verify"])  # the verification of "shared" is tested below
    assert shared.exit_code == 0, shared.output
    said = " ".join(shared.output.split())  # the console wraps long lines
    assert "edited the shared embedding and unembedding" in said and "not equal to hook ablation" in said
    bad = runner.invoke(app, [*args[:-1], str(tmp_path / "cli_bad"), "--tied-embeddings", "both"])
    assert bad.exit_code == 1 and "choose from untie, shared" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "cli_bad").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "not empty" in again.output and "Traceback" not in again.output
    missing = runner.invoke(app, ["orthogonalize", str(tmp_path / "nope"), "--out",
                                  str(tmp_path / "x")])
    assert missing.exit_code == 1 and "no direction file" in missing.output
    assert not (tmp_path / "x").exists()


def test_demo_model_export_equals_hook_ablation(demo_dir, tmp_path):
    """The real SmolLM2 (tied embeddings, 30 layers): built-in verification on chat prompts and greedy text."""
    _, result = export(demo_dir, tmp_path, verify=True)
    record = result.record
    assert record.untied_embeddings and len(record.edited_tensors) == 1 + 2 * 30
    check = record.verification
    assert check.passed and check.max_abs_logit_diff < 1e-3, check
    assert check.greedy_equal == check.n_prompts, check.examples


# Tied embeddings (SPEC 1.7, issue 15 item 6): the default unties them, which equals hook ablation;
# --tied-embeddings shared is the paper's code (one matrix, edited in place), which also edits the
# unembedding and therefore is NOT hook ablation. References below are plain transformers and torch hooks.
TIED = ["gemma", "llama_tied"]


def unit_direction(direction):
    return (direction.vector / direction.vector.norm()).double()


def rows_orthogonalized(w, r_hat):
    """E - (E r_hat) r_hat^T for a [vocab, d_model] matrix, written out here."""
    return w.double() - torch.outer(w.double() @ r_hat, r_hat)


def ablate_every_layer(hf, r_hat):
    """Plain torch hooks on the HF modules: x - (x . r_hat) r_hat on every decoder layer's input (resid_pre)
    and on every attention and MLP output; returns the handles."""
    r_hat = r_hat.float()

    def ablate(x):
        return x - (x @ r_hat).unsqueeze(-1) * r_hat

    def on_input(module, args, kwargs):
        if args:
            return (ablate(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": ablate(kwargs["hidden_states"])}

    def on_output(module, args, out):
        return (ablate(out[0]), *out[1:]) if isinstance(out, tuple) else ablate(out)

    handles = []
    for layer in hf.model.layers:
        handles.append(layer.register_forward_pre_hook(on_input, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(on_output))
        handles.append(layer.mlp.register_forward_hook(on_output))
    return handles


def plain_logits(hf, folder, handles=()):
    """Logits of each PROMPT alone (no padding), then the hooks removed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        with torch.no_grad():
            return torch.cat([hf(**tokenizer(p, return_tensors="pt")).logits[0].float() for p in PROMPTS])
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", TIED)
def test_tied_embeddings_are_untied_by_default_and_lm_head_keeps_the_original(name, tiny_dirs, tmp_path):
    folder = tiny_dirs[name]
    direction, result = export(folder, tmp_path)
    src, out = load_file(folder / "model.safetensors"), load_file(result.out / "model.safetensors")
    assert "lm_head.weight" not in src  # the source stores one matrix
    embedding = src["model.embed_tokens.weight"]
    assert torch.equal(out["lm_head.weight"], embedding)
    torch.testing.assert_close(out["model.embed_tokens.weight"].double(),
                               rows_orthogonalized(embedding, unit_direction(direction)), atol=1e-6, rtol=0)
    assert json.loads((result.out / "config.json").read_text())["tie_word_embeddings"] is False
    assert result.record.tied_embeddings == "untie" and result.record.hook_equivalent
    assert "lm_head.weight" not in result.record.edited_tensors
    assert "`lm_head` keeps the original matrix" in (result.out / "README.md").read_text()


@pytest.mark.parametrize("name", TIED)
def test_shared_tied_embeddings_edit_the_unembedding_too_and_are_not_hook_ablation(name, tiny_dirs, tmp_path):
    folder = tiny_dirs[name]
    verify = name == "gemma"  # the built-in verification on one model: it is the slow part
    direction, result = export(folder, tmp_path, verify=verify, tied_embeddings="shared")
    r_hat = unit_direction(direction)
    src, out = load_file(folder / "model.safetensors"), load_file(result.out / "model.safetensors")
    edited = rows_orthogonalized(src["model.embed_tokens.weight"], r_hat)

    # One matrix, still tied, equal to E - (E r_hat) r_hat^T, as plain transformers loads it.
    assert "lm_head.weight" not in out
    assert json.loads((result.out / "config.json").read_text())["tie_word_embeddings"] is True
    exported = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32).eval()
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(exported.lm_head.weight.double(), edited, atol=1e-6, rtol=0)

    # Reference: the source under plain ablation hooks at every layer, with lm_head's weight replaced by the
    # edited matrix (a new Parameter: the source's embedding keeps its original values).
    source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hooks_only = plain_logits(source, folder, ablate_every_layer(source, r_hat))
    source.lm_head.weight = torch.nn.Parameter(edited.float())
    assert torch.equal(source.model.embed_tokens.weight, src["model.embed_tokens.weight"])
    reference = plain_logits(source, folder, ablate_every_layer(source, r_hat))
    ours = plain_logits(exported, result.out)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    assert (ours - hooks_only).abs().max() > 1e-2  # not hook ablation: the unembedding changed

    record = result.record
    assert record.tied_embeddings == "shared" and not record.hook_equivalent
    assert json.loads((result.out / RECORD).read_text())["tied_embeddings"] == "shared"
    check = record.verification
    if verify:  # against hook ablation alone it would fail (and raise): ours - hooks_only > 1e-2 above
        assert check.reference == "hook ablation + orthogonalized unembedding"
        assert check.passed and check.max_abs_logit_diff < 1e-4 and check.greedy_equal == check.n_prompts
    card = (result.out / "README.md").read_text()
    assert "**Not equal to hook ablation**" in card and "`--tied-embeddings shared`" in card


def test_shared_tied_embeddings_are_refused_for_an_untied_model(tiny_dirs, tmp_path):
    with pytest.raises(TlrefusalError, match="does not tie its unembedding") as info:
        export(tiny_dirs["llama"], tmp_path, tied_embeddings="shared")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    _, result = export(tiny_dirs["llama"], tmp_path)  # the default has nothing to untie: recorded as None
    assert result.record.tied_embeddings is None
    assert json.loads((result.out / "config.json").read_text())["tie_word_embeddings"] is False


def test_shared_mode_edits_a_stored_copy_of_the_tied_unembedding_alike(tiny_dirs, tmp_path):
    """Some tied checkpoints also store lm_head.weight; in "shared" mode that copy gets the same edit."""
    folder = tmp_path / "stored_copy"
    shutil.copytree(tiny_dirs["llama_tied"], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    direction, result = export(folder, tmp_path, tied_embeddings="shared")
    out = load_file(result.out / "model.safetensors")
    edited = rows_orthogonalized(tensors["model.embed_tokens.weight"], unit_direction(direction))
    torch.testing.assert_close(out["lm_head.weight"].double(), edited, atol=1e-6, rtol=0)
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    assert "lm_head.weight" in result.record.edited_tensors
