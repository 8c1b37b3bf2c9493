"""CE loss per dataset and intervention (the paper's Table 9): baseline, ablation, activation addition of -r.

Datasets: "pile" and "alpaca" (`ce_data`), and "on-distribution", the evaluated model's own baseline
completions of the harmless prompts: of a reasoning model's completions, the final answer is scored, with its
reasoning in context (`tlrefusal.reasoning`), and a completion whose reasoning never closed is left out. A hub
dataset out of reach is reported unavailable; a local file the user named that cannot be used is an error.
"""
import torch

from tlrefusal.chat import ChatFormat
from tlrefusal.errors import TlrefusalError
from tlrefusal.evaluation.ce_data import alpaca_pairs, pile_texts
from tlrefusal.evaluation.completions import Completion
from tlrefusal.evaluation.config import EvalConfig
from tlrefusal.evaluation.loss import CeLoss, LossSequence, ce_loss, reply_sequence, text_sequence
from tlrefusal.evaluation.per_intervention import PerIntervention
from tlrefusal.interventions import Intervention, InterventionTable, intervention_table
from tlrefusal.model import LoadedModel
from tlrefusal.progress import Progress
from tlrefusal.reasoning import split_reply

# One dataset's CE loss under each intervention, or why it is unavailable.
CeDataset = PerIntervention[CeLoss]


def ce_interventions(table: InterventionTable, vector: torch.Tensor, layer: int, n_layers: int
                     ) -> tuple[Intervention, ...]:
    """The harmless rows of `table`, with activation addition of -r whatever the table's sign (Table 9);
    a model evaluated as loaded has its one row."""
    harmless = table.for_label("harmless")
    if table.by_kind("harmless", "actadd") is None:
        return harmless
    minus_r = intervention_table(vector, layer, n_layers, "paper").by_kind("harmful", "actadd")
    return (*(iv for iv in harmless if iv.kind != "actadd"), minus_r)


def ce_losses(model: LoadedModel, chat: ChatFormat, interventions: tuple[Intervention, ...],
              on_distribution: list[Completion], config: EvalConfig, progress: Progress) -> dict[str, CeDataset]:
    """CE loss of every dataset in `config.ce` under each intervention."""
    out: dict[str, CeDataset] = {}
    for dataset in config.ce:
        try:
            sequences = ce_sequences(dataset, model, chat, on_distribution, config)
        except TlrefusalError as exc:
            if {"pile": config.pile, "alpaca": config.alpaca}.get(dataset) not in (None, "pile", "alpaca"):
                raise  # a local file the user named: a real error; the hub being out of reach is not
            out[dataset] = CeDataset(unavailable=str(exc))
            continue
        runs = {}
        for iv in interventions:
            with progress.task(f"CE loss: {dataset}, {iv.name}", total=len(sequences)) as advance:
                runs[iv.name] = ce_loss(model, sequences, iv.hooks, advance=advance)
        out[dataset] = CeDataset(runs=runs)
    return out


def ce_sequences(dataset: str, model: LoadedModel, chat: ChatFormat, on_distribution: list[Completion],
                 config: EvalConfig) -> list[LossSequence]:
    """The scored sequences of one dataset (sequences with nothing to score are left out)."""
    if dataset == "on-distribution":  # the model's own baseline replies to the harmless prompts: their answers
        parts = [(row, split_reply(row.completion, chat.markers, chat.opens_block)) for row in on_distribution]
        sequences = [reply_sequence(chat, row.prompt, row.completion, part.answer_start) for row, part in parts
                     if part.closed]
    elif dataset == "alpaca":
        pairs = alpaca_pairs(config.alpaca, config.ce_n, config.seed)
        sequences = [reply_sequence(chat, instruction, output) for instruction, output in pairs]
    else:
        sequences = [text_sequence(model.tokenizer, text) for text in pile_texts(config.pile, config.ce_n)]
    return [s for s in sequences if s is not None]
