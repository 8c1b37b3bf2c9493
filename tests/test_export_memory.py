"""Export verification in bounded memory (issue 16, parts 4 and 6): one model alive at a time, the
`--verify full|layers:K|weights|none` modes, and the refusal of pre-quantized sources.

Each mode is tested against an independent statement: `layers:K` must fail on an export corrupted in a
layer below K and pass one corrupted at K or above (which `full` fails: the cut is real), `weights` must
fail on a tensor given back a component along r (or zeroed, or an unedited tensor touched), and the loads
are watched through weak references. Corruptions are written here with plain torch and safetensors.
"""
import json
import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tlrefusal.export.verify as verify_module
from tests.test_export import export, make_direction, tiny
from tlrefusal import artifacts
from tlrefusal.cli import app
from tlrefusal.errors import TlrefusalError
from tlrefusal.export import (
    RECORD,
    WEIGHT_TOLERANCE,
    ExportRecord,
    VerifyMode,
    check_weights,
    export_orthogonalized,
    orthogonalize_direction,
    read_checkpoint,
    verify_export,
)
from tlrefusal.export import weights_check as weights_check_module
from tlrefusal.export.weights import weight_plan
from tlrefusal.model import ModelSource
from tlrefusal.model import load_model as real_load_model
from tlrefusal.placement import Placement

O_PROJ = "model.layers.{}.self_attn.o_proj.weight"  # nn.Linear [d_model, d_in]: d_model is axis 0
DOWN_PROJ = "model.layers.{}.mlp.down_proj.weight"
EMBED = "model.embed_tokens.weight"  # [vocab, d_model]: d_model is axis 1


def r_hat(direction):
    return (direction.vector / direction.vector.norm()).double()


def add_along_r(weight, r, axis, scale=1.0, seed=0):
    """W + scale * r v^T along the d_model axis: a component along r put back into an edited tensor."""
    other = weight.shape[1 - axis] if weight.ndim == 2 else None
    v = torch.randn(other, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) if other else None
    if weight.ndim == 1:
        bump = scale * r
    elif axis == 0:
        bump = scale * torch.outer(r, v)
    else:
        bump = scale * torch.outer(v, r)
    return (weight.double() + bump).to(weight.dtype)


def edited_copy(folder, tmp_path, name, change):
    """A copy of the export `folder` with one tensor of model.safetensors replaced by change(tensor)."""
    copy = tmp_path / f"{folder.name}_{name.replace('.', '_')}"
    shutil.copytree(folder, copy)
    tensors = load_file(copy / "model.safetensors")
    tensors[name] = change(tensors[name])
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def source_of(folder):
    return ModelSource(str(folder), "local", folder)


# --- one model at a time -------------------------------------------------------------------------------

class LoadWatch:
    """Spies on both loads of a verification: which ran, in what order, how many layers each built, and
    whether every plain model loaded earlier was already garbage when the hooked one loaded."""

    def __init__(self, monkeypatch):
        self.events, self.plain_refs, self.placements = [], [], []
        real_plain = verify_module.load_plain

        def plain(folder, placement, trust_remote_code, progress, **kwargs):
            model = real_plain(folder, placement, trust_remote_code, progress, **kwargs)
            self.plain_refs.append(weakref.ref(model))
            self.placements.append(placement)
            self.events.append(("plain", len(model.model.layers), model.config.num_hidden_layers))
            return model

        def hooked(source, placement, **kwargs):
            alive = [ref() is not None for ref in self.plain_refs]
            model = real_load_model(source, placement, **kwargs)
            self.placements.append(placement)
            self.events.append(("hooked", model.n_layers, alive))
            return model

        monkeypatch.setattr(verify_module, "load_plain", plain)
        monkeypatch.setattr("tlrefusal.model.load_model", hooked)


@pytest.mark.parametrize("mode", ["full", "layers:2"])
def test_the_export_is_freed_before_the_source_loads(mode, tmp_path, monkeypatch):
    watch = LoadWatch(monkeypatch)
    folder = tiny(tmp_path, "llama", True)
    _, result = export(folder, tmp_path, verify=mode)
    k = 4 if mode == "full" else 2
    assert watch.events == [("plain", k, k), ("hooked", k, [False])]  # export first, dead before the source
    assert result.record.verification.passed and result.record.verification.layers == (None if k == 4 else 2)
    assert all(p.quantize is None and p.dtype == "float32" for p in watch.placements)


def test_weights_mode_loads_no_model(tmp_path, monkeypatch):
    watch = LoadWatch(monkeypatch)
    folder = tiny(tmp_path, "llama", True)
    _, result = export(folder, tmp_path, verify="weights")
    assert watch.events == [] and result.record.verification.passed
    _, result = export(folder, tmp_path, out_name="none", verify="none")
    assert watch.events == [] and result.record.verification is None and str(result.record.verify) == "none"


# --- layers:K ------------------------------------------------------------------------------------------

def test_layers_k_checks_the_first_k_layers_and_only_those(tmp_path):
    """Corrupt layer 0 (< K=2): layers:2 fails. Corrupt layer 3 (>= K): layers:2 passes while full fails, so
    the comparison really ran on a model cut to two layers."""
    folder = tiny(tmp_path, "llama", False)
    direction, result = export(folder, tmp_path, verify="none")
    r = r_hat(direction)
    early = edited_copy(result.out, tmp_path, O_PROJ.format(0), lambda w: add_along_r(w, r, 0))
    late = edited_copy(result.out, tmp_path, DOWN_PROJ.format(3), lambda w: add_along_r(w, r, 0))
    source = source_of(folder)

    def check(out, layers):
        return verify_export(source, out, direction, layers=layers)

    clean = check(result.out, 2)
    assert clean.passed and clean.layers == 2 and clean.max_abs_logit_diff < 1e-4, clean
    bad_early = check(early, 2)
    assert not bad_early.passed and bad_early.max_abs_logit_diff > 1e-2, bad_early
    assert check(late, 2).passed  # layer 3 is never loaded
    assert check(late, 4).max_abs_logit_diff > 1e-2 and not check(late, None).passed  # ...but it is wrong


def test_first_layers_view_cuts_the_config_and_links_the_rest(tmp_path):
    folder = tiny(tmp_path, "qwen2", False)  # Qwen2's config lists layer_types, one per layer
    with verify_module.first_layers(folder, 3) as view:
        config = json.loads((view / "config.json").read_text())
        assert config["num_hidden_layers"] == 3 and len(config["layer_types"]) == 3
        assert (view / "model.safetensors").is_symlink()
        assert (view / "model.safetensors").resolve() == (folder / "model.safetensors").resolve()
    assert not view.exists()
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 4  # the source untouched
    gpt2 = tiny(tmp_path, "gpt2", True)  # GPT-2 names its count n_layer
    with verify_module.first_layers(gpt2, 1) as view:
        assert json.loads((view / "config.json").read_text())["n_layer"] == 1
    with pytest.raises(TlrefusalError, match="the model has 4 layers"), verify_module.first_layers(folder, 5):
        pass


# --- weights -------------------------------------------------------------------------------------------

def plain_residual(w, r, axis):
    """|r_hat^T W| along the d_model axis over |W| / sqrt(d_model), written out on the whole tensor."""
    w = w.double()
    along = w @ r if (w.ndim == 1 or axis == 1) else r @ w
    return (along.norm() / (w.norm() / r.shape[0] ** 0.5)).item()


@pytest.mark.parametrize(("arch", "tie"), [("llama", True), ("gpt2", True), ("qwen2", False)])
def test_weights_mode_passes_an_export_and_measures_what_plain_torch_does(arch, tie, tmp_path, monkeypatch):
    monkeypatch.setattr(weights_check_module, "CHUNK_BYTES", 200)  # many pieces per tensor, even here
    folder = tiny(tmp_path, arch, tie)
    direction, result = export(folder, tmp_path, verify="weights")
    check, r = result.record.verification, r_hat(direction)
    plan = weight_plan(folder, read_checkpoint(folder).keys)
    out, src = load_file(result.out / "model.safetensors"), load_file(folder / "model.safetensors")
    assert check.passed and check.n_edited == len(plan.edits) and check.n_unedited == len(out) - len(plan.edits)
    residuals = [plain_residual(out[name], r, axis) for name, axis in plan.edits.items()]
    assert check.max_residual == pytest.approx(max(residuals), rel=1e-6, abs=1e-12)
    assert check.max_residual < WEIGHT_TOLERANCE["F32"]
    assert min(plain_residual(src[name], r, axis) for name, axis in plan.edits.items()) > 0.05  # the source's: O(1)
    on_disk = json.loads((result.out / RECORD).read_text())
    assert on_disk["verify"] == "weights" and on_disk["verification"]["mode"] == "weights"
    assert ExportRecord.from_json(on_disk) == result.record
    card = (result.out / "README.md").read_text()
    assert "`--verify weights`" in card and f"{check.n_unedited} tensors are byte-for-byte" in card


def test_weights_mode_fails_a_tensor_with_a_component_along_r(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_check_module, "CHUNK_BYTES", 512)
    folder = tiny(tmp_path, "gpt2", True)  # Conv1D [d_in, d_model] projections, biases, positions
    direction, result = export(folder, tmp_path, verify="none")
    r = r_hat(direction)
    checkpoint = read_checkpoint(folder)
    plan = weight_plan(folder, checkpoint.keys)
    assert check_weights(checkpoint, result.out, plan, r).passed
    small = 0.05  # a component along r a twentieth of a typical row's norm: far above rounding
    cases = {
        "transformer.h.2.attn.c_proj.weight": lambda w: add_along_r(w, r, 1, small * w.norm(dim=1).mean()),
        "transformer.h.1.mlp.c_proj.bias": lambda w: add_along_r(w, r, 0, small * w.norm()),
        "transformer.wpe.weight": lambda w: add_along_r(w, r, 1, small * w.norm(dim=1).mean()),
        "transformer.wte.weight": lambda w: torch.zeros_like(w),  # orthogonal to r, but not the edit
        "transformer.h.0.ln_1.weight": lambda w: w + torch.nn.functional.one_hot(torch.tensor(3), w.numel()) * 1e-3,
    }
    checks = {name: check_weights(checkpoint, edited_copy(result.out, tmp_path, name, change), plan, r)
              for name, change in cases.items()}
    for name, check in checks.items():
        assert not check.passed and check.n_failed == 1 and check.failures[0].startswith(f"{name}:"), (name, check)
    zeroed = checks["transformer.wte.weight"]  # caught by the edit error alone: |0 - (W - r r^T W)| / |W| ~ 1
    assert "residual along r 0," in zeroed.failures[0] and 0.9 < zeroed.max_edit_error <= 1.0


def test_weights_mode_in_bfloat16_passes_within_its_rounding(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tiny(tmp_path, "llama", False)
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(folder / name, bf16)
    _, result = export(bf16, tmp_path, verify="weights")
    check = result.record.verification
    assert check.passed and check.tolerances == {"BF16": WEIGHT_TOLERANCE["BF16"]}
    assert 1e-5 < check.max_residual < WEIGHT_TOLERANCE["BF16"]  # bfloat16 rounding shows, within tolerance


def corrupting(monkeypatch, name, change):
    """Make the export's writer put `change(tensor)` in place of its edit of `name`."""
    import tlrefusal.export.transaction as transaction

    real = transaction._producer

    def producer(reader, tensor_name, axis, unit_dir, advance):
        produce = real(reader, tensor_name, axis, unit_dir, advance)
        return (lambda: change(produce())) if tensor_name == name else produce

    monkeypatch.setattr(transaction, "_producer", producer)


@pytest.mark.parametrize(("mode", "layer", "fails"), [("weights", 3, True), ("layers:2", 1, True),
                                                      ("layers:2", 2, False)])
def test_a_failed_check_leaves_nothing_at_out(mode, layer, fails, tmp_path, monkeypatch):
    folder = tiny(tmp_path, "llama", False)
    direction, _ = make_direction(folder, 32, tmp_path)
    corrupting(monkeypatch, O_PROJ.format(layer), lambda w: add_along_r(w, r_hat(direction), 0))
    if fails:
        with pytest.raises(TlrefusalError, match="verification failed.*nothing was written") as info:
            export(folder, tmp_path, verify=mode)
        assert "\n" not in str(info.value) and (O_PROJ.format(layer) in str(info.value)) == (mode == "weights")
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    else:  # the corrupted layer is beyond K: this mode cannot see it, and says so in the record
        _, result = export(folder, tmp_path, verify=mode)
        assert result.record.verification.passed and "not the later layers" in (result.out / "README.md").read_text()


# --- pre-quantized sources and quantized runs ---------------------------------------------------------

def quantized_copies(folder, tmp_path):
    """Three ways a checkpoint says it is pre-quantized."""
    config = tmp_path / "q_config"
    shutil.copytree(folder, config)
    data = json.loads((config / "config.json").read_text())
    data["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (config / "config.json").write_text(json.dumps(data))
    scales = tmp_path / "q_scales"
    shutil.copytree(folder, scales)
    tensors = load_file(scales / "model.safetensors")
    tensors[O_PROJ.format(0) + "_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, scales / "model.safetensors", metadata={"format": "pt"})
    fp8 = tmp_path / "q_fp8"
    shutil.copytree(folder, fp8)
    tensors = load_file(fp8 / "model.safetensors")
    tensors[O_PROJ.format(1)] = tensors[O_PROJ.format(1)].to(torch.float8_e4m3fn)
    save_file(tensors, fp8 / "model.safetensors", metadata={"format": "pt"})
    return {"quantization_config \\(fp8\\)": config, "quantization scale model.layers.0.self_attn.o_proj."
            "weight_scale_inv": scales, "o_proj.weight as F8_E4M3": fp8}


def test_pre_quantized_sources_are_refused_before_anything_is_written(tmp_path):
    folder = tiny(tmp_path, "llama", False)
    direction, path = make_direction(folder, 32, tmp_path)
    for why, source in quantized_copies(folder, tmp_path).items():
        out = tmp_path / f"out_{source.name}"
        with pytest.raises(TlrefusalError, match=f"pre-quantized checkpoint .*{why}.*unquantized") as info:
            export_orthogonalized(source_of(source), direction, path, out, verify="none")
        assert "\n" not in str(info.value)
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}.*"))
    runner = CliRunner()
    said = runner.invoke(app, ["orthogonalize", str(path), "--model", str(tmp_path / "q_fp8"), "--out",
                               str(tmp_path / "cli")])
    assert said.exit_code == 1 and "pre-quantized" in said.output and "Traceback" not in said.output
    assert not (tmp_path / "cli").exists()


def test_a_run_extracted_quantized_exports_its_full_precision_model(tmp_path, monkeypatch):
    """A run whose config.json says --quantize nf4: the export reads and loads only full precision, and its
    record and card say where the direction came from."""
    watch = LoadWatch(monkeypatch)
    folder = tiny(tmp_path, "llama", False)
    run = tmp_path / "run"
    run.mkdir()
    make_direction(folder, 32, run)  # run/direction.safetensors, as extract writes it
    assert (run / artifacts.DIRECTION).is_file()
    artifacts.write_json(run / artifacts.CONFIG, {"config": {"model": str(folder), "quantize": "nf4"}})
    result = orthogonalize_direction(run, tmp_path / "out", verify="full")
    assert [e[0] for e in watch.events] == ["plain", "hooked"]
    assert all(p.quantize is None for p in watch.placements)
    assert {t.dtype for t in load_file(result.out / "model.safetensors").values()} == {torch.float32}
    assert result.record.direction.quantize == "nf4" and result.record.verification.passed
    assert json.loads((result.out / RECORD).read_text())["direction"]["quantize"] == "nf4"
    assert "nf4-quantized (bitsandbytes) load" in (result.out / "README.md").read_text()
    plain_run = orthogonalize_direction(run / artifacts.DIRECTION, tmp_path / "out2", verify="none")
    assert plain_run.record.direction.quantize == "nf4"  # the direction file of that run: the same record
    with pytest.raises(TlrefusalError, match="drop --quantize nf4"):
        orthogonalize_direction(run, tmp_path / "out3", placement=Placement(quantize="nf4"))
    assert not (tmp_path / "out3").exists()


# --- modes, record, CLI ---------------------------------------------------------------------------------

def test_verify_mode_parsing():
    assert [str(VerifyMode.parse(v)) for v in ("full", "weights", "none", "layers:3", " Layers:12 ", True, False)] \
        == ["full", "weights", "none", "layers:3", "layers:12", "full", "none"]
    for bad in ("layers", "layers:0", "layers:-1", "layers:x", "all", ""):
        with pytest.raises(TlrefusalError, match="choose full, layers:K"):
            VerifyMode.parse(bad)


def test_cli_verify_modes_and_device_map(tmp_path, monkeypatch):
    watch = LoadWatch(monkeypatch)
    folder = tiny(tmp_path, "llama", True)
    _, path = make_direction(folder, 32, tmp_path)
    runner = CliRunner()

    def run(name, *extra):
        said = runner.invoke(app, ["orthogonalize", str(path), "--model", str(folder), "--out", str(tmp_path / name),
                                   *extra])
        return said.exit_code, " ".join(said.output.split())

    code, said = run("w", "--verify", "weights")
    assert code == 0 and "verified weights" in said, said
    device_map = tmp_path / "map.json"
    device_map.write_text(json.dumps({"": "cpu"}))
    code, said = run("k", "--verify", "layers:2", "--device-map", str(device_map))
    assert code == 0 and "verified (first 2 layers only, --verify layers:2)" in said, said
    assert [p.device_map for p in watch.placements] == [str(device_map)] * 2
    assert [e[:2] for e in watch.events] == [("plain", 2), ("hooked", 2)]
    code, said = run("n", "--no-verify")
    assert code == 0 and "not verified (--verify none)" in said
    assert json.loads((tmp_path / "n" / RECORD).read_text())["verify"] == "none"
    for extra, message in ((["--verify", "layers:0"], "unknown --verify 'layers:0'"),
                           (["--verify", "full", "--no-verify"], "disagree"),
                           (["--max-memory", "cpu=1GiB"], "give --device-map too")):
        code, said = run("bad", *extra)
        assert code == 1 and message in said and "Traceback" not in said, said
        assert not (tmp_path / "bad").exists()


def test_old_records_read_as_full_or_none(tmp_path):
    folder = tiny(tmp_path, "llama", False)
    _, result = export(folder, tmp_path, verify="layers:1")
    on_disk = json.loads((result.out / RECORD).read_text())
    assert on_disk["verify"] == "layers:1" and on_disk["verification"]["layers"] == 1
    assert ExportRecord.from_json(on_disk) == result.record
    old = {k: v for k, v in on_disk.items() if k != "verify"}
    old["verification"] = {k: v for k, v in on_disk["verification"].items() if k != "layers"}
    assert str(ExportRecord.from_json(old).verify) == "full"
    assert str(ExportRecord.from_json({**old, "verification": None}).verify) == "none"
