"""Where a run's chat template comes from: the tokenizer, one of the paper's formats by name, or a file.

The paper's formats reproduce the original code's hand-written prompt strings (SPEC section 2) as jinja
templates, with no system prompt. The original let the tokenizer add BOS; tlrefusal tokenizes with
`add_special_tokens=False`, so a format writes `{{ bos_token }}` exactly where the family's tokenizer adds
one (Llama-2, Llama-3 and Gemma add BOS; Qwen and Yi do not).
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path

from tlrefusal.errors import TlrefusalError

# ChatML as the original writes it for Qwen chat and Yi chat: '<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n'.
_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
           "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

PAPER_FORMATS = {
    "qwen-chat": _CHATML,
    "yi-chat": _CHATML,
    # '<start_of_turn>user\n{x}<end_of_turn>\n<start_of_turn>model\n'
    "gemma-it": ("{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == "
                 "'assistant' else message['role']) + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    # '[INST] {x} [/INST] ' (with the trailing space); an assistant turn ends with EOS.
    "llama-2-chat": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                     "{{ '[INST] ' + message['content'] + ' [/INST] ' }}{% else %}{{ message['content'] + ' ' + "
                     "eos_token }}{% endif %}{% endfor %}"),
    # '<|start_header_id|>user<|end_header_id|>\n\n{x}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
    "llama-3-instruct": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                         "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
                         "{% endif %}"),
}

TOKENIZER, PAPER, FILE = "tokenizer", "paper", "file"

# `extract --paper`: the paper's format for a model of one of its five families, known by the config's
# model_type and vocab_size (Llama-2, Yi and Llama-3 all have model_type "llama"; Qwen-1 chat has no
# Hugging Face template at all, so a family cannot be read from the template).
PAPER_FAMILIES = {
    ("qwen", 151936): "qwen-chat",  # Qwen-1.8B/7B-Chat
    ("qwen", 152064): "qwen-chat",  # Qwen-14B/72B-Chat
    ("llama", 64000): "yi-chat",  # Yi-6B/34B-Chat
    ("gemma", 256000): "gemma-it",  # Gemma-2B/7B-it
    ("llama", 32000): "llama-2-chat",  # Llama-2-7B/13B/70B-chat
    ("llama", 128256): "llama-3-instruct",  # Llama-3-8B/70B-Instruct
}


def paper_format_for(model_config: dict) -> str:
    """The paper's format name for a model's config.json, or a one-line error for other families."""
    key = (model_config.get("model_type"), model_config.get("vocab_size"))
    if key not in PAPER_FAMILIES:
        raise TlrefusalError(f"--paper needs a model of the paper's five families (Qwen chat, Yi chat, Gemma it, "
                             f"Llama-2 chat, Llama-3 instruct); this one has model_type {key[0]!r} and vocab_size "
                             f"{key[1]}: give --chat-template instead")
    return PAPER_FAMILIES[key]


@dataclass(frozen=True, kw_only=True)
class ChatTemplate:
    """A chat template's text and where it came from (recorded in the run's manifest)."""

    source: str  # TOKENIZER, PAPER or FILE
    text: str
    name: str | None = None  # the paper format's name
    path: str | None = None  # the file it was read from

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def to_json(self) -> dict:
        data = {"source": self.source, "sha256": self.sha256, "text": self.text}
        if self.name is not None:
            data["name"] = self.name
        if self.path is not None:
            data["path"] = self.path
        return data

    @classmethod
    def from_json(cls, data: dict) -> "ChatTemplate":
        return cls(source=data["source"], text=data["text"], name=data.get("name"), path=data.get("path"))


def resolve_template(spec: str | None) -> ChatTemplate | None:
    """`--chat-template NAME|FILE`: a paper format by name or a jinja file; None keeps the tokenizer's."""
    if spec is None:
        return None
    if spec in PAPER_FORMATS:
        return ChatTemplate(source=PAPER, text=PAPER_FORMATS[spec], name=spec)
    path = Path(spec)
    if not path.is_file():
        raise TlrefusalError(f"chat template {spec!r} is neither one of the paper's formats "
                             f"({', '.join(PAPER_FORMATS)}) nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TlrefusalError(f"cannot read chat template file {path}: {exc}") from exc
    if not text.strip():
        raise TlrefusalError(f"chat template file {path} is empty")
    return ChatTemplate(source=FILE, text=text, path=str(path))
