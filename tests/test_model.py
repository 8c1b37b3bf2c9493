"""Model sources: local folders, GGUF files, hub ids (offline here), and their errors."""
import pytest

from tlrefusal.chat import ChatFormat
from tlrefusal.errors import TlrefusalError
from tlrefusal.model import ModelSource, load_model, resolve_source
from tlrefusal.placement import Placement


def test_local_folder(tiny_dirs):
    src = resolve_source(str(tiny_dirs["llama"]))
    assert src.kind == "local" and src.path == tiny_dirs["llama"]
    assert src.to_json()["loaded_from"] == str(tiny_dirs["llama"].resolve())


@pytest.mark.parametrize("spec,message", [
    ("./does/not/exist", "no model folder or file"),
    ("/nonexistent-model-folder", "no model folder or file"),
    ("bad id with spaces", "no model folder or file"),
])
def test_missing_paths(spec, message):
    with pytest.raises(TlrefusalError, match=message):
        resolve_source(spec)


def test_folder_without_config_and_non_gguf_file(tmp_path):
    with pytest.raises(TlrefusalError, match="no config.json"):
        resolve_source(str(tmp_path))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(TlrefusalError, match="not a .gguf model"):
        resolve_source(str(f))


def test_uncached_hub_id_offline_fails_clearly():
    with pytest.raises(TlrefusalError, match="could not get 'nobody-here/no-such-model' from the Hugging Face hub"):
        resolve_source("nobody-here/no-such-model")


def test_model_without_chat_template_loads_and_needs_one_to_run(tiny_dirs, tmp_path):
    import shutil

    folder = tmp_path / "plain"
    shutil.copytree(tiny_dirs["llama"], folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"chat_template"', '"unused_template"'))
    model = load_model(ModelSource("plain", "local", folder))  # --chat-template can give it one
    with pytest.raises(TlrefusalError, match="no chat template; pass --chat-template"):
        ChatFormat.from_tokenizer(model.tokenizer)


def test_bad_dtype(tiny_dirs):
    with pytest.raises(TlrefusalError, match="unknown dtype"):
        load_model(ModelSource("x", "local", tiny_dirs["llama"]), Placement(dtype="float8"))


def test_loaded_model_is_raw_hf_weights(tiny_models, tiny_dirs):
    """No weight processing: the bridge's parameters are the checkpoint's tensors, untouched."""
    from safetensors.torch import load_file

    model = tiny_models["llama"]
    saved = load_file(str(tiny_dirs["llama"] / "model.safetensors"))
    hf = model.bridge.original_model
    for name, tensor in saved.items():
        assert (hf.get_parameter(name).detach() == tensor).all(), name
    assert model.tokenizer.padding_side == "left"
