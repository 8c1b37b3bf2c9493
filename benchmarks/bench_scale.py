"""Memory and time of `tlrefusal extract`, `orthogonalize` and its verification on a ~1B-parameter model.

A random-weight model with Llama-3.2-1B's shapes (hidden 2048, MLP 8192, 16 layers, 32 query / 8 key-value
heads, vocabulary 128,256, tied embeddings; 1.24B parameters) is built from a config in bfloat16 and saved
with `save_pretrained`, with tests/tiny.py's byte-level BPE tokenizer and Llama-3-style chat template, in a
cache folder (built once). Every measured step is the `tlrefusal` command line in its own process, started
by a small wrapper process that reports its child's peak resident memory (`ru_maxrss` of RUSAGE_CHILDREN: the
wrapper imports nothing heavy and runs one command, so the number is that command's):

- extract (`--dtype bfloat16 --no-filter --refusal-token-ids ...`, small n_train/n_val, the layer filter
  leaving a few layers' candidates to score), one process at one thread: peak RSS against the weights'
  bytes; scoring seconds;
- the same extract under `torchrun --standalone --nproc_per_node=2`, one thread per rank: scoring and total
  wall time against the one-process run of this same benchmark run, and the selection compared with it;
- `tlrefusal orthogonalize RUN --layer 0 --position -1` without verification: the streaming export's peak
  RSS minus a baseline process that does everything but the weights (bench_orthogonalize's `plan` child),
  against the largest tensor in float32;
- the same with verification: peak RSS against one model's weights.

Also measured (`attention`): one forward through plain transformers with attn_implementation "eager"
against "sdpa", and the same hooked forward through a TransformerBridge wrapping each (TransformerLens
computes attention itself on the hooked path, so the bridge's two should cost the same).

Every step that the installed tlrefusal cannot run (torchrun scoring, `--verify MODE`) is written as
"not run: <why>", never as a number. The load average is recorded before and after each step: the machine's
two cores may be shared.

    python benchmarks/bench_scale.py                           # ~1B, about 15 minutes on 2 cores
    python benchmarks/bench_scale.py --shape tiny --out /tmp/scale_tiny.json   # seconds: the code paths only

This module also holds the random-weight shapes, tokenizer and prompts that `gpu_check.py` uses.
"""
import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.tiny (the tokenizer) and tlrefusal from a checkout
    sys.path.insert(0, str(ROOT))

# Issue 16's targets for this benchmark.
TARGETS = {"extract_peak_over_weights_max": 1.3, "export_streaming_over_largest_fp32_tensor_max": 2.0,
           "verification_peak_over_one_model_max": 1.3, "two_process_over_one_process_max": 0.6}


@dataclass(frozen=True)
class Shape:
    """A decoder's shapes (Llama layout: RMSNorm, rotary, grouped-query attention, gated MLP)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * self.head_dim
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def params(self, layers: int | None = None) -> int:
        layers = self.layers if layers is None else layers
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + layers * self.layer_params() + self.hidden


SHAPES = {
    "llama-3.2-1b": Shape("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, tied=True),
    "llama-3-8b": Shape("llama-3-8b", 4096, 14336, 32, 32, 8, 128256, tied=False),
    "llama-3-70b": Shape("llama-3-70b", 8192, 28672, 80, 64, 8, 128256, tied=False),
    # For smoke runs: the same layout, small enough for seconds on a CPU.
    "tiny": Shape("tiny", 64, 128, 4, 4, 2, 512, tied=True),
}
FAMILY = "llama3"  # tests/tiny.py's Llama-3-style template: 5 post-instruction tokens, like Llama-3's


def tokenizer():
    """tests/tiny.py's byte-level BPE tokenizer with a Llama-3-style chat template (built here, no network)."""
    from tests.tiny import byte_bpe_tokenizer

    return byte_bpe_tokenizer(FAMILY)


def saved_tokenizer(folder) -> object:
    """The tokenizer saved into `folder` and read back (TransformerLens needs one loaded from a folder), padded
    on the left as tlrefusal pads."""
    from transformers import AutoTokenizer

    from tlrefusal.model import prepare_tokenizer

    tokenizer().save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    prepare_tokenizer(tok)
    return tok


def hf_config(shape: Shape, tok, layers: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers if layers is None else layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                       max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=shape.tied,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def random_model(config, device: str, dtype, seed: int = 0):
    """The architecture's own random initialisation (std 0.02), built directly on `device` in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    return model.eval()


WORDS = sorted({w.strip(".,?!'").lower() for line in (
    "How do I bake bread at home? Write a poem about the sea. Explain photosynthesis simply. "
    "Tell me how to pick a lock. Give me three facts about volcanoes. "
    "The quick brown fox jumps over the lazy dog. Sure, here is a recipe with flour, water and salt."
).split() for w in [line] if w.strip(".,?!'")})


def prompts(n: int, seed: int, words: int = 14) -> list[str]:
    """`n` synthetic instructions of `words` words from the tokenizer's training corpus (short in tokens)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "." for _ in range(n)]


def write_prompt_files(folder: Path, n: int, words: int = 14) -> dict[str, Path]:
    """A 'harmful' and a 'harmless' pool of `n` prompts each, as .json lists (random models: labels are names)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for seed, label in enumerate(("harmful", "harmless")):
        files[label] = folder / f"{label}.json"
        files[label].write_text(json.dumps(prompts(n, seed + 1, words)))
    return files


def refusal_token_ids(tok) -> list[int]:
    """The first token of 'I' (the paper's Llama-3 refusal token), in this tokenizer."""
    return tok.encode("I", add_special_tokens=False)[:1]


def build_checkpoint(shape: Shape, folder: Path, dtype: str = "bfloat16") -> dict:
    """Save a random `shape` model with the tokenizer as a Hugging Face folder (atomic: built beside, renamed)."""
    import torch

    started = time.perf_counter()
    tok = tokenizer()
    model = random_model(hf_config(shape, tok), "cpu", getattr(torch, dtype))
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    (partial / "bench_shape.json").write_text(json.dumps({**asdict(shape), "dtype": dtype}))
    partial.rename(folder)
    return {"seconds": time.perf_counter() - started}


def checkpoint_sizes(folder: Path) -> dict:
    """Bytes of the weights on disk, of the largest tensor as stored and in float32, parameter count."""
    from tlrefusal.export import ShardReader, read_checkpoint

    checkpoint = read_checkpoint(folder)
    largest = largest_fp32 = params = 0
    for shard in checkpoint.shards:
        for entry in ShardReader(folder / shard).entries.values():
            n = 1
            for d in entry["shape"]:
                n *= d
            params += n
            largest = max(largest, entry["data_offsets"][1] - entry["data_offsets"][0])
            largest_fp32 = max(largest_fp32, 4 * n)
    return {"weights_bytes": checkpoint.nbytes, "largest_tensor_bytes": largest,
            "largest_tensor_fp32_bytes": largest_fp32, "parameters": params, "shards": len(checkpoint.shards)}


# The wrapper: a fresh, small Python process that runs one command and reports that command's peak RSS.
# ru_maxrss of RUSAGE_CHILDREN is the largest of the waited-for descendants (for torchrun: the largest rank).
WRAPPER = r"""
import json, resource, subprocess, sys, time
spec = json.loads(sys.argv[1])
t = time.perf_counter()
with open(spec["log"], "w") as log:
    rc = subprocess.run(spec["cmd"], stdout=log, stderr=subprocess.STDOUT, env=spec["env"]).returncode
print(json.dumps({"rc": rc, "wall_s": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def measured(cmd: list[str], log: Path, threads: int) -> dict:
    """Run `cmd` under the wrapper at `threads` threads; rc, wall seconds, peak RSS (MB), load before/after."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps({"cmd": cmd, "log": str(log), "env": env})],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the wrapper failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(command=" ".join(cmd), threads=threads, loadavg_before=[round(x, 2) for x in load_before],
                  loadavg_after=[round(x, 2) for x in os.getloadavg()])
    if result["rc"] != 0:
        result["log_tail"] = log.read_text()[-1500:]
    return result


IMPORTS = ("import torch, transformers, transformer_lens.model_bridge; import tlrefusal.cli, tlrefusal.pipeline, "
           "tlrefusal.selection, tlrefusal.plots")


PLAN_WITH_CLI = ("import sys; from pathlib import Path; import tlrefusal.cli, tlrefusal.export; "
                 "from tlrefusal.export.weights import weight_plan; folder = Path(sys.argv[1]); "
                 "weight_plan(folder, tlrefusal.export.read_checkpoint(folder).keys)")


def tlrefusal_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tlrefusal", *args]


def verification_step(tmp: Path, mode: str, weights_bytes: int) -> dict:
    """`tlrefusal orthogonalize` with one verification mode: peak RSS against one model, and its record.

    Verification holds one model at a time: the export (plain transformers), then the source (under hooks);
    the export is the larger when it unties a tied embedding (the default). "One model" is the larger."""
    from tlrefusal import artifacts

    out = tmp / f"export_{mode.replace(':', '')}"
    check = measured(tlrefusal_cmd("orthogonalize", str(tmp / "run1"), "--out", str(out), "--layer", "0",
                                   "--position", "-1", "--dtype", "bfloat16", "--verify", mode),
                     tmp / f"verify_{mode}.log", 1)
    check["mode"] = f"--verify {mode}"
    check["peak_rss_over_source_weights"] = check["peak_rss_mb"] * 2**20 / weights_bytes
    if check["rc"] == 0:
        check["export_weights_bytes"] = checkpoint_sizes(out)["weights_bytes"]
        check["peak_rss_over_one_model"] = (check["peak_rss_mb"] * 2**20
                                            / max(weights_bytes, check["export_weights_bytes"]))
        record = artifacts.read_json(out / artifacts.EXPORT_RECORD)
        check["record_seconds"] = record.get("seconds")
        check["verification"] = {k: v for k, v in (record.get("verification") or {}).items() if k != "examples"}
    shutil.rmtree(out, ignore_errors=True)  # a ~1B export is gigabytes of temporary disk
    return check


def extract_args(model: Path, files: dict[str, Path], n_train: int, n_val: int, prune: float, ids: list[int],
                 out: Path) -> list[str]:
    # Thresholds that keep every scored candidate: the random model's scores mean nothing, and the export
    # needs a chosen direction.
    return ["extract", str(model), "--out", str(out), "--harmful", str(files["harmful"]),
            "--harmless", str(files["harmless"]), "--n-train", str(n_train), "--n-val", str(n_val), "--no-filter",
            "--refusal-token-ids", ",".join(map(str, ids)), "--dtype", "bfloat16", "--prune-layers", str(prune),
            "--kl-threshold", "1e9", "--induce-threshold", "-1e9", "--batch-size", str(2 * n_val)]


def run_summary(run: Path) -> dict:
    """The extract run's step seconds and its scored candidates (for comparing two runs)."""
    from tlrefusal import artifacts

    manifest = artifacts.read_json(run / artifacts.MANIFEST)
    selection = artifacts.read_json(run / artifacts.SELECTION)
    scored = [c for c in selection["candidates"] if c["bypass_score"] is not None]
    return {"seconds": manifest["seconds"], "candidates_scored": len(scored), "scores": scored}


def compare_selections(a: dict, b: dict) -> dict:
    key = ("bypass_score", "induce_score", "kl_score")
    pairs = list(zip(a["scores"], b["scores"], strict=False))
    same_set = [(x["position"], x["layer"]) for x in a["scores"]] == [(x["position"], x["layer"]) for x in b["scores"]]
    diff = max((abs(x[k] - y[k]) for x, y in pairs for k in key), default=None)
    return {"same_candidates": same_set, "max_abs_score_diff": diff,
            "identical": same_set and all(x[k] == y[k] for x, y in pairs for k in key)}


ATTENTION_CHILD = r"""
import json, statistics, sys, time
import torch
sys.path.insert(0, sys.argv[2])
import bench_scale
from hooks import ablation_hooks
from transformer_lens.model_bridge import TransformerBridge
spec = json.loads(sys.argv[1])
shape = bench_scale.Shape(**spec["shape"])
folder = spec["folder"]
tok = bench_scale.saved_tokenizer(folder)
config = bench_scale.hf_config(shape, tok, spec["layers"])
config.save_pretrained(folder)
ids = torch.randint(0, len(tok), (spec["batch"], spec["seq"]), generator=torch.Generator().manual_seed(0))
r = torch.randn(shape.hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
def timed(fn):
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(spec["repeats"]):
            t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times)
out = {}
for impl in ("eager", "sdpa"):
    model = bench_scale.random_model(config, "cpu", torch.bfloat16)
    model.config._attn_implementation = impl
    model.set_attn_implementation(impl) if hasattr(model, "set_attn_implementation") else None
    out[f"hf_{impl}"] = timed(lambda: model(ids))
    out[f"hf_{impl}_impl"] = model.config._attn_implementation
    bridge = TransformerBridge.boot_transformers(folder, hf_model=model, tokenizer=tok, device="cpu", dtype=torch.bfloat16)
    out[f"bridge_{impl}_impl_after_boot"] = model.config._attn_implementation
    hooks = ablation_hooks(r.to(torch.bfloat16), spec["layers"])
    def hooked():
        with bridge.hooks(fwd_hooks=hooks):
            bridge(ids)
    out[f"bridge_{impl}"] = timed(hooked)
    del bridge, model
print(json.dumps(out))
"""


def attention_benchmark(shape: Shape, layers: int, batch: int, seq: int, repeats: int, threads: int,
                        tmp: Path) -> dict:
    """HF eager vs sdpa, and a hooked bridge forward over each, on `layers` layers of `shape` with a 1,024-token
    vocabulary (the full-sequence unembedding of 128k tokens would hide attention's share)."""
    shape = replace(shape, vocab=1024)
    spec = {"shape": asdict(shape), "layers": layers, "batch": batch, "seq": seq, "repeats": repeats,
            "folder": str(tmp / "attention_model")}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    load = os.getloadavg()
    proc = subprocess.run([sys.executable, "-c", ATTENTION_CHILD, json.dumps(spec), str(Path(__file__).parent)],
                          capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {"status": f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}",
                "log_tail": proc.stderr[-1500:]}
    seconds = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "measured", "layers": layers, "vocab": shape.vocab, "batch": batch, "seq": seq, "threads": threads,
            "repeats": repeats, "median_seconds": seconds,
            "hf_sdpa_over_eager": seconds["hf_sdpa"] / seconds["hf_eager"],
            "bridge_sdpa_over_eager": seconds["bridge_sdpa"] / seconds["bridge_eager"],
            "bridge_eager_over_hf_eager": seconds["bridge_eager"] / seconds["hf_eager"],
            "loadavg_before": [round(x, 2) for x in load], "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def cache_folder(shape: Shape, cache: Path | None) -> Path:
    base = cache or Path(os.environ.get("TLREFUSAL_CACHE", Path.home() / ".cache" / "tlrefusal")) / "bench_scale"
    key = hashlib.sha256(json.dumps(asdict(shape), sort_keys=True).encode()).hexdigest()[:12]
    return base / f"{shape.name}-bf16-{key}"


@dataclass(frozen=True)
class Sizes:
    """How much work the extract steps do (chosen so the ~1B run takes about 15 minutes on 2 cores)."""

    n_train: int = 8
    n_val: int = 8
    prune: float = 0.85  # of 16 layers, layers 0-1 are scored: 2 x 5 positions = 10 candidates
    words: int = 8  # words per prompt: about 25 tokens in the chat template
    attention_layers: int = 2
    attention_batch: int = 1
    attention_seq: int = 1024
    attention_repeats: int = 3


SMALL = {"tiny": Sizes(n_train=4, n_val=2, prune=0.5, attention_layers=2, attention_batch=2, attention_seq=32,
                       attention_repeats=1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--cache", type=Path, help="where the random checkpoint is kept (default: "
                        "$TLREFUSAL_CACHE/bench_scale or ~/.cache/tlrefusal/bench_scale)")
    parser.add_argument("--n-train", type=int)
    parser.add_argument("--n-val", type=int)
    parser.add_argument("--prune-layers", type=float, help="extract's --prune-layers (how many layers are scored)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["two-process", "export", "verification", "attention"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale_cpu.json")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    sizes = SMALL.get(shape.name, Sizes())
    sizes = replace(sizes, **{k: v for k, v in (("n_train", args.n_train), ("n_val", args.n_val),
                                                 ("prune", args.prune_layers)) if v is not None})

    import torch
    import transformers

    from tlrefusal import __version__

    folder = cache_folder(shape, args.cache)
    build = {"cached": folder.is_dir()}
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        build.update(build_checkpoint(shape, folder))
    sizes_on_disk = checkpoint_sizes(folder)
    tok = tokenizer()
    ids = refusal_token_ids(tok)
    from tlrefusal.chat import ChatFormat

    lengths = [len(t) for t in ChatFormat.from_tokenizer(tok).tokenize(prompts(16, 1, sizes.words))]
    steps: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        tmp = Path(tmp)
        files = write_prompt_files(tmp / "prompts", sizes.n_train + sizes.n_val, sizes.words)
        base_args = dict(model=folder, files=files, n_train=sizes.n_train, n_val=sizes.n_val, prune=sizes.prune, ids=ids)
        # 1. extract, one process at one thread: peak RSS and the scoring seconds.
        one = measured(tlrefusal_cmd(*extract_args(**base_args, out=tmp / "run1")), tmp / "extract1.log", 1)
        if one["rc"] == 0:
            one.update(run_summary(tmp / "run1"))
            one["peak_rss_over_weights"] = one["peak_rss_mb"] * 2**20 / sizes_on_disk["weights_bytes"]
        # What the extract process holds before any model: its imports (the same modules, no weights).
        imports = measured([sys.executable, "-c", IMPORTS], tmp / "imports.log", 1)
        steps["imports_baseline"] = imports
        if one["rc"] == 0 and imports["rc"] == 0:
            one["peak_rss_minus_imports_over_weights"] = ((one["peak_rss_mb"] - imports["peak_rss_mb"]) * 2**20
                                                          / sizes_on_disk["weights_bytes"])
        steps["extract_one_process"] = one
        # 2. the same under torchrun, 2 ranks of one thread each.
        why = "skipped (--skip two-process)" if "two-process" in args.skip else None
        if why is None and one["rc"] == 0:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "tlrefusal", *extract_args(**base_args, out=tmp / "run2")]
            two = measured(torchrun, tmp / "extract2.log", 1)
            if two["rc"] == 0:
                two.update(run_summary(tmp / "run2"))
                two["vs_one_process"] = compare_selections({"scores": one["scores"]}, {"scores": two["scores"]})
                two["wall_over_one_process"] = two["wall_s"] / one["wall_s"]
                two["selection_seconds_over_one_process"] = (two["seconds"]["selection"]
                                                             / one["seconds"]["selection"])
            steps["extract_two_processes"] = two
        else:
            steps["extract_two_processes"] = {"status": f"not run: {why or 'the one-process extract failed'}"}
        for entry in (one, steps["extract_two_processes"]):
            entry.pop("scores", None)  # compared above; the run folders are temporary
        # 3. export without verification, and its baseline (imports, config, the meta model naming tensors).
        if "export" not in args.skip and one["rc"] == 0:
            import bench_orthogonalize

            export = measured(tlrefusal_cmd("orthogonalize", str(tmp / "run1"), "--out", str(tmp / "export"),
                                            "--layer", "0", "--position", "-1", "--verify", "none"),
                              tmp / "export.log", 1)
            # Two baselines: bench_orthogonalize's `plan` child (the export's library imports, the config and the
            # meta model that names the tensors), and the same with the CLI's imports too (typer, rich, the
            # commands), as the measured process has them. The streaming cost is taken over the second.
            base = bench_orthogonalize.run_child("plan", str(folder), "", "", "0")
            cli_base = measured([sys.executable, "-c", PLAN_WITH_CLI, str(folder)], tmp / "plan.log", 1)
            export["baseline_rss_mb_library"] = base["peak_rss_mb"]
            export["baseline_rss_mb"] = cli_base["peak_rss_mb"]
            export["streaming_rss_mb"] = export["peak_rss_mb"] - cli_base["peak_rss_mb"]
            export["streaming_over_largest_fp32_tensor_library_baseline"] = (
                (export["peak_rss_mb"] - base["peak_rss_mb"]) * 2**20 / sizes_on_disk["largest_tensor_fp32_bytes"])
            export["streaming_over_largest_fp32_tensor"] = (export["streaming_rss_mb"] * 2**20
                                                            / sizes_on_disk["largest_tensor_fp32_bytes"])
            steps["export"] = export
            # 4. export with verification: the peak is the verification's (the streaming part is far smaller).
            # `full` is the target's; `layers:2` and `weights` are measured beside it.
            if "verification" in args.skip:
                steps["verification"] = {"status": "not run: skipped (--skip verification)"}
            else:
                for mode in ("full", "layers:2", "weights"):
                    steps["verification" if mode == "full" else f"verification_{mode}"] = verification_step(
                        tmp, mode, sizes_on_disk["weights_bytes"])
        else:
            steps["export"] = {"status": "not run: " + ("skipped (--skip export)" if "export" in args.skip
                                                        else "the extract failed")}
        # 5. attention: eager vs sdpa, plain and through the bridge.
        steps["attention"] = ({"status": "not run: skipped (--skip attention)"} if "attention" in args.skip else
                              attention_benchmark(shape, sizes.attention_layers, sizes.attention_batch,
                                                  sizes.attention_seq, sizes.attention_repeats, 2, tmp))

    report = {
        "benchmark": "scale_cpu", "shape": asdict(shape), "dtype": "bfloat16", "checkpoint": str(folder),
        "build": build, "sizes_on_disk": sizes_on_disk, "sizes": asdict(sizes), "refusal_token_ids": ids,
        "prompt_tokens_mean": sum(lengths) / len(lengths),
        "steps": steps, "targets": TARGETS, "checks": checks(steps),
        "versions": {"tlrefusal": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "loadavg_end": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def checks(steps: dict) -> dict:
    """Each target: the measured value and whether it is met, or why it was not measured."""
    def one(step: str, key: str, limit: float) -> dict:
        entry = steps.get(step, {})
        if entry.get("rc"):
            return {"status": f"failed: {step} exited with {entry['rc']} (see its log_tail)"}
        if key not in entry:
            return {"status": entry.get("status") or f"not run: {step} failed (rc {entry.get('rc')})"}
        return {"value": round(entry[key], 3), "max": limit, "met": entry[key] <= limit}

    return {
        "extract_peak_over_weights": one("extract_one_process", "peak_rss_over_weights",
                                         TARGETS["extract_peak_over_weights_max"]),
        "export_streaming_over_largest_fp32_tensor": one("export", "streaming_over_largest_fp32_tensor",
                                                         TARGETS["export_streaming_over_largest_fp32_tensor_max"]),
        "verification_peak_over_one_model": one("verification", "peak_rss_over_one_model",
                                                TARGETS["verification_peak_over_one_model_max"]),
        "two_process_selection_over_one_process": one("extract_two_processes", "selection_seconds_over_one_process",
                                                      TARGETS["two_process_over_one_process_max"]),
    }


if __name__ == "__main__":
    main()
