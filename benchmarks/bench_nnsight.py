"""tlrefusal next to an NNsight implementation and a plain PyTorch one of the same steps, in one run.

Same model, prompts and threads for all three; NNsight and plain PyTorch run on their own copy of the
Hugging Face model (the TransformerBridge wraps its model's modules in place). Steps:

- extraction: mean resid_pre at every layer and post-instruction position over harmful + harmless train
  (median of --repeats runs after a warm-up), and the candidate directions they give;
- selection: bypass / induce / KL of every candidate the layer filter keeps, by tlrefusal (`score_candidates`,
  with its exact speed levers) and by NNsight running the paper's algorithm (3 full passes per candidate),
  both scoring tlrefusal's candidate directions, so the scores compare one to one.

Fidelity: cosine and max |difference| of the candidate directions; max |difference| of every score; the
(position, layer) the paper's filters choose. Speed: the ratios. Results: JSON under benchmarks/results/.

    python benchmarks/bench_nnsight.py                                     # demo model, paper sizes
    python benchmarks/bench_nnsight.py --model PATH --n-train 16 --n-val 8 --prune 0.8 --out /tmp/b.json
"""
import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ROOT.parent / "shared" / "data" / "datasets" / "splits"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(fn, repeats: int) -> tuple[object, float, list[float]]:
    fn()  # warm-up (allocator, lazy imports, kernels)
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return result, statistics.median(times), times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--splits", type=Path, default=SPLITS)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--prune", type=float, default=0.2, help="prune_layer_fraction (paper 0.2; higher = "
                                                                  "fewer candidates scored, for quick runs)")
    parser.add_argument("--repeats", type=int, default=3, help="timed extraction runs after a warm-up")
    parser.add_argument("--skip-selection", action="store_true")
    parser.add_argument("--gen-prompts", type=int, default=16, help="held-out prompts for the generation speed "
                                                                    "check (0: skip)")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "nnsight_demo.json")
    args = parser.parse_args(argv)

    from reference_steps import NNsightSteps, PlainSteps
    from transformers import AutoModelForCausalLM

    from tlrefusal import __version__
    from tlrefusal.activations import candidate_directions, mean_activations
    from tlrefusal.chat import ChatFormat, refusal_phrases_for
    from tlrefusal.data import load_prompts, sample_splits
    from tlrefusal.model import load_model, resolve_source
    from tlrefusal.selection import SelectionConfig, choose, score_candidates

    source = resolve_source(args.model)
    model = load_model(source)
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    refusal_ids = chat.refusal_token_ids(refusal_phrases_for(model.model_type))
    pools = {name: load_prompts(str(args.splits / f"{name}.json"))
             for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")}
    splits = sample_splits(pools["harmful_train"], pools["harmless_train"], args.n_train, args.n_val,
                           harmful_val=pools["harmful_val"], harmless_val=pools["harmless_val"])
    train = {label: [p.instruction for p in getattr(splits, f"{label}_train")] for label in ("harmful", "harmless")}
    val = {label: [p.instruction for p in getattr(splits, f"{label}_val")] for label in ("harmful", "harmless")}

    hf = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, attn_implementation="eager").eval()
    others = [NNsightSteps(hf, chat), PlainSteps(hf, chat)]
    means_fn = {"tlrefusal": lambda prompts: mean_activations(model, chat, prompts)}
    means_fn |= {impl.name: impl.mean_activations for impl in others}

    extraction: dict = {}
    candidates: dict = {}
    for name, fn in means_fn.items():
        (harmful, harmless), seconds, runs = timed(lambda fn=fn: (fn(train["harmful"]), fn(train["harmless"])),
                                                   args.repeats)
        candidates[name] = candidate_directions(harmful, harmless)
        extraction[name] = {"median_seconds": seconds, "runs": runs,
                            "prompt_passes": len(train["harmful"]) + len(train["harmless"])}
    ours = candidates["tlrefusal"]
    fidelity: dict = {"candidates": {}}
    for name in ("nnsight", "plain torch"):
        theirs = candidates[name]
        a, b = ours.flatten(0, 1), theirs.flatten(0, 1)
        # Layer 0 at template tokens: harmful and harmless prompts share the embedding, so r = 0 exactly.
        nonzero = (a.norm(dim=-1) > 0) & (b.norm(dim=-1) > 0)
        cos = torch.nn.functional.cosine_similarity(a[nonzero], b[nonzero], dim=-1)
        fidelity["candidates"][name] = {"min_cosine": cos.min().item(), "zero_candidates": int((~nonzero).sum()),
                                        "max_abs_diff": (ours - theirs).abs().max().item()}

    selection = None
    if not args.skip_selection:
        config = SelectionConfig(prune_layer_fraction=args.prune)
        first_pruned = config.first_pruned_layer(model.n_layers)
        started = time.perf_counter()
        our_scores = score_candidates(model, chat, ours, val["harmful"], val["harmless"], refusal_ids, config)
        our_seconds = time.perf_counter() - started
        started = time.perf_counter()
        nn_scores = others[0].score_candidates(ours, val["harmful"], val["harmless"], refusal_ids, first_pruned)
        nn_seconds = time.perf_counter() - started
        diffs = {key: max(abs(getattr(a, key) - getattr(b, key)) for a, b in zip(our_scores, nn_scores, strict=True)
                          if a.layer < first_pruned)
                 for key in ("bypass_score", "induce_score", "kl_score")}
        paper = SelectionConfig(prune_layer_fraction=args.prune)
        chosen = {name: choose(scores, model.n_layers, paper).chosen for name, scores in
                  (("tlrefusal", our_scores), ("nnsight", nn_scores))}
        n_scored = sum(1 for s in our_scores if s.layer < first_pruned)
        n_h, n_l = len(val["harmful"]), len(val["harmless"])
        selection = {
            "candidates_scored": n_scored,
            "seconds": {"tlrefusal": our_seconds, "nnsight": nn_seconds},
            "speedup_nnsight_over_tlrefusal": nn_seconds / our_seconds,
            # Prompt forward passes: a baseline harmless pass, then per candidate ablation over harmful and
            # harmless val and addition over harmless val (tlrefusal runs the two ablated sets as one pass, and
            # runs the chat template's shared head once per hook set instead of once per prompt).
            "prompt_passes": {"tlrefusal": n_l + n_scored * (n_h + 2 * n_l), "nnsight": n_l + n_scored * (n_h + 2 * n_l)},
            "forward_calls": {"tlrefusal": "batches of harmful+harmless val together, plus one head pass per hook set",
                              "nnsight": "one per batch per prompt set per candidate"},
            "max_abs_score_diff": diffs,
            "chosen": {k: (None if c is None else [c.position, c.layer]) for k, c in chosen.items()},
            "same_choice": (chosen["tlrefusal"] is None) == (chosen["nnsight"] is None) and (
                chosen["tlrefusal"] is None or (chosen["tlrefusal"].position, chosen["tlrefusal"].layer)
                == (chosen["nnsight"].position, chosen["nnsight"].layer)),
        }
        fidelity["scores"] = diffs

    generation = None
    if args.gen_prompts:
        generation = generation_speed(model, chat, hf, ours, pools["harmless_val"], args.gen_prompts, args.gen_tokens)

    import nnsight
    import transformers

    t = {k: v["median_seconds"] for k, v in extraction.items()}
    report = {
        "benchmark": "nnsight", "model": args.model, "n_train": args.n_train, "n_val": args.n_val,
        "extraction": extraction,
        "ratios": {"extraction_tlrefusal_over_nnsight": t["tlrefusal"] / t["nnsight"],
                   "extraction_tlrefusal_over_plain": t["tlrefusal"] / t["plain torch"]},
        "selection": selection, "generation": generation, "fidelity": fidelity,
        "versions": {"tlrefusal": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "nnsight": nnsight.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(), "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return report


def generation_speed(model, chat, hf, candidates, pool, n_prompts: int, n_tokens: int) -> dict:
    """Greedy tokens/s: tlrefusal under ablation hooks vs plain transformers `generate` with no hooks.

    Every reply is forced to the full length (no stop token), so both sides generate the same token count.
    """
    from hooks import ablation_hooks
    from tlrefusal.activations import batches

    prompts = [p.instruction for p in pool[-n_prompts:]]
    r = candidates[-1, model.n_layers // 2]
    hooks = ablation_hooks(r, model.n_layers)

    def ours():
        with model.bridge.hooks(fwd_hooks=hooks):
            for batch in batches(prompts, 16):
                ids, mask = chat.encode(batch)
                model.bridge.generate(ids, attention_mask=mask, max_new_tokens=n_tokens, do_sample=False,
                                      stop_at_eos=False, return_type="tokens", verbose=False)

    @torch.inference_mode()
    def plain():
        for batch in batches(prompts, 16):
            ids, mask = chat.encode(batch)
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                        do_sample=False, pad_token_id=chat.tokenizer.pad_token_id)

    _, ours_s, _ = timed(ours, 1)
    _, plain_s, _ = timed(plain, 1)
    tokens = len(prompts) * n_tokens
    return {"prompts": len(prompts), "new_tokens_each": n_tokens,
            "tokens_per_second": {"tlrefusal_ablation": tokens / ours_s, "plain_transformers": tokens / plain_s},
            "ratio_tlrefusal_over_plain": plain_s / ours_s}


def print_table(report: dict) -> None:
    e, r = report["extraction"], report["ratios"]
    print(f"extraction (median s): tlrefusal {e['tlrefusal']['median_seconds']:.2f}, nnsight "
          f"{e['nnsight']['median_seconds']:.2f}, plain torch {e['plain torch']['median_seconds']:.2f}; "
          f"tlrefusal/nnsight {r['extraction_tlrefusal_over_nnsight']:.2f}, "
          f"tlrefusal/plain {r['extraction_tlrefusal_over_plain']:.2f}")
    for name, f in report["fidelity"]["candidates"].items():
        print(f"candidates vs {name}: min cosine {f['min_cosine']:.6f} ({f['zero_candidates']} zero candidates "
              f"skipped), max |diff| {f['max_abs_diff']:.3g}")
    s = report["selection"]
    if s:
        print(f"selection ({s['candidates_scored']} candidates): tlrefusal {s['seconds']['tlrefusal']:.1f}s, "
              f"nnsight {s['seconds']['nnsight']:.1f}s, speedup {s['speedup_nnsight_over_tlrefusal']:.2f}x; "
              f"max |score diff| " + ", ".join(f"{k} {v:.2g}" for k, v in s["max_abs_score_diff"].items())
              + f"; chosen {s['chosen']} (same: {s['same_choice']})")
    g = report.get("generation")
    if g:
        print(f"generation ({g['prompts']} x {g['new_tokens_each']} tokens): tlrefusal under ablation "
              f"{g['tokens_per_second']['tlrefusal_ablation']:.1f} tok/s, plain transformers without hooks "
              f"{g['tokens_per_second']['plain_transformers']:.1f} tok/s, ratio {g['ratio_tlrefusal_over_plain']:.2f}")


if __name__ == "__main__":
    main()
