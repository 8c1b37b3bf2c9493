import os
from pathlib import Path

import pytest
import torch

from tests.tiny import save_tiny_model
from tlrefusal.model import ModelSource, load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SPLITS = SHARED / "data" / "datasets" / "splits"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach the hub: an uncached hub id must fail at once, as it does on an offline machine.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    specs = {"llama": ("llama", False, "qwen"), "llama_tied": ("llama", True, "qwen"),
             "qwen2": ("qwen2", False, "qwen"), "gemma": ("gemma", True, "gemma")}
    return {name: save_tiny_model(root / name, arch, tie, family) for name, (arch, tie, family) in specs.items()}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    return {name: load_model(ModelSource(name, "local", path)) for name, path in tiny_dirs.items()}


def demo_model_dir() -> Path | None:
    from tlrefusal.demo import demo_model_dir as folder

    path = folder()
    return path if (path / "config.json").is_file() else None


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    path = demo_model_dir()
    if path is None:
        if os.environ.get("TLREFUSAL_REQUIRE_DEMO") == "1":
            pytest.fail("the demo model is required here (TLREFUSAL_REQUIRE_DEMO=1); run `tlrefusal fetch-demo`")
        pytest.skip("demo model not fetched; run `tlrefusal fetch-demo`")
    return path


@pytest.fixture(scope="session")
def demo_model(demo_dir):
    return load_model(ModelSource("smollm2", "builtin", demo_dir))
