"""What generates `tlrefusal eval`'s completions: the TransformerBridge (default) or vLLM (`--backend vllm`).

bridge: `tlrefusal.generation.greedy_completions`, batched greedy decoding under each intervention's hooks.

vllm: a vLLM engine over a checkpoint evaluated as it is (`--model`, e.g. from `tlrefusal orthogonalize`), for
large batches and tensor parallelism (`--tensor-parallel N`). vLLM cannot project a direction out of the
residual stream (it runs no TransformerLens hooks; TransformerLens' vLLM bridge offers only elementwise
scale/add/set and no resid_pre hook), so the hooked interventions stay on the bridge and asking vLLM for one is
an error. What vLLM is given and what comes back are the bridge path's:
- the prompts are the bridge's own token ids (`ChatFormat.tokenize`, sent as `TokensPrompt`s: vLLM tokenizes
  nothing);
- decoding is greedy (temperature 0) and stops exactly at `generation.stop_tokens`: `ignore_eos` keeps vLLM
  from adding the model's EOS or generation_config.json's ids to that set (`--stop eos` must run on past
  Llama-3's <|eot_id|>, which its generation config lists);
- the text is decoded from the returned token ids by `generation.decode_reply`, the bridge's own decoding,
  not taken from vLLM's incremental detokenizer.
So equal token ids make byte-equal completions files (tests/test_eval_backends.py, with a fake engine). On a GPU,
vLLM's kernels and batching can flip a near-tie argmax: the completions record names the backend, so
completions are never reused across backends. vLLM's greedy output depends on the batch's shape unless
VLLM_BATCH_INVARIANT=1 is set (vllm #27433).

vLLM is an optional extra, CUDA only, and pins torch exactly: install it in its own environment
(`pip install 'tlrefusal[vllm]'`).
"""
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tlrefusal.chat import ChatFormat
from tlrefusal.errors import TlrefusalError
from tlrefusal.generation import decode_reply, greedy_completions, stop_tokens
from tlrefusal.interventions import Intervention
from tlrefusal.model import LoadedModel, release_memory
from tlrefusal.progress import Advance

VLLM_MISSING = "--backend vllm needs vLLM (a CUDA machine): pip install 'tlrefusal[vllm]'"


class Generator(Protocol):
    """Greedy replies to instructions under one intervention (`completions.completions` calls it)."""

    def replies(self, instructions: Sequence[str], intervention: Intervention, advance: Advance) -> list[str]: ...


@dataclass(frozen=True)
class BridgeGenerator:
    """The TransformerBridge, under the intervention's hooks."""

    model: LoadedModel
    chat: ChatFormat
    max_new_tokens: int
    batch_size: int
    stop: str

    def replies(self, instructions: Sequence[str], intervention: Intervention, advance: Advance) -> list[str]:
        return greedy_completions(self.model, self.chat, instructions, self.max_new_tokens, intervention.hooks,
                                  batch_size=self.batch_size, advance=advance, stop=self.stop)


def import_vllm():
    """The vllm module, or the one-line error that says how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise TlrefusalError(VLLM_MISSING) from exc
    return vllm


class VllmGenerator:
    """A vLLM engine over a checkpoint folder, no hooks; it starts on first use and `close` lets it go."""

    def __init__(self, path: Path, dtype: str, tensor_parallel: int, seed: int, trust_remote_code: bool,
                 chat: ChatFormat, max_new_tokens: int, stop: str) -> None:
        self.engine_args = {"model": str(path), "tensor_parallel_size": tensor_parallel, "dtype": dtype,
                            "seed": seed, "trust_remote_code": trust_remote_code}
        self.chat, self.max_new_tokens, self.stop = chat, max_new_tokens, stop
        self._llm = None

    def replies(self, instructions: Sequence[str], intervention: Intervention, advance: Advance) -> list[str]:
        if intervention.hooks:  # the config refuses hooked runs first; this guards other callers
            raise TlrefusalError(f"vLLM cannot run {intervention.name!r}: it runs no hooks")
        vllm = import_vllm()
        if self._llm is None:
            self._llm = vllm.LLM(**self.engine_args)
        stops = stop_tokens(self.chat, self.chat.tokenizer, self.stop)
        params = vllm.SamplingParams(temperature=0.0, max_tokens=self.max_new_tokens, stop_token_ids=stops,
                                     ignore_eos=True)
        prompts = [vllm.TokensPrompt(prompt_token_ids=ids) for ids in self.chat.tokenize(instructions)]
        outputs = self._llm.generate(prompts, params, use_tqdm=False)  # one RequestOutput per prompt, in order
        replies = [decode_reply(self.chat.tokenizer, list(out.outputs[0].token_ids), stops) for out in outputs]
        advance(len(replies))
        return replies

    def close(self) -> None:
        self._llm = None
        try:  # vLLM keeps its workers and their GPU memory until its distributed state is torn down
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        except ImportError:
            pass
        else:
            cleanup_dist_env_and_memory()
        release_memory()


