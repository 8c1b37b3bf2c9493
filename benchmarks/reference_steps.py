"""The extract steps written twice more, for the benchmarks: through NNsight 0.8 and through plain PyTorch.

Both run the paper's algorithm as the NNsight replication does (the paper's section 2.3 and
Appendix C): per candidate, one
ablated pass over the harmful validation prompts, one over the harmless ones, and one activation-addition
pass over the harmless ones, each a full forward pass with the full-sequence unembedding; no prompt prefix
is shared. They use tlrefusal's pure tensor math (`hooks.ops`, `tlrefusal.scoring`) and its tokenization
(`ChatFormat.encode`), so the comparison measures the frameworks and the algorithm, not the formulas.
Positions ids are derived from the attention mask, as the TransformerBridge does, so left-padded rows
see the same positions on every side.

- NNsight: `TransformersModel` (text generation) over a Hugging Face model; interventions by assigning a layer's
  `.input`, the attention module's `.output` tuple and the MLP's `.output` inside `model.trace(...)`.
- Plain PyTorch: `register_forward_pre_hook` / `register_forward_hook` on the decoder layers, attention
  and MLP modules (as the original code does), and `output_hidden_states=True` for mean activations.

Both also generate greedily under the same interventions (every step, every position), with Hugging Face
`generate` underneath (NNsight: `model.generate` with the interventions in a loop over `tracer.iter`).
"""
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from hooks.ops import add_scaled, project_out, unit
from tlrefusal.chat import ChatFormat
from tlrefusal.scoring import kl_divergence, refusal_log_odds
from tlrefusal.selection import CandidateScore


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _encode(chat: ChatFormat, prompts: Sequence[str]):
    ids, mask = chat.encode(list(prompts))
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


class Implementation:
    """Mean activations and last-position logits under ablation / addition; subclasses pick the framework."""

    name = "?"

    def __init__(self, hf_model, chat: ChatFormat, batch_size: int = 32) -> None:
        self.hf, self.chat, self.batch_size = hf_model, chat, batch_size
        self.layers = hf_model.model.layers

    @torch.inference_mode()
    def mean_activations(self, prompts: Sequence[str]) -> torch.Tensor:
        """Mean resid_pre at every layer and post-instruction position, [n_pos, n_layer, d_model], float64."""
        positions = torch.tensor(self.chat.positions)
        total, count = None, 0
        for batch in _batches(list(prompts), self.batch_size):
            sums = self._resid_pre_sums(*_encode(self.chat, batch), positions)
            total = sums if total is None else total + sums
            count += len(batch)
        return total / count

    def _resid_pre_sums(self, ids, mask, position_ids, positions) -> torch.Tensor:
        """Sum over the batch of resid_pre at `positions`, every layer: [n_pos, n_layer, d_model], float64."""
        raise NotImplementedError

    def last_logits(self, prompts, ablate: torch.Tensor | None = None, add: torch.Tensor | None = None,
                    layer: int = 0, coeff: float = 1.0) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def generate(self, prompts, n_tokens: int, ablate: torch.Tensor | None = None, add: torch.Tensor | None = None,
                 layer: int = 0, coeff: float = 1.0) -> list[list[int]]:
        """Greedy new tokens per prompt, exactly `n_tokens` each (no early stop, so every side generates the
        same count), under ablation of `ablate` at every layer and / or `coeff * add` at resid_pre(`layer`)."""
        out: list[list[int]] = []
        # No stop token, so generation runs to n_tokens with every token the argmax, EOS included, as the
        # bridge's generate(stop_at_eos=False) does (min_new_tokens would forbid EOS instead, which changes
        # the replies).
        config = self.hf.generation_config
        eos, config.eos_token_id = config.eos_token_id, None
        try:
            for batch in _batches(list(prompts), self.batch_size):
                ids, mask = self.chat.encode(list(batch))
                kwargs = {"attention_mask": mask, "max_new_tokens": n_tokens, "do_sample": False,
                          "pad_token_id": self.chat.tokenizer.pad_token_id}
                out += self._generate(ids, kwargs, ablate, add, layer, coeff)[:, ids.shape[1]:].tolist()
        finally:
            config.eos_token_id = eos
        return out

    def _generate(self, ids, kwargs, ablate, add, layer, coeff) -> torch.Tensor:
        raise NotImplementedError

    def score_candidates(self, directions: torch.Tensor, harmful_val: list[str], harmless_val: list[str],
                         refusal_ids: list[int], first_pruned_layer: int) -> list[CandidateScore]:
        """The paper's algorithm, candidate by candidate (3 passes each); NaN scores for pruned layers."""
        nan = float("nan")
        base = self.last_logits(harmless_val)
        scores = []
        for i, position in enumerate(self.chat.positions):
            for layer in range(directions.shape[1]):
                if layer >= first_pruned_layer:
                    scores.append(CandidateScore(position, layer, nan, nan, nan))
                    continue
                r = directions[i, layer]
                bypass = refusal_log_odds(self.last_logits(harmful_val, ablate=r), refusal_ids).mean().item()
                kl = kl_divergence(base, self.last_logits(harmless_val, ablate=r)).mean().item()
                induce = refusal_log_odds(self.last_logits(harmless_val, add=r, layer=layer), refusal_ids).mean().item()
                scores.append(CandidateScore(position, layer, bypass, induce, kl))
        return scores


class NNsightSteps(Implementation):
    name = "nnsight"

    def __init__(self, hf_model, chat: ChatFormat, batch_size: int = 32) -> None:
        from nnsight import TransformersModel

        super().__init__(hf_model, chat, batch_size)
        self.lm = TransformersModel(hf_model, task="text-generation", tokenizer=chat.tokenizer)

    def _resid_pre_sums(self, ids, mask, position_ids, positions):
        with self.lm.trace(ids, attention_mask=mask, position_ids=position_ids):
            acts = list().save()
            for layer in self.lm.model.layers:
                acts.append(layer.input[:, positions, :])
        return torch.stack([a.double().sum(0) for a in acts], dim=1)

    @torch.inference_mode()
    def last_logits(self, prompts, ablate=None, add=None, layer=0, coeff=1.0):
        out = []
        u = unit(ablate.double()).float() if ablate is not None else None
        for batch in _batches(list(prompts), self.batch_size):
            ids, mask, position_ids = _encode(self.chat, batch)
            with self.lm.trace(ids, attention_mask=mask, position_ids=position_ids):
                self._intervene(u, add, layer, coeff)
                logits = self.lm.lm_head.output[:, -1, :].save()
            out.append(logits.float())
        return torch.cat(out)

    def _intervene(self, u, add, layer, coeff) -> None:
        """Inside a trace: project `u` out of every residual write, and / or add `coeff * add` at `layer`."""
        if u is not None:
            for block in self.lm.model.layers:
                block.input = project_out(block.input, u)
                attn = block.self_attn.output
                block.self_attn.output = (project_out(attn[0], u), *attn[1:])
                block.mlp.output = project_out(block.mlp.output, u)
        if add is not None:
            block = self.lm.model.layers[layer]
            block.input = add_scaled(block.input, add.float(), coeff)

    def _generate(self, ids, kwargs, ablate, add, layer, coeff):
        u = unit(ablate.double()).float() if ablate is not None else None
        with self.lm.generate(ids, **kwargs) as tracer:
            if u is not None or add is not None:
                # One forward pass per new token (no stop token). A bounded loop, not tracer.all():
                # statements after an open loop never run.
                for _ in tracer.iter[:kwargs["max_new_tokens"]]:
                    self._intervene(u, add, layer, coeff)
            tokens = tracer.result.save()
        return tokens


class PlainSteps(Implementation):
    name = "plain torch"

    def _resid_pre_sums(self, ids, mask, position_ids, positions):
        hidden = self.hf(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True,
                         logits_to_keep=1).hidden_states  # hidden[l] = resid_pre(l)
        return torch.stack([hidden[layer][:, positions, :].double().sum(0) for layer in range(len(self.layers))],
                           dim=1)

    @contextmanager
    def hooked(self, ablate=None, add=None, layer=0, coeff=1.0):
        """PyTorch hooks on the HF modules: ablation at every layer and / or addition at resid_pre(layer)."""
        handles = []
        if ablate is not None:
            u = unit(ablate.double()).float()
            for block in self.layers:
                handles.append(block.register_forward_pre_hook(
                    lambda m, args, kwargs: ((project_out(args[0], u), *args[1:]), kwargs) if args else
                    (args, {**kwargs, "hidden_states": project_out(kwargs["hidden_states"], u)}), with_kwargs=True))
                handles.append(block.self_attn.register_forward_hook(
                    lambda m, a, out: (project_out(out[0], u), *out[1:])))
                handles.append(block.mlp.register_forward_hook(lambda m, a, out: project_out(out, u)))
        if add is not None:
            vector = add.float()
            handles.append(self.layers[layer].register_forward_pre_hook(
                lambda m, args, kwargs: ((add_scaled(args[0], vector, coeff), *args[1:]), kwargs) if args else
                (args, {**kwargs, "hidden_states": add_scaled(kwargs["hidden_states"], vector, coeff)}),
                with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.inference_mode()
    def last_logits(self, prompts, ablate=None, add=None, layer=0, coeff=1.0):
        out = []
        with self.hooked(ablate, add, layer, coeff):
            for batch in _batches(list(prompts), self.batch_size):
                ids, mask, position_ids = _encode(self.chat, batch)
                logits = self.hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
                out.append(logits[:, -1, :].float())
        return torch.cat(out)

    def _generate(self, ids, kwargs, ablate, add, layer, coeff):
        with self.hooked(ablate, add, layer, coeff):
            return self.hf.generate(input_ids=ids, **kwargs)

    @torch.inference_mode()
    def top2_gap(self, prompt: str, tokens: list[int], ablate=None, add=None, layer=0, coeff=1.0) -> float:
        """Logit gap between the two most likely next tokens after `prompt` + `tokens`, under the
        intervention: how close to a tie the greedy choice there is."""
        ids, mask = self.chat.encode([prompt])
        ids = torch.cat([ids, torch.tensor([tokens], dtype=ids.dtype)], dim=1)
        with self.hooked(ablate, add, layer, coeff):
            logits = self.hf(input_ids=ids).logits[0, -1].double()
        top = logits.topk(2).values
        return (top[0] - top[1]).item()
