"""Time `tlrefusal orthogonalize` and measure the peak memory of its streaming path against the checkpoint.

Each export runs in a fresh Python process (`--child`), so its peak resident memory (ru_maxrss) is its
own (VmHWM). A second fresh process does everything but the weights (imports, config, the meta-device model that
names the tensors) and gives the baseline; the difference is what streaming the weights costs. Two
layouts of the same weights are measured: the source as it is, and re-sharded into small shards.

    python benchmarks/bench_orthogonalize.py                 # SmolLM2 (the demo's base), a random direction
    python benchmarks/bench_orthogonalize.py --model PATH --direction RUN --verify
"""
import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def child(mode: str, model: str, direction: str, out: str, verify: bool) -> None:
    """Run in a fresh process: `plan` (baseline) or `export`; print seconds and peak RSS as JSON."""
    from tlrefusal.export import orthogonalize_direction, read_checkpoint
    from tlrefusal.export.weights import weight_plan

    folder = Path(model)
    started = time.perf_counter()
    if mode == "plan":
        weight_plan(folder, read_checkpoint(folder).keys)
        record = None
    else:
        record = orthogonalize_direction(Path(direction), Path(out), model, verify=verify).record
    check = record and record.verification
    print(json.dumps({"seconds": time.perf_counter() - started,
                      "peak_rss_mb": peak_rss_mb(),
                      "verification": check and check.to_json(),
                      "record_seconds": record and record.seconds.to_json()}))


def peak_rss_mb() -> float:
    """VmHWM: this process image's peak resident memory. (ru_maxrss would also count the parent's memory
    at fork time, which Linux carries across exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tensor_sizes(folder: Path) -> tuple[int, int]:
    """The checkpoint's bytes on disk and its largest tensor's bytes."""
    from tlrefusal.export import ShardReader, read_checkpoint

    checkpoint = read_checkpoint(folder)
    largest = 0
    for shard in checkpoint.shards:
        reader = ShardReader(folder / shard)
        largest = max(largest, *(end - begin for begin, end in (e["data_offsets"] for e in reader.entries.values())))
    return checkpoint.nbytes, largest


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a built-in model ('smollm2') or a local Hugging Face "
                        "folder")
    parser.add_argument("--direction", help="a run folder or direction file (default: a random direction)")
    parser.add_argument("--shard-size", default="100MB", help="shard size of the re-sharded copy")
    parser.add_argument("--verify", action="store_true", help="also time the built-in verification")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "orthogonalize_demo.json")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from tlrefusal import __version__, artifacts
    from tlrefusal.model import resolve_source

    source = resolve_source(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.direction:
            direction = Path(args.direction)
        else:
            d_model = json.loads((source.path / "config.json").read_text())["hidden_size"]
            vector = torch.randn(d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            direction = artifacts.RefusalDirection(vector, 0, -1, str(source.path)).save(tmp / "direction.safetensors")
        resharded = tmp / "resharded"
        AutoModelForCausalLM.from_pretrained(source.path).save_pretrained(resharded, max_shard_size=args.shard_size)
        for path in source.path.iterdir():
            if path.is_file() and not path.name.startswith("model") and path.name != "config.json":
                (resharded / path.name).write_bytes(path.read_bytes())
        for layout, folder in (("as published", source.path), (f"shards of {args.shard_size}", resharded)):
            checkpoint_bytes, largest = tensor_sizes(folder)
            base = run_child("plan", str(folder), str(direction), "", "0")
            run = run_child("export", str(folder), str(direction), str(tmp / f"out{len(rows)}"),
                            "1" if args.verify else "0")
            delta = run["peak_rss_mb"] - base["peak_rss_mb"]
            rows.append({"layout": layout, "checkpoint_mb": checkpoint_bytes / 2**20, "largest_tensor_mb": largest / 2**20,
                         "shards": len(list(folder.glob("*.safetensors"))), "seconds": run["record_seconds"],
                         "peak_rss_mb": run["peak_rss_mb"], "baseline_rss_mb": base["peak_rss_mb"],
                         "streaming_rss_mb": delta, "streaming_over_largest_tensor": delta / (largest / 2**20),
                         "streaming_over_checkpoint": delta / (checkpoint_bytes / 2**20),
                         "verification": run["verification"] and {k: v for k, v in run["verification"].items()
                                                                  if k != "examples"}})
    import transformers

    report = {"benchmark": "orthogonalize", "model": args.model, "rows": rows,
              "versions": {"tlrefusal": __version__, "torch": torch.__version__,
                           "transformers": transformers.__version__, "python": platform.python_version()},
              "threads": torch.get_num_threads(), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6] == "1")
    else:
        main()
