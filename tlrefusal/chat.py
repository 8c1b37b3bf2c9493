"""Chat formatting, post-instruction positions and refusal tokens, read from the run's chat template.

- The template is the tokenizer's own, or one given with `--chat-template` (a paper format by name or a
  jinja file; `tlrefusal.chat_templates`). Prompts are one user message, tokenized with
  `add_special_tokens=False`: the template writes any BOS itself. By default no system message is passed
  (templates that insert a default system prompt, like SmolLM2's or Qwen1.5's, keep it, as in the NNsight
  replication; Llama-3.1's writes its date lines); `ChatOptions` can pass one (`--system-prompt`), or an empty one
  (`none`), and variables for the template (`--chat-template-kwargs`, e.g. Qwen3's enable_thinking=false). The run's
  options are recorded in the manifest and re-created with its template by `ChatFormat.for_run`.
- Reasoning models (`tlrefusal.reasoning`): where the generation prompt opens a reasoning block, or the template
  has a thinking switch left on, the first reply token is the block's opener, so extraction refuses to score refusal
  there and says which option to pass (`check_refusal_position`); with thinking off, the closed empty block the
  template writes is part of the post-instruction tokens.
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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tlrefusal import artifacts, reasoning
from tlrefusal.chat_templates import PAPER_FORMATS, TOKENIZER, ChatTemplate
from tlrefusal.errors import TlrefusalError, first_line
from tlrefusal.reasoning import Markers

_SENTINEL = "TLREFUSALINSTRUCTIONSENTINEL"

# The paper's refusal phrases by config model_type: Llama-2, Llama-3 and Yi (all "llama") and
# Gemma use 'I'; Qwen uses 'I' and 'As'. Other families get DEFAULT_REFUSAL_PHRASES.
PAPER_REFUSAL_PHRASES = {"llama": ("I",), "gemma": ("I",), "qwen": ("I", "As")}
DEFAULT_REFUSAL_PHRASES = ("I", "As")

# `--system-prompt`'s two keywords; any other value is the system prompt's text.
SYSTEM_DEFAULT, SYSTEM_NONE = "default", "none"
# apply_chat_template's own parameters: not template variables.
_RESERVED_KWARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                              "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                              "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

TemplateKwargs = tuple[tuple[str, object], ...]  # (name, value) pairs, sorted by name


def system_prompt_from_spec(spec: str | None) -> str | None:
    """`--system-prompt TEXT|none|default`: None (default) passes no system message, so the template does what it
    does without one; "none" passes an empty one (which drops a default system prompt a template inserts; a
    template may still write an empty system turn); any other text is the system message."""
    if spec is None or spec == SYSTEM_DEFAULT:
        return None
    return "" if spec == SYSTEM_NONE else spec


def parse_template_kwargs(value) -> TemplateKwargs:
    """`--chat-template-kwargs KEY=VALUE,...` (also a mapping or (key, value) pairs, as config files hold them) as
    sorted pairs; "none" or "": no variables. A value is true/false (any case), null, a number or a JSON string,
    else the text itself, so enable_thinking=false is the boolean the template tests. A comma followed by `KEY=`
    starts the next pair. A name given twice, or one of apply_chat_template's own parameters, is an error."""
    if value is None:
        return ()
    if isinstance(value, str):
        if value.strip().lower() in ("", SYSTEM_NONE):
            return ()
        if value.strip().endswith(","):  # else 'x=false,' would give the text 'false,', which templates read as true
            raise TlrefusalError(f"--chat-template-kwargs: nothing after the last comma in {value.strip()!r}")
        pairs = []
        for item in re.split(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)", value):
            key, sep, text = item.partition("=")
            if not sep:
                raise TlrefusalError(f"--chat-template-kwargs: expected KEY=VALUE, got {item.strip()!r}")
            pairs.append((key.strip(), _template_value(text.strip())))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        try:
            pairs = [(k, v) for k, v in value]
        except (TypeError, ValueError):
            raise TlrefusalError(f"--chat-template-kwargs: expected KEY=VALUE pairs, got {value!r}") from None
    out: dict[str, object] = {}
    for key, val in pairs:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise TlrefusalError(f"--chat-template-kwargs: {key!r} is not a template variable name")
        if key in _RESERVED_KWARGS:
            raise TlrefusalError(f"--chat-template-kwargs: {key!r} is apply_chat_template's own parameter, not a "
                                 "template variable")
        if not isinstance(val, (str, bool, int, float)) and val is not None:
            raise TlrefusalError(f"--chat-template-kwargs: {key}'s value must be text, a number, true/false or null")
        if key in out:
            raise TlrefusalError(f"--chat-template-kwargs: {key} is given twice")
        out[key] = val
    return tuple(sorted(out.items()))


def _template_value(text: str) -> object:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (str, bool, int, float)) or value is None else text


def format_template_kwargs(pairs: TemplateKwargs) -> str:
    """The `--chat-template-kwargs` spelling of `pairs` (what the CLI parses back to them)."""
    def spell(v: object) -> str:
        return v if isinstance(v, str) and _template_value(v) == v and "," not in v else json.dumps(v)

    return ",".join(f"{k}={spell(v)}" for k, v in pairs)


@dataclass(frozen=True)
class ChatOptions:
    """What the template renders besides the instruction: a system message and template variables."""

    system_prompt: str | None = None  # None: no system message (the template's default); "": an empty one
    template_kwargs: TemplateKwargs = ()

    def messages(self, instruction: str) -> list[dict]:
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        return [*system, {"role": "user", "content": instruction}]

    def override(self, system_prompt: str | None = None, template_kwargs=None) -> "ChatOptions":
        """These options with `system_prompt` (a `--system-prompt` spec) and `template_kwargs` replacing the
        current ones where given (None: kept)."""
        options = self
        if system_prompt is not None:
            options = replace(options, system_prompt=system_prompt_from_spec(system_prompt))
        if template_kwargs is not None:
            options = replace(options, template_kwargs=parse_template_kwargs(template_kwargs))
        return options

    def with_kwargs(self, **kwargs) -> "ChatOptions":
        return replace(self, template_kwargs=parse_template_kwargs({**dict(self.template_kwargs), **kwargs}))

    def to_json(self) -> dict:
        return {"system_prompt": self.system_prompt, "template_kwargs": dict(self.template_kwargs)}

    @classmethod
    def from_json(cls, record: dict) -> "ChatOptions":
        """From a manifest's "chat" record (runs made before these options record none: the defaults)."""
        return cls(system_prompt=record.get("system_prompt"),
                   template_kwargs=parse_template_kwargs(record.get("template_kwargs")))


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
    options: ChatOptions = field(default_factory=ChatOptions)  # system message and template variables
    markers: Markers | None = None  # the model's reasoning-block markers (`reasoning.find_markers`), if any

    @classmethod
    def from_tokenizer(cls, tokenizer, template: ChatTemplate | None = None,
                       options: ChatOptions | None = None) -> "ChatFormat":
        """The format of `template` (default: the tokenizer's own chat template) with this tokenizer, rendered
        with `options` (default: no system message, no template variables)."""
        if template is None:
            template = _tokenizer_template(tokenizer)
        options = options or ChatOptions()
        rendered = _render(tokenizer, template, _SENTINEL, options)
        if rendered.count(_SENTINEL) != 1:
            raise TlrefusalError("the chat template does not place the user message exactly once")
        if rendered.endswith(_SENTINEL):  # checked before the trailing-space rule, which would add ' '
            raise TlrefusalError("the chat template puts nothing after the instruction, so there are no "
                                 "post-instruction positions")
        trailing_space = not rendered.endswith(("\n", " "))
        rules = cls(tokenizer=tokenizer, template=template, suffix="", eoi_ids=(), trailing_space=trailing_space,
                    dummy_prefix=_dummy_prefix(tokenizer), options=options,
                    markers=reasoning.find_markers(tokenizer, template.text))
        suffix = rules.format(_SENTINEL).split(_SENTINEL)[-1]
        return replace(rules, suffix=suffix, eoi_ids=tuple(rules.text_ids(suffix)),
                       stop_ids=_stop_ids(tokenizer, template, options))

    @classmethod
    def for_run(cls, run_dir: Path, tokenizer, system_prompt: str | None = None,
                template_kwargs: TemplateKwargs | None = None) -> "ChatFormat":
        """The format a run was extracted with: its manifest's template (runs whose manifest names none, written
        before templates were recorded, use the tokenizer's), system prompt and template variables.
        `system_prompt` (a `--system-prompt` spec) and `template_kwargs` replace the run's where given."""
        options = run_options(run_dir).override(system_prompt, template_kwargs)
        return cls.from_tokenizer(tokenizer, run_template(run_dir), options)

    def with_options(self, options: ChatOptions) -> "ChatFormat":
        """The same template and tokenizer rendered with other options."""
        return ChatFormat.from_tokenizer(self.tokenizer, self.template, options)

    def format(self, instruction: str) -> str:
        return (_render(self.tokenizer, self.template, instruction, self.options)
                + (" " if self.trailing_space else ""))

    @property
    def prompt_reasoning(self) -> str:
        """What the generation prompt does with a reasoning block (`reasoning.prompt_state`)."""
        return reasoning.prompt_state(self.suffix, self.markers)

    @property
    def opens_block(self) -> bool:
        """The generation prompt leaves a reasoning block open: replies start inside it (the R1 distills)."""
        return self.prompt_reasoning == reasoning.OPEN_BLOCK

    def check_refusal_position(self) -> None:
        """Raise a one-line error, naming the option that fixes it, where the first reply token is not the start
        of an answer but reasoning (refusal log-odds there would measure nothing): the generation prompt opens a
        reasoning block, or the template has a thinking switch that is on. Quiet where the prompt closes an empty
        block (thinking off), and where the markers come with no switch and the prompt opens nothing (a model
        that answers without reasoning, such as Qwen3's Instruct-2507: the template cannot tell them apart)."""
        state = self.prompt_reasoning
        if self.markers is None or state == reasoning.CLOSED_BLOCK:
            return
        switch = self._thinking_switch()
        opener = self.markers.open
        if state == reasoning.OPEN_BLOCK:
            why = (f"the chat template's generation prompt opens a reasoning block ({opener!r}), so the first reply "
                   "token is reasoning, not a refusal")
        elif switch is None:
            return
        else:
            why = (f"this chat template has thinking on: the model opens a reasoning block ({opener!r}) before "
                   "answering, so the first reply token is not a refusal")
        if switch is not None:
            raise TlrefusalError(f"{why}; pass --chat-template-kwargs {switch} (the template then writes a closed "
                                 "empty block, whose tokens become post-instruction positions)")
        tried = ", ".join(f"{k}=false" for k, _ in reasoning.THINKING_OFF)
        closed = f"{opener}\n\n{self.markers.close}\n\n"
        raise TlrefusalError(f"{why}, and no template option closes it (tried {tried}); pass --chat-template FILE, "
                             f"a copy of the template whose generation prompt ends in a closed empty block "
                             f"({closed!r}) where it opens one")

    def _thinking_switch(self) -> str | None:
        """The template variables, spelled as --chat-template-kwargs takes them, that add the first switch of
        `reasoning.THINKING_OFF` under which the generation prompt closes its block; None if none does."""
        for key, value in reasoning.THINKING_OFF:
            options = self.options.with_kwargs(**{key: value})
            try:
                closes = self.with_options(options).prompt_reasoning == reasoning.CLOSED_BLOCK
            except TlrefusalError:  # a template that rejects the variable
                continue
            if closes:
                return format_template_kwargs(options.template_kwargs)
        return None

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
        data = {"template": self.template.to_json(), **self.options.to_json(),
                "trailing_space_added": self.trailing_space,
                "dummy_prefix_restored": self.dummy_prefix is not None, "suffix": self.suffix,
                "eoi_ids": list(self.eoi_ids), "eoi_tokens": self.eoi_tokens, "positions": self.positions}
        if self.markers is not None:
            data["reasoning"] = {**self.markers.to_json(), "prompt": self.prompt_reasoning}
        return data


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
    record = _manifest_chat(run_dir).get("template")
    return None if record is None or record["source"] == TOKENIZER else ChatTemplate.from_json(record)


def run_options(run_dir: Path) -> ChatOptions:
    """The system prompt and template variables a run folder's manifest records (none: the defaults)."""
    return ChatOptions.from_json(_manifest_chat(run_dir))


def run_reasoning(run_dir: Path) -> tuple[Markers | None, bool]:
    """The reasoning markers a run folder's manifest records, and whether its generation prompt opens a block
    (`ChatFormat.opens_block`); (None, False) where it records none, as runs of models without markers do."""
    record = _manifest_chat(run_dir).get("reasoning")
    if not record:
        return None, False
    return Markers(record["open"], record["close"]), record["prompt"] == reasoning.OPEN_BLOCK


def _manifest_chat(run_dir: Path) -> dict:
    path = Path(run_dir) / artifacts.MANIFEST
    return artifacts.read_json(path).get("chat", {}) if path.is_file() else {}


def _stop_ids(tokenizer, template: ChatTemplate, options: ChatOptions) -> tuple[int, ...]:
    """EOS, plus the first token after an assistant turn in the template if it is a special token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        rendered = tokenizer.apply_chat_template([*options.messages("Hi"), {"role": "assistant", "content": _SENTINEL}],
                                                 chat_template=_template_arg(template), tokenize=False,
                                                 **dict(options.template_kwargs))
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


def _render(tokenizer, template: ChatTemplate, instruction: str, options: ChatOptions) -> str:
    try:
        return tokenizer.apply_chat_template(options.messages(instruction), tokenize=False, add_generation_prompt=True,
                                             chat_template=_template_arg(template), **dict(options.template_kwargs))
    except Exception as exc:  # jinja raises its own error types for templates that reject the message
        what = "a single user message" if options.system_prompt is None else "a system message and a user message"
        raise TlrefusalError(f"the chat template failed on {what}: {first_line(exc)}") from exc
