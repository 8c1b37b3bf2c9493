"""Peak memory and time of the GGUF edit (`tlrefusal orthogonalize --out FILE.gguf`, the write alone).

The issue's bound: peak memory of the edit <= 2x the largest tensor's float32 size plus the file's metadata.
Each case runs in a fresh process: it imports everything and parses the source's header, then resets the
kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`), notes the RSS, writes the orthogonalized file
(no verification: that loads models, which is not the edit) and reads the peak (VmHWM). The growth, peak
minus the RSS before, is what the edit itself held. Against a random unit direction (the edit's cost does
not depend on which direction).

    python benchmarks/bench_gguf_memory.py [--gguf FILE ...]   # default: the demo's Q4_1 file
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CHILD = r"""
import json, sys, time, tempfile
from pathlib import Path
import torch
from hooks.ops import unit
from tlrefusal.export import gguf_export as ge
from tlrefusal.export.gguf_file import read_gguf

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

source = read_gguf(Path(sys.argv[1]))
plan = ge.gguf_plan(source)
r = unit(torch.randn(plan.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).float()
largest_f32 = max(4 * t.rows * t.shape[-1] for t in source.tensors.values())
metadata = sum(len(v) for v in source.raw_metadata.values())
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter()
    ge._write(source, plan, r, Path(tmp) / "out.gguf", "edit", ge.NO_PROGRESS)
    seconds = time.perf_counter() - t
peak = status("VmHWM")
print(json.dumps({"file": sys.argv[1], "rss_before": before, "peak": peak, "growth": peak - before,
                  "largest_tensor_f32": largest_f32, "metadata_bytes": metadata,
                  "bound": 2 * largest_f32 + metadata, "seconds": round(seconds, 2),
                  "edited_tensors": len(plan.edits)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, action="append", help="GGUF file(s) to edit (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gguf_memory.json")
    args = parser.parse_args()
    if not args.gguf:
        from tlrefusal.demo import ensure_demo_gguf

        args.gguf = [ensure_demo_gguf()]
    rows = []
    for path in args.gguf:
        done = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent.parent)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["within_bound"] = row["growth"] <= row["bound"]
        rows.append(row)
        mib = 2 ** 20
        print(f"{Path(row['file']).name}: peak growth {row['growth'] / mib:.1f} MiB, bound {row['bound'] / mib:.1f} "
              f"MiB (largest tensor in float32 {row['largest_tensor_f32'] / mib:.1f} MiB x 2 + metadata "
              f"{row['metadata_bytes'] / mib:.1f} MiB), {row['seconds']}s for {row['edited_tensors']} tensors")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "cases": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
