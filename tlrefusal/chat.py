"""Chat formatting, post-instruction positions and refusal tokens, read from the model's own template.

- Prompts go through `apply_chat_template` with one user message and no system message of ours
  (templates that insert a default system prompt, like SmolLM2's or Qwen2's, keep it, as in the NNsight replication),
  then are tokenized with `add_special_tokens=False`: the template already wrote any BOS.
- The post-instruction ("end-of-instruction", eoi) tokens are the template text after the instruction,
  tokenized alone, as the original code does; the candidate positions are range(-n_eoi, 0).
- Refusal tokens: the first token of each refusal phrase as the model would write it right
  after the template. The phrases are the paper's per family, keyed by the config's model_type.
"""
from dataclasses import dataclass

import torch

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
    suffix: str
    eoi_ids: tuple[int, ...]
    # Tokens that end a reply: EOS, and the special token the template writes after an assistant turn
    # (Gemma's <end_of_turn> and Llama-3's <|eot_id|> are not the tokenizer's EOS).
    stop_ids: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatFormat":
        if not getattr(tokenizer, "chat_template", None):
            raise TlrefusalError("the tokenizer has no chat template")
        rendered = _render(tokenizer, _SENTINEL)
        if rendered.count(_SENTINEL) != 1:
            raise TlrefusalError("the chat template does not place the user message exactly once")
        suffix = rendered.split(_SENTINEL)[-1]
        eoi = tuple(tokenizer.encode(suffix, add_special_tokens=False))
        if not eoi:
            raise TlrefusalError("the chat template puts nothing after the instruction, so there are no "
                                 "post-instruction positions")
        return cls(tokenizer=tokenizer, suffix=suffix, eoi_ids=eoi, stop_ids=_stop_ids(tokenizer))

    def format(self, instruction: str) -> str:
        return _render(self.tokenizer, instruction)

    @property
    def head(self) -> str:
        """What the template writes before the user's message (system prompt, role header)."""
        return _render(self.tokenizer, _SENTINEL).split(_SENTINEL)[0]

    @property
    def positions(self) -> list[int]:
        """The candidate positions, negative indices into each left-padded prompt: -n_eoi .. -1."""
        return list(range(-len(self.eoi_ids), 0))

    @property
    def eoi_tokens(self) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(self.eoi_ids))

    def tokenize(self, instructions) -> list[list[int]]:
        """Token ids of each instruction in chat format; the template writes any BOS itself."""
        return [self.tokenizer.encode(self.format(x), add_special_tokens=False) for x in instructions]

    def encode(self, instructions) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded token ids and attention mask for a batch of instructions in chat format."""
        return left_pad(self.tokenize(instructions), self.tokenizer.pad_token_id)

    def refusal_token_ids(self, phrases: tuple[str, ...]) -> list[int]:
        """The first token of each phrase as written at the start of the assistant's reply.

        That is the first token where `prompt + phrase` tokenizes differently from `prompt`: after a
        template ending in a space (Llama-2's '[/INST] '), the space and 'I' merge into one token '▁I'.
        """
        prompt_ids = self.tokenizer.encode(self.format("Hello"), add_special_tokens=False)
        ids: list[int] = []
        for phrase in phrases:
            full = self.tokenizer.encode(self.format("Hello") + phrase, add_special_tokens=False)
            k = next((i for i, (a, b) in enumerate(zip(prompt_ids, full, strict=False)) if a != b),
                     min(len(prompt_ids), len(full)))
            if k >= len(full):
                raise TlrefusalError(f"cannot find the first token of refusal phrase {phrase!r} after the "
                                     "chat template; pass --refusal-token-ids")
            if full[k] not in ids:
                ids.append(full[k])
        return ids


def _stop_ids(tokenizer) -> tuple[int, ...]:
    """EOS, plus the first token after an assistant turn in the template if it is a special token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": _SENTINEL}], tokenize=False)
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


def _render(tokenizer, instruction: str) -> str:
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # jinja raises its own error types for templates that reject the message
        raise TlrefusalError(f"the chat template failed on a single user message: {exc}") from exc
