"""Candidate scoring (`score_groups`): candidates per forward pass, and how its cost grows with its sizes.

- `per_pass`: the same candidates (all positions of `--layers` middle layers of `--model`, real difference-in-
  means directions from `--n-train` prompts a side) scored with 1, 2, 3, 6 and 12 candidates per forward pass
  at the paper's validation sizes: seconds and FLOPs (torch's FlopCounterMode) per candidate, the padded
  share of the rows' tokens, and every score's largest difference from one candidate per pass (the path
  this lever replaced).
- `growth`: seconds and FLOPs per candidate at `--per-pass` against the validation prompts a side (8, 16,
  32) on `--model`, and against model width on three random-weight Llama-shaped models (hidden 256, 512, 1024;
  8 layers; bench_scale's builder and tokenizer), beside the forward-pass FLOPs the paper's algorithm needs
  per candidate (every prompt's tokens through every layer, unembedding at the last position: 3 passes).

Prompts come from the paper's splits (`--paper-data DIR` or $TLREFUSAL_PAPER_DATA). Results: JSON under
benchmarks/results/ with the load average before and after (the two cores may be shared).

    python benchmarks/bench_selection.py --paper-data DIR                      # the demo model, ~15 minutes
    python benchmarks/bench_selection.py --paper-data DIR --model organism --out benchmarks/results/selection_organism.json
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from paper_data import add_paper_data_flag, splits_dir
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PER_PASS = (1, 2, 3, 6, 12)
WIDTHS = (256, 512, 1024)


def scoring(model, chat, directions, val, refusal_ids, keys, per_pass: int, batch_size: int,
            flops: bool) -> dict:
    """One timed `score_groups` over `keys`, then (with `flops`) the same again under FlopCounterMode."""
    from tlrefusal.selection import SelectionConfig, candidate_groups, score_groups

    config = SelectionConfig(batch_size=batch_size, candidates_per_pass=per_pass)
    groups = candidate_groups(keys, per_pass)

    def run():
        return score_groups(model, chat, directions, val["harmful"], val["harmless"], refusal_ids, config, groups)

    started = time.perf_counter()
    scores = run()
    seconds = time.perf_counter() - started
    out = {"candidates_per_pass": per_pass, "seconds": seconds, "seconds_per_candidate": seconds / len(keys),
           "padding": padding_share(chat, val, per_pass, batch_size), "scores": scores}
    if flops:
        with FlopCounterMode(display=False) as counter:
            run()
        out["gflop_per_candidate"] = counter.get_total_flops() / 1e9 / len(keys)
        out["gflop_per_second"] = counter.get_total_flops() / 1e9 / seconds
    return out


def padding_share(chat, val, per_pass: int, batch_size: int) -> float:
    """The share of padding among the suffix tokens the scoring passes run (ablation over harmful + harmless,
    addition over harmless), batched as `variant_last_logits` batches them."""
    from tlrefusal.activations import length_sorted_batches, shared_prefix_length

    real = padded = 0
    for prompts in (val["harmful"] + val["harmless"], val["harmless"]):
        tokens = chat.tokenize(prompts)
        head = shared_prefix_length(tokens)
        rows = [t for _ in range(per_pass) for t in tokens]
        for batch in length_sorted_batches(rows, batch_size):
            lengths = [len(rows[i]) - head for i in batch]
            real += sum(lengths)
            padded += len(batch) * max(lengths)
    return 1 - real / padded


def paper_flops_per_candidate(shape: dict, chat, val) -> float:
    """The paper's algorithm's forward FLOPs per candidate: 2 x (matmul parameters per layer x layers) per token
    of every prompt (whole prompts, no padding), plus attention (4 x hidden x tokens^2 / 2 per layer, causal),
    plus the unembedding at the last position; three passes (ablation over harmful and over harmless val,
    addition over harmless val)."""
    total = 0.0
    for prompts in (val["harmful"], val["harmless"], val["harmless"]):
        for tokens in chat.tokenize(prompts):
            n = len(tokens)
            total += 2 * shape["layer_matmul_params"] * shape["layers"] * n
            total += 2 * shape["hidden"] * n * n * shape["layers"]
            total += 2 * shape["hidden"] * shape["vocab"]
    return total / 1e9


def model_shape(model) -> dict:
    cfg = model.bridge.original_model.config
    hidden, inter, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv = getattr(cfg, "num_key_value_heads", heads) * head_dim
    return {"hidden": hidden, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size,
            "layer_matmul_params": 2 * hidden * heads * head_dim + 2 * hidden * kv + 3 * hidden * inter}


def directions_for(model, chat, train: dict) -> torch.Tensor:
    from tlrefusal.activations import candidate_directions, mean_activations

    return candidate_directions(mean_activations(model, chat, train["harmful"]),
                                mean_activations(model, chat, train["harmless"]))


def keys_at(chat, layers: list[int]) -> list[tuple[int, int]]:
    return [(position, layer) for layer in layers for position in chat.positions]


def max_score_diff(a: list, b: list) -> float:
    return max(abs(getattr(x, k) - getattr(y, k)) for x, y in zip(a, b, strict=True)
               for k in ("bypass_score", "induce_score", "kl_score"))


def strip(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "scores"}


def random_width_model(hidden: int, folder: Path):
    """A random-weight Llama-shaped model (8 layers, MLP 4 x hidden / 1.5 rounded, 8 heads, 4 key-value
    heads) with bench_scale's tokenizer, saved in `folder` and loaded by tlrefusal."""
    from bench_scale import Shape, hf_config, random_model, saved_tokenizer

    from tlrefusal.model import load_model, resolve_source

    tok = saved_tokenizer(folder)
    shape = Shape(f"w{hidden}", hidden, int(hidden * 8 / 3) // 64 * 64, 8, 8, 4, tok.vocab_size, tied=True)
    random_model(hf_config(shape, tok), "cpu", torch.float32).save_pretrained(folder)
    return load_model(resolve_source(str(folder)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help='"smollm2" (default), "organism" or a model folder')
    add_paper_data_flag(parser)
    parser.add_argument("--n-train", type=int, default=32, help="train prompts a side for the directions")
    parser.add_argument("--n-val", type=int, default=32, help="val prompts a side (paper: 32)")
    parser.add_argument("--layers", type=int, default=2, help="middle layers whose candidates are scored")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-pass", type=int, default=None, help="candidates per pass for `growth` "
                                                                   "(default: SelectionConfig's)")
    parser.add_argument("--per-pass-sweep", default=",".join(map(str, PER_PASS)))
    parser.add_argument("--skip-growth", action="store_true")
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "selection_demo.json")
    args = parser.parse_args(argv)
    splits = splits_dir(args.paper_data)

    from tlrefusal import __version__
    from tlrefusal.chat import ChatFormat, refusal_phrases_for
    from tlrefusal.data import load_prompts, sample_splits
    from tlrefusal.model import load_model, resolve_source
    from tlrefusal.selection import SelectionConfig

    per_pass = args.per_pass or SelectionConfig().candidates_per_pass
    load = {"before": os.getloadavg()}
    pools = {name: load_prompts(str(splits / f"{name}.json"))
             for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")}
    sampled = sample_splits(pools["harmful_train"], pools["harmless_train"], args.n_train, args.n_val,
                            harmful_val=pools["harmful_val"], harmless_val=pools["harmless_val"])
    train = {label: [p.instruction for p in getattr(sampled, f"{label}_train")] for label in ("harmful", "harmless")}
    val = {label: [p.instruction for p in getattr(sampled, f"{label}_val")] for label in ("harmful", "harmless")}

    model = load_model(resolve_source(args.model))
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    refusal_ids = chat.refusal_token_ids(refusal_phrases_for(model.model_type))
    directions = directions_for(model, chat, train)
    middle = model.n_layers // 2
    keys = keys_at(chat, list(range(middle, middle + args.layers)))

    sweep = [scoring(model, chat, directions, val, refusal_ids, keys, b, args.batch_size, not args.no_flops)
             for b in map(int, args.per_pass_sweep.split(","))]
    reference = next((e for e in sweep if e["candidates_per_pass"] == 1), None)
    for entry in sweep:
        if reference is not None:
            entry["max_abs_score_diff_from_one_per_pass"] = max_score_diff(entry["scores"], reference["scores"])
            entry["speedup_over_one_per_pass"] = reference["seconds"] / entry["seconds"]
    report = {"benchmark": "selection", "model": args.model, "n_val": args.n_val, "batch_size": args.batch_size,
              "candidates": len(keys), "layers": [middle, middle + args.layers - 1],
              "per_pass": [strip(e) for e in sweep]}

    if not args.skip_growth:
        shape = model_shape(model)
        growth = {"n_val": [], "width": []}
        for n in (8, 16, 32):
            part = {label: prompts[:n] for label, prompts in val.items()}
            entry = strip(scoring(model, chat, directions, part, refusal_ids, keys, per_pass, args.batch_size,
                                  not args.no_flops))
            growth["n_val"].append({"n_val": n, **entry, "paper_gflop_per_candidate":
                                    paper_flops_per_candidate(shape, chat, part)})
        del model
        for hidden in WIDTHS:
            with tempfile.TemporaryDirectory() as tmp:
                wide = random_width_model(hidden, Path(tmp))
                wchat = ChatFormat.from_tokenizer(wide.tokenizer)
                wdirs = torch.randn(len(wchat.positions), wide.n_layers, wide.d_model, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(0))
                wkeys = keys_at(wchat, [wide.n_layers // 2])
                ids = wchat.refusal_token_ids(["I"]) or [0]
                entry = strip(scoring(wide, wchat, wdirs, val, ids, wkeys, per_pass, args.batch_size,
                                      not args.no_flops))
                growth["width"].append({"hidden": hidden, **entry, "paper_gflop_per_candidate":
                                        paper_flops_per_candidate(model_shape(wide), wchat, val)})
        report["growth"] = growth

    import transformers

    load["after"] = os.getloadavg()
    report |= {"load_average": load, "versions": {"tlrefusal": __version__, "torch": torch.__version__,
                                                   "transformers": transformers.__version__,
                                                   "python": platform.python_version()},
               "threads": torch.get_num_threads(), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(f"candidates per pass ({report['candidates']} candidates, {report['n_val']} + {report['n_val']} val):")
    for e in report["per_pass"]:
        print(f"  {e['candidates_per_pass']:>2}: {e['seconds_per_candidate']:.2f} s/candidate, padding "
              f"{e['padding']:.0%}, {e.get('gflop_per_candidate', float('nan')):.0f} GFLOP/candidate, "
              f"x{e.get('speedup_over_one_per_pass', float('nan')):.2f}, "
              f"max diff {e.get('max_abs_score_diff_from_one_per_pass', float('nan')):.1e}")
    for axis, entries in report.get("growth", {}).items():
        for e in entries:
            print(f"  {axis}={e.get(axis, e.get('n_val'))}: {e['seconds_per_candidate']:.2f} s/candidate, "
                  f"{e.get('gflop_per_candidate', float('nan')):.1f} GFLOP (paper's algorithm "
                  f"{e['paper_gflop_per_candidate']:.1f})")


if __name__ == "__main__":
    main()
