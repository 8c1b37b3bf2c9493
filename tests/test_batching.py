"""`--batch-size auto`: halve on out-of-memory until a whole step runs, and say which size ran."""
import pytest
import torch

from tlrefusal.batching import AUTO, is_out_of_memory, parse_batch_size, run_batched
from tlrefusal.errors import TlrefusalError


def step_that_fits(limit: int, tried: list[int], error=torch.OutOfMemoryError):
    def step(size: int) -> str:
        tried.append(size)
        if size > limit:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return f"ran at {size}"
    return step


def test_auto_halves_from_the_start_until_the_step_fits():
    tried: list[int] = []
    assert run_batched(step_that_fits(40, tried), AUTO, n_items=1000) == ("ran at 32", 32)
    assert tried == [256, 128, 64, 32]


def test_auto_starts_at_the_number_of_items_and_stops_at_one():
    tried: list[int] = []
    assert run_batched(step_that_fits(100, tried), AUTO, n_items=24) == ("ran at 24", 24)
    assert tried == [24]
    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):
        run_batched(step_that_fits(0, tried), AUTO, n_items=5)
    assert tried == [5, 2, 1]


def test_a_fixed_size_is_never_retried_and_other_errors_pass_through():
    tried: list[int] = []
    with pytest.raises(torch.OutOfMemoryError):
        run_batched(step_that_fits(8, tried), 16, n_items=100)
    assert tried == [16]
    tried.clear()
    with pytest.raises(ValueError):
        run_batched(step_that_fits(8, tried, ValueError), AUTO, n_items=100)
    assert tried == [100]


def test_cpu_allocation_failures_count_as_out_of_memory():
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 1099511627776 bytes"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("value, expected", [("auto", AUTO), ("8", 8), (8, 8)])
def test_parse(value, expected):
    assert parse_batch_size(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "big"])
def test_parse_refuses(value):
    with pytest.raises(TlrefusalError, match="batch_size"):
        parse_batch_size(value)


def test_extract_with_auto_batches_records_the_size_that_fit_and_scores_as_that_size(tmp_path, tiny_dirs,
                                                                                     monkeypatch):
    """A model that runs out of memory on batches above 4 prompts: `auto` ends at 4 in every step, records it,
    and scores every candidate exactly as a run given --batch-size 4."""
    from tlrefusal import artifacts
    from tlrefusal import pipeline as pipeline_module
    from tlrefusal.pipeline import ExtractConfig, run_extract
    from tlrefusal.selection import SelectionConfig

    widest = []

    def small_memory(model):
        def refuse_wide(module, args):
            widest.append(args[0].shape[0])
            if args[0].shape[0] > 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        model.bridge.original_model.get_input_embeddings().register_forward_pre_hook(refuse_wide)
        return model

    load = pipeline_module.load_model
    monkeypatch.setattr(pipeline_module, "load_model", lambda *a, **k: small_memory(load(*a, **k)))

    def extract(batch_size, out):
        config = ExtractConfig(model=str(tiny_dirs["llama"]), n_train=8, n_val=4, filter=False, min_kept=1,
                               refusal_token_ids=(5, 7),
                               selection=SelectionConfig(batch_size=batch_size, kl_threshold=1e9,
                                                         induce_threshold=-1e9, candidates_per_pass=8))
        run_extract(config, tmp_path / out)
        return tmp_path / out

    auto = extract("auto", "auto")
    assert artifacts.read_json(auto / artifacts.MANIFEST)["batch_sizes"] == {"filter": 4, "candidates": 4,
                                                                            "selection": 4}
    # auto tried wider batches first: 8 prompts per train split, and the template head of 8 candidates per pass
    # (at 4, more candidates than rows in a batch: their heads run in passes of 4 and are stacked)
    assert max(widest) == 8
    fixed = extract(4, "fixed")
    candidates = [artifacts.read_json(run / artifacts.SELECTION)["candidates"] for run in (auto, fixed)]
    assert candidates[0] == candidates[1]
    assert (auto / artifacts.CANDIDATES).read_bytes() == (fixed / artifacts.CANDIDATES).read_bytes()


def test_auto_retry_mid_selection_keeps_what_was_journaled(tmp_path, tiny_dirs, monkeypatch):
    """Out of memory at the third candidate: the rest of the share is scored at half the size, the two already
    journaled are not scored again, and selection.json holds exactly the journaled scores."""
    import json

    from tlrefusal import artifacts
    from tlrefusal import pipeline as pipeline_module
    from tlrefusal.pipeline import ExtractConfig, run_extract
    from tlrefusal.selection import SelectionConfig, score_groups

    calls = {"candidates": 0}

    def counting_score_groups(*args, **kwargs):
        on_scored = kwargs["on_scored"]

        def counted(group):
            calls["candidates"] += len(group)
            on_scored(group)
            if calls["candidates"] == 2 and args[6].batch_size > 4:
                raise torch.OutOfMemoryError("CUDA out of memory")
        return score_groups(*args, **{**kwargs, "on_scored": counted})

    monkeypatch.setattr(pipeline_module, "score_groups", counting_score_groups)
    config = ExtractConfig(model=str(tiny_dirs["llama"]), n_train=4, n_val=4, filter=False, min_kept=1,
                           refusal_token_ids=(5, 7),
                           selection=SelectionConfig(batch_size="auto", kl_threshold=1e9, induce_threshold=-1e9,
                                                     candidates_per_pass=1))  # one candidate per group
    run = tmp_path / "run"
    run_extract(config, run)
    lines = [json.loads(line) for path in (run / artifacts.SELECTION_JOURNAL).glob("*.jsonl")
             for line in path.read_text().splitlines()]
    keys = [(r["position"], r["layer"]) for r in lines]
    assert len(keys) == len(set(keys))  # nothing journaled twice
    selection = artifacts.read_json(run / artifacts.SELECTION)
    scored = {(c["position"], c["layer"]): c for c in selection["candidates"] if c["bypass_score"] is not None}
    assert set(scored) == set(keys)
    for r in lines:
        assert scored[(r["position"], r["layer"])]["bypass_score"] == r["bypass_score"]
    assert artifacts.read_json(run / artifacts.MANIFEST)["batch_sizes"]["selection"] == 4  # 8 val prompts, halved
