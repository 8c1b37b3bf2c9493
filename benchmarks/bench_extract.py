"""Time `tlrefusal extract` step by step on one model and write the numbers as JSON.

Default: the demo base model (`smollm2`, SmolLM2-135M-Instruct) with the paper's sizes (128 + 128 train,
32 + 32 val) sampled from the paper's splits (`--paper-data DIR` or $TLREFUSAL_PAPER_DATA: the folder
holding datasets/splits/, read where it is, never copied), without the refusal filter (SmolLM2 barely
refuses, so filtering would stop the run). Counts prompt forward passes per step so the time per pass
can be compared across machines.

    python benchmarks/bench_extract.py --paper-data DIR      # smollm2, paper sizes
    python benchmarks/bench_extract.py --paper-data DIR --n-train 16 --n-val 8 --out benchmarks/results/extract_small.json
"""
import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from paper_data import add_paper_data_flag, splits_dir

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help='a built-in model ("smollm2", "organism") or a model '
                                                           "folder")
    add_paper_data_flag(parser)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--filter", action="store_true", help="apply the paper's refusal filter")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "extract_demo.json")
    args = parser.parse_args(argv)
    splits = splits_dir(args.paper_data)

    from tlrefusal.pipeline import ExtractConfig, run_extract
    from tlrefusal.selection import SelectionConfig

    config = ExtractConfig(
        model=args.model, harmful=str(splits / "harmful_train.json"),
        harmless=str(splits / "harmless_train.json"), harmful_val=str(splits / "harmful_val.json"),
        harmless_val=str(splits / "harmless_val.json"), n_train=args.n_train, n_val=args.n_val,
        filter=args.filter, selection=SelectionConfig(),
    )
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = run_extract(config, Path(tmp) / "run")
        wall = time.perf_counter() - started

    n_layers = len({c.layer for c in result.selection.candidates})
    scored = sum(1 for c in result.selection.candidates if c.filtered is None or not c.filtered.startswith("layer"))
    kept = {name: k for name, (k, _) in result.kept.items()}
    passes = {
        "filter": sum(sampled for _, sampled in result.kept.values()),
        "candidates": kept["harmful_train"] + kept["harmless_train"],
        # One baseline pass over harmless val, then per scored candidate: ablation over harmful + harmless
        # val, and activation addition over harmless val.
        "selection": kept["harmless_val"] + scored * (kept["harmful_val"] + 2 * kept["harmless_val"]),
    }
    report = {
        "benchmark": "extract",
        "model": args.model, "n_layers": n_layers, "n_positions": len(result.eoi_tokens),
        "n_train": args.n_train, "n_val": args.n_val, "filter": args.filter,
        "candidates_total": len(result.selection.candidates), "candidates_scored": scored,
        "seconds": {k: round(v, 2) for k, v in result.seconds.items()}, "wall_seconds": round(wall, 2),
        "prompt_forward_passes": passes,
        "ms_per_prompt_pass": {k: round(1000 * result.seconds[k] / v, 2) for k, v in passes.items() if v},
        "chosen": None if result.selection.chosen is None else result.selection.chosen.to_json(),
        "filter_counts": result.selection.filter_counts(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
