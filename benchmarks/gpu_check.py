"""Checks and measurements that need a GPU, in one command that runs in under 8 minutes without network.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

Checks (each in its own process, with its own time budget; a check past its budget is stopped and reported
with what it had measured):

- `bf16_device_map`: a tiny random model extracted in bfloat16 on one GPU (`--device cuda`) and through a
  device map (`--device-map auto`): mean activations, candidates and every candidate's scores must be
  bitwise equal.
- `torchrun_two_ranks`: `tlrefusal extract` under `torchrun --standalone --nproc_per_node=2` on the one GPU
  against one process: the run's artifacts (prompts, means, candidates, selection, direction) must be
  byte-identical.
- `scale_8b`, `scale_70b`: random-weight models with Llama-3-8B's and Llama-3-70B's layer shapes (full
  vocabulary, cut to 2 and 6 layers), bfloat16, built on the GPU from a config; at batch 32 and 64: seconds
  and peak GPU memory of the extract steps (the refusal filter's forward pass, mean activations over
  128 + 128 prompts, candidate scoring on 32 + 32 validation prompts: seconds per candidate, at the default
  candidates per forward pass and at one), of greedy
  generation under ablation hooks, and of the CE loss on 256-token sequences; each extrapolated linearly in
  depth to the full model (32 and 80 layers). For 8B, the projected full selection (filter, means, and
  5 positions x 25 layers of candidates at batch 32) is compared with the paper's "about 5 minutes on one
  A6000", scaled by the ratio of the two GPUs' peak dense bfloat16 throughput.

Without a CUDA device every check is reported "not run: no CUDA device" (exit 0, the list printed).
`--cpu-smoke` runs the same checks' code on the CPU with tiny shapes and sizes (what tests/test_benchmarks.py
runs): its numbers say nothing about a GPU. Exit status: 1 if a check failed, else 0; checks not run are
printed and listed under "not_run" in the JSON, never counted as passed.
"""
import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import (  # noqa: E402  (the benchmarks folder is not a package)
    ROOT,
    SHAPES,
    Shape,
    hf_config,
    prompts,
    random_model,
    refusal_token_ids,
    saved_tokenizer,
    write_prompt_files,
)

CHECKS = ("bf16_device_map", "torchrun_two_ranks", "scale_8b", "scale_70b")
# The paper's extraction budget as issue 16 quotes it, and peak dense bfloat16 tensor throughput (TFLOP/s,
# without sparsity, from the vendors' data sheets) to scale it by.
PAPER_BUDGET = {"seconds": 300.0, "gpu": "NVIDIA RTX A6000"}
PEAK_BF16_TFLOPS = {"RTX A6000": 154.8, "H200 NVL": 835.0, "H200": 989.5, "H100 NVL": 835.0, "H100 PCIe": 756.0,
                    "H100": 989.5, "A100": 312.0, "L40S": 362.1, "L40": 181.0, "RTX 4090": 165.2, "A10": 125.0,
                    "L4": 121.0}


@dataclass(frozen=True)
class Profile:
    """Sizes and budgets of one way of running the checks."""

    device: str
    scale_shapes: dict[str, str]  # check -> shape name
    depths: tuple[int, int]
    n_train: int  # per label
    n_val: int  # per label
    batches: tuple[int, ...]
    gen_tokens: int
    ce_len: int
    budgets: dict[str, float]  # check -> seconds (the whole check's process)
    tiny_n_train: int = 8
    tiny_n_val: int = 4
    full_layers: dict[str, int] = field(default_factory=dict)  # check -> depth extrapolated to


GPU = Profile(device="cuda", scale_shapes={"scale_8b": "llama-3-8b", "scale_70b": "llama-3-70b"}, depths=(2, 6),
              n_train=128, n_val=32, batches=(32, 64), gen_tokens=32, ce_len=256,
              budgets={"bf16_device_map": 60, "torchrun_two_ranks": 100, "scale_8b": 140, "scale_70b": 140},
              full_layers={"scale_8b": 32, "scale_70b": 80})
# The same code on a CPU in seconds: the shapes keep the layout and the depths extrapolated to, nothing else.
SMOKE = Profile(device="cpu", scale_shapes={"scale_8b": "tiny", "scale_70b": "tiny"}, depths=(1, 2),
                n_train=4, n_val=2, batches=(2, 4), gen_tokens=2, ce_len=16,
                budgets={"bf16_device_map": 120, "torchrun_two_ranks": 150, "scale_8b": 120, "scale_70b": 120},
                tiny_n_train=4, tiny_n_val=2, full_layers={"scale_8b": 32, "scale_70b": 80})


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# --- bf16 on one device vs a device map ------------------------------------------------------------------

def tiny_model(folder: Path) -> Path:
    from tests.tiny import save_tiny_model

    return save_tiny_model(folder, "llama", family="llama3")


def check_device_map(profile: Profile, tmp: Path, partial: Path) -> dict:
    from tlrefusal import artifacts
    from tlrefusal.pipeline import ExtractConfig, run_extract
    from tlrefusal.selection import SelectionConfig

    model = tiny_model(tmp / "tiny")
    files = write_prompt_files(tmp / "prompts", profile.tiny_n_train + profile.tiny_n_val)
    ids = tuple(refusal_token_ids(saved_tokenizer(tmp / "tok")))
    if profile.device == "cuda":
        mapped = {"device_map": "auto"}
    else:  # one device in a map installs no accelerate hooks: put half the layers on disk to dispatch for real
        layout = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
        (tmp / "map.json").write_text(json.dumps(layout))
        mapped = {"device_map": str(tmp / "map.json"), "offload_folder": str(tmp / "offload")}
    common = dict(model=str(model), dtype="bfloat16", harmful=str(files["harmful"]), harmless=str(files["harmless"]),
                  n_train=profile.tiny_n_train, n_val=profile.tiny_n_val, filter=False, refusal_token_ids=ids,
                  selection=SelectionConfig(kl_threshold=1e9, induce_threshold=-1e9))
    runs, out = {}, {"device": profile.device, "device_map": mapped}
    for name, placement in (("device", {"device": profile.device}), ("device_map", mapped)):
        started = time.perf_counter()
        run_extract(ExtractConfig(**common, **placement), tmp / name)
        out[f"{name}_seconds"] = round(time.perf_counter() - started, 2)
        runs[name] = tmp / name
        write_json(partial, out)
    diffs = {}
    for file in (artifacts.MEANS, artifacts.CANDIDATES):
        a, b = (artifacts.read_tensors(runs[n] / file) for n in ("device", "device_map"))
        diffs[file] = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    a, b = (artifacts.read_json(runs[n] / artifacts.SELECTION)["candidates"] for n in ("device", "device_map"))
    keys = ("bypass_score", "induce_score", "kl_score")
    diffs["selection scores"] = max((abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in keys
                                     if x[k] is not None), default=0.0)
    out["max_abs_diff"] = diffs
    out["status"] = "passed" if all(d == 0 for d in diffs.values()) else "failed: the two placements differ"
    return out


# --- torchrun, 2 ranks on one device ---------------------------------------------------------------------

def check_torchrun(profile: Profile, tmp: Path, partial: Path) -> dict:
    from tlrefusal import artifacts

    model = tiny_model(tmp / "tiny")
    files = write_prompt_files(tmp / "prompts", profile.tiny_n_train + profile.tiny_n_val)
    ids = refusal_token_ids(saved_tokenizer(tmp / "tok"))
    out: dict = {"device": profile.device}
    if profile.device == "cuda":
        import torch

        out["gpus"] = torch.cuda.device_count()  # 1 on the target machine: both ranks must share cuda:0

    def extract(prefix: list[str], run: str) -> dict:
        cmd = [*prefix, "extract", str(model), "--out", str(tmp / run), "--harmful", str(files["harmful"]),
               "--harmless", str(files["harmless"]), "--n-train", str(profile.tiny_n_train),
               "--n-val", str(profile.tiny_n_val), "--no-filter", "--refusal-token-ids", ",".join(map(str, ids)),
               "--dtype", "bfloat16", "--device", profile.device, "--kl-threshold", "1e9",
               "--induce-threshold", "-1e9"]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
        result = {"rc": proc.returncode, "seconds": round(time.perf_counter() - started, 2)}
        if proc.returncode != 0:
            result["log_tail"] = (proc.stdout + proc.stderr)[-1500:]
        return result

    out["one_process"] = extract([sys.executable, "-m", "tlrefusal"], "one")
    write_json(partial, out)
    out["two_ranks"] = extract([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                "-m", "tlrefusal"], "two")
    if out["one_process"]["rc"] or out["two_ranks"]["rc"]:
        out["status"] = "failed: " + ("the one-process extract failed" if out["one_process"]["rc"]
                                      else "the torchrun extract failed (see two_ranks.log_tail)")
        return out
    names = (artifacts.PROMPTS, artifacts.MEANS, artifacts.CANDIDATES, artifacts.SELECTION, artifacts.DIRECTION)
    same = {n: (tmp / "one" / n).read_bytes() == (tmp / "two" / n).read_bytes() for n in names}
    out["byte_identical"] = same
    out["status"] = "passed" if all(same.values()) else "failed: artifacts differ: " + ", ".join(
        n for n, s in same.items() if not s)
    return out


# --- scale: seconds and peak memory per step, extrapolated in depth ---------------------------------------

class Clock:
    """Wall seconds (after the device finishes) and the peak device memory of one step on one model.

    Both depths' models stay on the device, so the peak is this model's weights plus what the step allocated
    above the memory in use when it started (`working_gib`), not the device's total.
    """

    def __init__(self, model) -> None:
        import torch

        self.torch, self.cuda = torch, model.device.type == "cuda"
        self.weights = sum(p.nbytes for p in {id(p): p for p in model.bridge.parameters()}.values())

    def __enter__(self) -> "Clock":
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.start = self.torch.cuda.memory_allocated()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.started
        self.working_gib = (self.torch.cuda.max_memory_allocated() - self.start) / 2**30 if self.cuda else None
        self.peak_gib = self.weights / 2**30 + self.working_gib if self.cuda else None


def build_bridge(shape: Shape, depth: int, device: str, folder: Path):
    """A random `shape` model cut to `depth` layers, built on `device`, wrapped as tlrefusal loads models."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    from tlrefusal.model import LoadedModel, ModelSource
    from tlrefusal.placement import Placement

    tok = saved_tokenizer(folder)
    config = hf_config(shape, tok, depth)
    config.save_pretrained(folder)  # the bridge reads the architecture from the folder; weights stay in memory
    hf_model = random_model(config, device, torch.bfloat16)
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf_model, tokenizer=tok, device=device,
                                                 dtype=torch.bfloat16)
    weights = sum(p.nbytes for p in {id(p): p for p in hf_model.parameters()}.values())
    return LoadedModel(bridge=bridge, tokenizer=tok, source=ModelSource(str(folder), "local", folder),
                       model_type="llama", dtype=torch.bfloat16,
                       placement=Placement(device=device, dtype="bfloat16")), weights


def warm_up(model, chat, data: dict) -> None:
    """One small call of each step, so that no measurement pays for kernel loading or allocator growth."""
    import torch

    from hooks import ablation_hooks
    from tlrefusal.activations import last_logits, mean_activations
    from tlrefusal.evaluation.loss import LossSequence, ce_loss
    from tlrefusal.generation import greedy_completions

    few = data["harmless_val"][:2]
    last_logits(model, chat, few, batch_size=2)
    mean_activations(model, chat, few, 2)
    hooks = ablation_hooks(torch.ones(model.d_model), model.n_layers)
    greedy_completions(model, chat, few, 2, hooks, batch_size=2, stop="eos")
    ce_loss(model, [LossSequence(list(range(3, 19)), 1)], hooks, batch_size=1)


def measure_depth(model, chat, profile: Profile, batch: int, data: dict, ids: list[int]) -> dict:
    """One depth at one batch size: every step's seconds and peak device memory."""
    import torch

    from hooks import ablation_hooks
    from tlrefusal.activations import candidate_directions, last_logits, mean_activations
    from tlrefusal.evaluation.loss import LossSequence, ce_loss
    from tlrefusal.generation import greedy_completions
    from tlrefusal.selection import SelectionConfig, score_candidates

    row = {}
    with Clock(model) as c:  # the refusal filter's baseline pass over every sampled prompt
        last_logits(model, chat, data["filter"], batch_size=batch)
    row["filter"] = {"seconds": c.seconds, "prompts": len(data["filter"]), "peak_gib": c.peak_gib}
    with Clock(model) as c:
        means = [mean_activations(model, chat, data[label], batch) for label in ("harmful_train", "harmless_train")]
    row["mean_activations"] = {"seconds": c.seconds, "prompts": 2 * len(data["harmful_train"]), "peak_gib": c.peak_gib}
    directions = candidate_directions(*means)
    with Clock(model) as c:  # scoring's own baseline pass, subtracted from the per-candidate time
        last_logits(model, chat, data["harmless_val"], batch_size=batch)
    base = c.seconds
    # Scoring at the default candidates per pass, and at one (the lever's effect on this GPU).
    for key, per_pass in (("scoring", SelectionConfig().candidates_per_pass), ("scoring_one_per_pass", 1)):
        config = SelectionConfig(prune_layer_fraction=0.0, batch_size=batch, candidates_per_pass=per_pass)
        with Clock(model) as c:
            scores = score_candidates(model, chat, directions, data["harmful_val"], data["harmless_val"], ids,
                                      config)
        row[key] = {"seconds": c.seconds, "candidates": len(scores), "candidates_per_pass": per_pass,
                    "peak_gib": c.peak_gib, "seconds_per_candidate": max(c.seconds - base, 0.0) / len(scores)}
    hooks = ablation_hooks(directions[-1, 0], model.n_layers)
    with Clock(model) as c:
        greedy_completions(model, chat, data["generation"][:batch], profile.gen_tokens, hooks, batch_size=batch,
                           stop="eos")
    row["generation"] = {"seconds": c.seconds, "prompts": batch, "max_new_tokens": profile.gen_tokens,
                         "peak_gib": c.peak_gib}
    gen = torch.Generator().manual_seed(batch)
    sequences = [LossSequence(torch.randint(3, len(model.tokenizer), (profile.ce_len,), generator=gen).tolist(), 1)
                 for _ in range(batch)]
    with Clock(model) as c:
        ce_loss(model, sequences, hooks, batch_size=batch)
    row["ce"] = {"seconds": c.seconds, "sequences": batch, "tokens": profile.ce_len, "peak_gib": c.peak_gib}
    return row


def extrapolate(a: float, b: float, depths: tuple[int, int], full: int) -> float:
    """The straight line through (depths[0], a) and (depths[1], b), at `full` layers."""
    return a + (b - a) * (full - depths[0]) / (depths[1] - depths[0])


def gpu_budget(name: str) -> dict:
    """The paper's 300 s on an A6000, scaled to `name` by peak dense bfloat16 throughput."""
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    base = PEAK_BF16_TFLOPS["RTX A6000"]
    if peak is None:
        return {"gpu": name, "seconds": None, "why": f"no peak bfloat16 throughput known for {name}"}
    return {"gpu": name, "seconds": PAPER_BUDGET["seconds"] * base / peak, "paper": PAPER_BUDGET,
            "scale": f"{base} / {peak} TFLOP/s (A6000 / this GPU, dense bfloat16)"}


def check_scale(name: str, profile: Profile, tmp: Path, partial: Path, deadline: float) -> dict:
    """Build each depth, measure at each batch size (batch 32 at both depths first), then extrapolate."""
    import torch

    from tlrefusal.chat import ChatFormat

    shape = SHAPES[profile.scale_shapes[name]]
    full = profile.full_layers[name]
    out: dict = {"shape": asdict(shape), "device": profile.device, "depths": list(profile.depths),
                 "full_layers": full, "n_train": profile.n_train, "n_val": profile.n_val, "measured": {},
                 "not_measured": []}
    if profile.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name(0)
    models = {}
    for depth in profile.depths:
        started = time.perf_counter()
        models[depth], weights = build_bridge(shape, depth, profile.device, tmp / f"depth{depth}")
        out[f"build_seconds_depth{depth}"] = round(time.perf_counter() - started, 2)
        out[f"weights_gib_depth{depth}"] = weights / 2**30
    chat = ChatFormat.from_tokenizer(models[profile.depths[0]].tokenizer)
    ids = refusal_token_ids(models[profile.depths[0]].tokenizer)
    n_t, n_v = profile.n_train, profile.n_val
    data = {"harmful_train": prompts(n_t, 1), "harmless_train": prompts(n_t, 2), "harmful_val": prompts(n_v, 3),
            "harmless_val": prompts(n_v, 4), "generation": prompts(max(profile.batches), 5)}
    data["filter"] = prompts(2 * (n_t + n_v), 6)
    tokens = [len(t) for t in chat.tokenize(data["harmful_val"])]
    out["prompt_tokens_mean"] = sum(tokens) / len(tokens)
    out["n_positions"] = len(chat.positions)
    for model in models.values():
        warm_up(model, chat, data)
    for batch in profile.batches:
        for depth in profile.depths:
            key = f"batch{batch}_depth{depth}"
            if time.time() > deadline:
                out["not_measured"].append(f"{key}: not run: the check's time budget ran out")
                continue
            out["measured"][key] = measure_depth(models[depth], chat, profile, batch, data, ids)
            write_json(partial, out)
    out["extrapolated"] = {}
    for batch in profile.batches:
        rows = [out["measured"].get(f"batch{batch}_depth{d}") for d in profile.depths]
        if None in rows:
            continue
        line = {}
        for step in ("filter", "mean_activations", "scoring", "scoring_one_per_pass", "generation", "ce"):
            for metric in ("seconds", "peak_gib", "seconds_per_candidate"):
                if rows[0][step].get(metric) is not None:
                    line[f"{step}_{metric}"] = extrapolate(rows[0][step][metric], rows[1][step][metric],
                                                           profile.depths, full)
        n_candidates = len(chat.positions) * int(full * 0.8)  # the paper's layer filter keeps layers < 0.8 L
        line["candidates"] = n_candidates
        line["projected_selection_seconds"] = (line["filter_seconds"] + line["mean_activations_seconds"]
                                               + n_candidates * line["scoring_seconds_per_candidate"])
        line["generation_tokens_per_second"] = batch * profile.gen_tokens / line["generation_seconds"]
        out["extrapolated"][f"batch{batch}"] = line
    first = f"batch{profile.batches[0]}"  # the paper's batch size (32) on a GPU
    if name == "scale_8b" and first in out["extrapolated"]:
        projected = out["extrapolated"][first]["projected_selection_seconds"]
        if profile.device == "cuda":
            budget = gpu_budget(out["gpu"])
            met = None if budget["seconds"] is None else projected <= budget["seconds"]
            out["paper_budget"] = {**budget, "batch": profile.batches[0], "projected_seconds": projected, "met": met}
        else:
            out["paper_budget"] = {"status": "not applicable: a CPU smoke run"}
    out["status"] = "measured" if not out["not_measured"] else "measured in part (time budget)"
    return out


# --- running the checks ------------------------------------------------------------------------------------

def child(name: str, profile_name: str, partial: Path, deadline: float) -> None:
    profile = GPU if profile_name == "gpu" else SMOKE
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        tmp = Path(tmp)
        if name == "bf16_device_map":
            result = check_device_map(profile, tmp, partial)
        elif name == "torchrun_two_ranks":
            result = check_torchrun(profile, tmp, partial)
        else:
            result = check_scale(name, profile, tmp, partial, deadline)
    write_json(partial, result)


def run_check(name: str, profile_name: str, budget: float, tmp: Path) -> dict:
    """The check in its own process, stopped at its budget; what it wrote so far is kept."""
    partial = tmp / f"{name}.json"
    started = time.time()
    # The scale checks stop starting new measurements at 80% of the budget, leaving time to write.
    deadline = started + 0.8 * budget
    cmd = [sys.executable, __file__, "--child", name, "--profile", profile_name, "--partial", str(partial),
           "--deadline", str(deadline)]
    # Its own session, so that a check stopped at its budget takes its children (torchrun's ranks) with it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    try:
        output, _ = proc.communicate(timeout=budget)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        rc = None
    tail = (output or "")[-2000:]
    result = json.loads(partial.read_text()) if partial.is_file() else {}
    result["seconds"] = round(time.time() - started, 1)
    result["budget_seconds"] = budget
    if rc is None:
        result["status"] = f"failed: stopped at its {budget:.0f} s budget (partial results kept)"
        result["log_tail"] = tail
    elif rc != 0:
        result["status"] = f"failed: exit {rc}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"
        result["log_tail"] = tail
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="run every check's code on the CPU with tiny "
                        "shapes (tests the script; measures nothing about a GPU)")
    parser.add_argument("--only", action="append", choices=CHECKS, help="run only these checks (repeatable)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--profile", default="gpu", help=argparse.SUPPRESS)
    parser.add_argument("--partial", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.profile, args.partial, args.deadline)
        return 0

    import torch

    profile_name = "smoke" if args.cpu_smoke else "gpu"
    profile = SMOKE if args.cpu_smoke else GPU
    cuda = torch.cuda.is_available()
    started = time.time()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in args.only or CHECKS:
            if not cuda and not args.cpu_smoke:
                results[name] = {"status": "not run: no CUDA device"}
                continue
            results[name] = run_check(name, profile_name, profile.budgets[name], Path(tmp))
            print(f"{name}: {results[name]['status']} ({results[name]['seconds']} s)", flush=True)
    not_run = {n: r["status"] for n, r in results.items() if r["status"].startswith("not run")}
    failed = {n: r["status"] for n, r in results.items() if r["status"].startswith("failed")}
    incomplete = {n: r["not_measured"] for n, r in results.items() if r.get("not_measured")}
    import transformers

    from tlrefusal import __version__

    report = {
        "benchmark": "gpu_check", "mode": "cpu smoke (tiny shapes, no GPU numbers)" if args.cpu_smoke else "gpu",
        "profile": asdict(profile),
        "cuda": cuda, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "checks": results, "not_run": not_run, "failed": failed, "incomplete": incomplete, "seconds": round(time.time() - started, 1),
        "versions": {"tlrefusal": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "loadavg_end": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    for name, why in not_run.items():
        print(f"NOT RUN {name}: {why}")
    for name, why in failed.items():
        print(f"FAILED {name}: {why}")
    for name, missing in incomplete.items():
        print(f"INCOMPLETE {name}: {'; '.join(missing)}")
    budget = results.get("scale_8b", {}).get("paper_budget", {})
    if "projected_seconds" in budget:
        verdict = {True: "met", False: "MISSED", None: "no budget known for this GPU"}[budget["met"]]
        print(f"8B selection projected at {budget['projected_seconds']:.0f} s against the paper's budget scaled to "
              f"{budget['gpu']}: {budget['seconds'] and round(budget['seconds'])} s: {verdict}")
    print(f"wrote {args.out} ({len(results) - len(not_run) - len(failed)} ran, {len(not_run)} not run, "
          f"{len(failed)} failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
