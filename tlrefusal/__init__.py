"""tlrefusal: find, test and remove the refusal direction of chat models on TransformerLens hooks.

A reimplementation of Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single Direction".
The library is silent: it takes a progress reporter and returns value objects; only `tlrefusal.cli`
talks to the console. The names below are the API a researcher scripts with; they are imported on first
use, so `import tlrefusal` stays light.

    load_model(name)                    a chat model in a TransformerBridge (built-in name, folder, .gguf, hub id)
    extract(config, run_dir)            run or resume an extraction -> ExtractResult (.direction, .selection)
    load_direction(run, layer, pos)     a run's chosen direction (a RefusalDirection), or any scored candidate
    ablation_hooks / addition_hooks     TransformerLens hooks: directional ablation, activation addition
    intervention_table(...)             baseline / ablation / actadd, as the paper evaluates them
    refusal_rate(model, prompts, ...)   greedy replies under an intervention, and the share that refuse
    orthogonalize(run, out)             write the weight-orthogonalized Hugging Face checkpoint (or
                                        an out ending in .gguf: a GGUF rewritten from a GGUF model)
    evaluate(run, config)               refusal, safety, CE loss, coherence, magnitude -> EvalReport
"""
from importlib import import_module

__version__ = "0.1.0"

_API = {
    "load_model": ("tlrefusal.api", "load_model"),
    "extract": ("tlrefusal.pipeline", "run_extract"),
    "ExtractConfig": ("tlrefusal.pipeline", "ExtractConfig"),
    "ExtractResult": ("tlrefusal.pipeline", "ExtractResult"),
    "SelectionConfig": ("tlrefusal.selection", "SelectionConfig"),
    "RefusalDirection": ("tlrefusal.artifacts", "RefusalDirection"),
    "load_direction": ("tlrefusal.artifacts", "load_direction"),
    "ablation_hooks": ("hooks", "ablation_hooks"),
    "addition_hooks": ("hooks", "addition_hooks"),
    "Intervention": ("tlrefusal.interventions", "Intervention"),
    "intervention_table": ("tlrefusal.interventions", "intervention_table"),
    "refusal_rate": ("tlrefusal.api", "refusal_rate"),
    "RefusalRate": ("tlrefusal.refusal", "RefusalRate"),
    "orthogonalize": ("tlrefusal.export", "orthogonalize_direction"),
    "evaluate": ("tlrefusal.evaluation.runner", "run_eval"),
    "EvalConfig": ("tlrefusal.evaluation.config", "EvalConfig"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'tlrefusal' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
