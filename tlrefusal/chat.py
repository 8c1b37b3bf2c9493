"""Chat formatting, post-instruction positions and refusal tokens, read from the run's chat template.

- The template is the tokenizer's own, or one given with `--chat-template` (a paper format by name or a
  jinja file; `tlrefusal.chat_templates`). Prompts are one user message and no system message of ours
  (templates that insert a default system prompt, like SmolLM2's or Qwen1.5's, keep it, as in the NNsight
  replication), tokenized with `add_special_tokens=False`: the template writes any BOS itself.
- One rule, as the NNsight replication: if the rendered generation prompt ends in neither a newline nor a
  space, a space is appended. Llama-2-chat's Hugging Face template ends ' [/INST]'; the original code's
  format ends '[/INST] '.
- The post-instruction ("end-of-instruction", eoi) tokens are the template text after the instruction,
  tokenized alone, as the original code does (SPEC 1.2); the candidate positions are range(-n_eoi, 0)
  into each left-padded prompt.
- SentencePiece writes a dummy prefix '▁' at the start of the text it is given (after BOS). A tokenizer
  whose Metaspace pre-tokenizer prepends '▁' only when the text does not start with a space
  (prepend_scheme "first", how transformers 5 loads Llama-2's vocabulary) loses it before a leading space,
  and after a BOS the template wrote as text. Both are restored, so ' [/INST] ' gives the original's six
  tokens ('▁', '▁[', '/', 'INST', ']', '▁') and '<s>[INST]' gives [BOS, '▁[', 'INST', ']'].
- Refusal tokens: the first token of each refusal phrase as the model would write it right after the
  template. The phrases are the paper's per family, keyed by the config's model_type.
"""
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tlrefusal import artifacts
from tlrefusal.chat_templates import PAPER_FORMATS, TOKENIZER, ChatTemplate
from tlrefusal.errors import TlrefusalError

_SENTINEL = "TLREFUSALINSTRUCTIONSENTINEL"

# The paper's refusal phrases by config model_type: Llama-2, Llama-3 and Yi (all "llama") and
# Gemma use 'I'; Qwen uses 'I' and 'As'. Other families get DEFAULT_REFUSAL_PHRASES.
PAPER_REFUSAL_PHRASES = {"llama": ("I",), "gemma": ("I",), "qwen": ("I", "As")}
DEFAULT_REFUSAL_PHRASES = ("I", "As")


@dataclass(frozen=True)
class ChatFormat:
    """How one model's template wraps an instruction, and where its post-instruction tokens are."""

    tokenizer: object
    template: ChatTemplate
    suffix: str
    eoi_ids: tuple[int, ...]
    # Tokens that end a reply: EOS, and the special token the template writes after an assistant turn
    # (Gemma's <end_of_turn> and Llama-3's <|eot_id|> are not the tokenizer's EOS).
    stop_ids: tuple[int, ...] = ()
    trailing_space: bool = False  # the rendered prompt ended in neither '\n' nor ' ', so ' ' is appended
    dummy_prefix: str | None = None  # SentencePiece's dummy prefix, restored where the tokenizer drops it

    @classmethod
    def from_tokenizer(cls, tokenizer, template: ChatTemplate | None = None) -> "ChatFormat":
        """The format of `template` (default: the tokenizer's own chat template) with this tokenizer."""
        if template is None:
            template = _tokenizer_template(tokenizer)
        rendered = _render(tokenizer, template, _SENTINEL)
        if rendered.count(_SENTINEL) != 1:
            raise TlrefusalError("the chat template does not place the user message exactly once")
        if rendered.endswith(_SENTINEL):  # checked before the trailing-space rule, which would add ' '
            raise TlrefusalError("the chat template puts nothing after the instruction, so there are no "
                                 "post-instruction positions")
        trailing_space = not rendered.endswith(("\n", " "))
        rules = cls(tokenizer=tokenizer, template=template, suffix="", eoi_ids=(), trailing_space=trailing_space,
                    dummy_prefix=_dummy_prefix(tokenizer))
        suffix = rules.format(_SENTINEL).split(_SENTINEL)[-1]
        return replace(rules, suffix=suffix, eoi_ids=tuple(rules.text_ids(suffix)),
                       stop_ids=_stop_ids(tokenizer, template))

    @classmethod
    def for_run(cls, run_dir: Path, tokenizer) -> "ChatFormat":
        """The format a run was extracted with (its manifest's template); runs whose manifest names no
        template (written before templates were recorded) use the tokenizer's."""
        return cls.from_tokenizer(tokenizer, run_template(run_dir))

    def format(self, instruction: str) -> str:
        return _render(self.tokenizer, self.template, instruction) + (" " if self.trailing_space else "")

    @property
    def head(self) -> str:
        """What the template writes before the user's message (system prompt, role header)."""
        return self.format(_SENTINEL).split(_SENTINEL)[0]

    @property
    def positions(self) -> list[int]:
        """The candidate positions, negative indices into each left-padded prompt: -n_eoi .. -1."""
        return list(range(-len(self.eoi_ids), 0))

    @property
    def eoi_tokens(self) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(self.eoi_ids))

    def text_ids(self, text: str) -> list[int]:
        """Token ids of chat text (a prompt, the suffix, a prompt with a reply): `add_special_tokens=False`,
        with SentencePiece's dummy prefix restored where the tokenizer drops it (module docstring)."""
        ids: list[int] = []
        if self.dummy_prefix is not None:
            bos = self.tokenizer.bos_token
            if bos and text.startswith(bos):
                ids, text = [self.tokenizer.bos_token_id], text[len(bos):]
            if text.startswith(" "):
                text = self.dummy_prefix + text
        return ids + self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, instruction: str) -> list[int]:
        """Token ids of one instruction in chat format."""
        return self.text_ids(self.format(instruction))

    def tokenize(self, instructions) -> list[list[int]]:
        """Token ids of each instruction in chat format; the template writes any BOS itself."""
        return [self.prompt_ids(x) for x in instructions]

    def encode(self, instructions) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded token ids and attention mask for a batch of instructions in chat format."""
        return left_pad(self.tokenize(instructions), self.tokenizer.pad_token_id)

    def refusal_token_ids(self, phrases: tuple[str, ...]) -> list[int]:
        """The first token of each phrase as written at the start of the assistant's reply.

        That is the first token where `prompt + phrase` tokenizes differently from `prompt`: after a
        template ending in a space (Llama-2's '[/INST] '), the space and 'I' merge into one token '▁I'.
        """
        prompt = self.format("Hello")
        prompt_ids = self.text_ids(prompt)
        ids: list[int] = []
        for phrase in phrases:
            full = self.text_ids(prompt + phrase)
            k = next((i for i, (a, b) in enumerate(zip(prompt_ids, full, strict=False)) if a != b),
                     min(len(prompt_ids), len(full)))
            if k >= len(full):
                raise TlrefusalError(f"cannot find the first token of refusal phrase {phrase!r} after the "
                                     "chat template; pass --refusal-token-ids")
            if full[k] not in ids:
                ids.append(full[k])
        return ids

    def to_json(self) -> dict:
        """The manifest's "chat" record: the template and the rules applied, and the eoi tokens."""
        return {"template": self.template.to_json(), "trailing_space_added": self.trailing_space,
                "dummy_prefix_restored": self.dummy_prefix is not None, "suffix": self.suffix,
                "eoi_ids": list(self.eoi_ids), "eoi_tokens": self.eoi_tokens, "positions": self.positions}


def _tokenizer_template(tokenizer) -> ChatTemplate:
    text = getattr(tokenizer, "chat_template", None)
    if not text:
        raise TlrefusalError("the tokenizer has no chat template; pass --chat-template with a jinja file or one "
                             f"of the paper's formats ({', '.join(PAPER_FORMATS)})")
    return ChatTemplate(source=TOKENIZER, text=text if isinstance(text, str) else json.dumps(text, sort_keys=True))


def _dummy_prefix(tokenizer) -> str | None:
    """The Metaspace replacement character if the tokenizer's pre-tokenizer writes SentencePiece's dummy
    prefix only where the text does not already start with a space (prepend_scheme "first"); else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre_tokenizer = getattr(backend, "pre_tokenizer", None)
    if pre_tokenizer is None:
        return None
    # The pre-tokenizer's own JSON (its pickle state): small, unlike the whole tokenizer's with its vocabulary.
    pending = [json.loads(pre_tokenizer.__getstate__())]
    while pending:
        node = pending.pop()
        if not isinstance(node, dict):
            continue
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            return node.get("replacement", "▁")
        pending.extend(node.get("pretokenizers") or [])
    return None


def run_template(run_dir: Path) -> ChatTemplate | None:
    """The template a run folder's manifest records; None: the tokenizer's own (also for runs, or direction
    files, that record none)."""
    path = Path(run_dir) / artifacts.MANIFEST
    record = artifacts.read_json(path).get("chat", {}).get("template") if path.is_file() else None
    return None if record is None or record["source"] == TOKENIZER else ChatTemplate.from_json(record)


def _stop_ids(tokenizer, template: ChatTemplate) -> tuple[int, ...]:
    """EOS, plus the first token after an assistant turn in the template if it is a special token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": _SENTINEL}],
                                                 chat_template=_template_arg(template), tokenize=False)
    except Exception:  # a template that rejects assistant turns: EOS alone ends replies
        return tuple(ids)
    if rendered.count(_SENTINEL) == 1:
        after = tokenizer.encode(rendered.split(_SENTINEL)[1], add_special_tokens=False)
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        if after and after[0] in special and after[0] not in ids:
            ids.append(after[0])
    return tuple(ids)


def left_pad(token_lists, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and the matching attention mask: the last tokens of every row line up."""
    width = max(map(len, token_lists))
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = 1
    return ids, mask


def refusal_phrases_for(model_type: str) -> tuple[str, ...]:
    return PAPER_REFUSAL_PHRASES.get(model_type, DEFAULT_REFUSAL_PHRASES)


def _template_arg(template: ChatTemplate) -> str | None:
    """What apply_chat_template takes: None for the tokenizer's own (it may hold several named ones)."""
    return None if template.source == TOKENIZER else template.text


def _render(tokenizer, template: ChatTemplate, instruction: str) -> str:
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True, chat_template=_template_arg(template))
    except Exception as exc:  # jinja raises its own error types for templates that reject the message
        raise TlrefusalError(f"the chat template failed on a single user message: {exc}") from exc
