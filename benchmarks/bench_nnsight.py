"""tlrefusal next to an NNsight implementation and a plain PyTorch one of the same steps, in one run.

Same model, prompts and threads for all three (prompts from the paper's splits: `--paper-data DIR` or
$TLREFUSAL_PAPER_DATA, the folder holding datasets/splits/); NNsight and plain PyTorch run on their own copy of the
Hugging Face model (the TransformerBridge wraps its model's modules in place). Steps:

- extraction: mean resid_pre at every layer and post-instruction position over harmful + harmless train
  (median of --repeats runs after a warm-up), and the candidate directions they give;
- selection: bypass / induce / KL of every candidate the layer filter keeps, by tlrefusal (`score_candidates`,
  with its exact speed levers) and by NNsight running the paper's algorithm (3 full passes per candidate)
  on the NNsight side's own candidate directions, then the paper's filters and choice on each side;
- generation: greedy completions of held-out harmful and harmless prompts (the splits' test sets) under the
  intervention table (`tlrefusal.interventions`: no intervention, ablation of the chosen direction, and
  activation addition, -r on harmful and +r on harmless, at the chosen layer), by all three sides; plain
  PyTorch with no intervention is `generate` without hooks.

The NNsight and plain PyTorch sides are written on their own (`reference_steps.py`): they format and tokenize
prompts, find the post-instruction positions and refusal tokens, hook, score and choose without tlrefusal's
code, so the comparison checks tlrefusal against an independent implementation of the paper's steps.

Fidelity: the post-instruction tokens and refusal token ids each side derives; cosine and max |difference|
of the candidate directions; max |difference| of every score; the (position, layer) the paper's filters choose; identical completions per intervention, and for each one that
differs, how close to a tie the greedy choice was where they part. Cost: seconds, prompt passes and FLOPs
(counted by torch's FlopCounterMode) per step. Results: JSON under benchmarks/results/.

    python benchmarks/bench_nnsight.py --paper-data DIR     # the refusing organism (built if absent), paper sizes
    python benchmarks/bench_nnsight.py --paper-data DIR --model smollm2 --prune 0.8 --out benchmarks/results/nnsight_demo.json
    python benchmarks/bench_nnsight.py --paper-data DIR --model PATH --n-train 16 --n-val 8 --prune 0.8 --out /tmp/b.json
"""
import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from paper_data import add_paper_data_flag, splits_dir
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> tuple[object, float, list[float]]:
    fn()  # warm-up (allocator, lazy imports, kernels)
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return result, statistics.median(times), times


def counted(fn) -> tuple[object, int]:
    """fn() and the floating-point operations it ran (matmuls, attention), by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="organism", help='a built-in model ("organism", the default: built if '
                                                            'absent; "smollm2") or a model folder')
    add_paper_data_flag(parser)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--prune", type=float, default=0.2, help="prune_layer_fraction (paper 0.2; higher = "
                                                                  "fewer candidates scored, for quick runs)")
    parser.add_argument("--repeats", type=int, default=3, help="timed extraction runs after a warm-up")
    parser.add_argument("--skip-selection", action="store_true")
    parser.add_argument("--gen-prompts", type=int, default=32, help="held-out prompts per label for the "
                                                                    "generation check (0: skip)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP counts (each is an extra run)")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "nnsight_organism.json")
    args = parser.parse_args(argv)
    splits = splits_dir(args.paper_data)

    from reference_steps import NNsightSteps, PlainSteps, paper_choice
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    pools = {name: load_prompts(str(splits / f"{name}.json"))
             for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val", "harmful_test",
                          "harmless_test")}
    splits = sample_splits(pools["harmful_train"], pools["harmless_train"], args.n_train, args.n_val,
                           harmful_val=pools["harmful_val"], harmless_val=pools["harmless_val"])
    train = {label: [p.instruction for p in getattr(splits, f"{label}_train")] for label in ("harmful", "harmless")}
    val = {label: [p.instruction for p in getattr(splits, f"{label}_val")] for label in ("harmful", "harmless")}

    hf = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(source.path)  # the reference sides' own copy, as published
    others = [NNsightSteps(hf, tokenizer), PlainSteps(hf, tokenizer)]
    reference = others[0].chat
    ref_refusal_ids = reference.refusal_ids(hf.config.model_type)
    fidelity: dict = {"format": {
        "eoi_ids": {"tlrefusal": list(chat.eoi_ids), "reference": reference.eoi_ids},
        "refusal_ids": {"tlrefusal": list(refusal_ids), "reference": ref_refusal_ids},
        "same": list(chat.eoi_ids) == reference.eoi_ids and sorted(refusal_ids) == sorted(ref_refusal_ids)},
        "candidates": {}}
    means_fn = {"tlrefusal": lambda prompts: mean_activations(model, chat, prompts)}
    means_fn |= {impl.name: impl.mean_activations for impl in others}

    extraction: dict = {}
    candidates: dict = {}
    for name, fn in means_fn.items():
        (harmful, harmless), seconds, runs = timed(lambda fn=fn: (fn(train["harmful"]), fn(train["harmless"])),
                                                   args.repeats)
        # tlrefusal's difference in means, and the reference sides' own (SPEC 1.4).
        candidates[name] = candidate_directions(harmful, harmless) if name == "tlrefusal" else harmful - harmless
        extraction[name] = {"median_seconds": seconds, "runs": runs,
                            "prompt_passes": len(train["harmful"]) + len(train["harmless"])}
        if not args.no_flops:
            _, flops = counted(lambda fn=fn: (fn(train["harmful"]), fn(train["harmless"])))
            extraction[name] |= {"gflops": flops / 1e9, "gflops_per_second": flops / 1e9 / seconds}
    ours = candidates["tlrefusal"]
    for name in ("nnsight", "plain torch"):
        theirs = candidates[name]
        if theirs.shape != ours.shape:  # another number of post-instruction positions: nothing to compare
            fidelity["candidates"][name] = {"shape": {"tlrefusal": list(ours.shape), name: list(theirs.shape)}}
            continue
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
        nn_scores = others[0].score_candidates(candidates["nnsight"], val["harmful"], val["harmless"],
                                               ref_refusal_ids, first_pruned)
        nn_seconds = time.perf_counter() - started
        theirs_by_candidate = {(s.position, s.layer): s for s in nn_scores}
        pairs = [(a, theirs_by_candidate.get((a.position, a.layer))) for a in our_scores if a.layer < first_pruned]
        diffs = {key: max((abs(getattr(a, key) - getattr(b, key)) if b is not None else math.inf)
                          for a, b in pairs)
                 for key in ("bypass_score", "induce_score", "kl_score")}
        chosen = {"tlrefusal": choose(our_scores, model.n_layers, config).chosen,
                  "nnsight": paper_choice(nn_scores, model.n_layers, args.prune)}
        n_scored = sum(1 for s in our_scores if s.layer < first_pruned)
        n_h, n_l = len(val["harmful"]), len(val["harmless"])
        seconds = {"tlrefusal": our_seconds, "nnsight": nn_seconds}
        flops = None if args.no_flops else scoring_flops(model, chat, ours, val, refusal_ids, ref_refusal_ids,
                                                          others[0], candidates["nnsight"], n_scored, seconds)
        direction = generation_direction(chat, our_scores, chosen["tlrefusal"], model.n_layers, args.prune)
        selection = {
            "candidates_scored": n_scored,
            "seconds": seconds, "flops": flops,
            "speedup_nnsight_over_tlrefusal": nn_seconds / our_seconds,
            # Prompt forward passes: a baseline harmless pass, then per candidate ablation over harmful and
            # harmless val and addition over harmless val (tlrefusal runs the two ablated sets as one pass, and
            # runs the chat template's shared head once per hook set instead of once per prompt).
            "prompt_passes": dict.fromkeys(("tlrefusal", "nnsight"), n_l + n_scored * (n_h + 2 * n_l)),
            "forward_calls": {"tlrefusal": "batches of harmful+harmless val together, plus one head pass per hook set",
                              "nnsight": "one per batch per prompt set per candidate"},
            "max_abs_score_diff": diffs,
            "scores": {name: [{k: getattr(s, k) for k in ("position", "layer", "bypass_score", "induce_score",
                                                         "kl_score")} for s in scores if s.layer < first_pruned]
                       for name, scores in (("tlrefusal", our_scores), ("nnsight", nn_scores))},
            "chosen": {k: (None if c is None else [c.position, c.layer]) for k, c in chosen.items()},
            "same_choice": (chosen["tlrefusal"] is None) == (chosen["nnsight"] is None) and (
                chosen["tlrefusal"] is None or (chosen["tlrefusal"].position, chosen["tlrefusal"].layer)
                == (chosen["nnsight"].position, chosen["nnsight"].layer)),
        }
        fidelity["scores"] = diffs

    if selection is None:
        direction = (len(chat.positions) - 1, model.n_layers // 2, "no selection run: last position, middle layer")
    generation = None
    if args.gen_prompts:
        i, layer, why = direction
        prompts = {label: [p.instruction for p in pools[f"{label}_test"][:args.gen_prompts]]
                   for label in ("harmful", "harmless")}
        generation = generation_check(model, chat, others, ours[i, layer], layer, prompts, args.gen_tokens)
        generation["direction"] = {"position": chat.positions[i], "layer": layer, "why": why}

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


def scoring_flops(model, chat, ours, val: dict, refusal_ids, ref_refusal_ids, nnsight_side, theirs, n_scored: int,
                  seconds: dict) -> dict:
    """FLOPs of candidate scoring per side: a counted base pass, then a counted run scoring only the layer-0
    candidates (FLOPs per candidate do not depend on the layer on either side); total = base + per candidate x
    candidates scored."""
    from tlrefusal.activations import last_logits
    from tlrefusal.selection import SelectionConfig, score_candidates

    one_layer = SelectionConfig(prune_layer_fraction=1.0 - 1.5 / model.n_layers)  # keeps layer 0 only
    runs = {
        "tlrefusal": (lambda: last_logits(model, chat, val["harmless"]),
                      lambda: score_candidates(model, chat, ours, val["harmful"], val["harmless"], refusal_ids,
                                               one_layer)),
        "nnsight": (lambda: nnsight_side.last_logits(val["harmless"]),
                    lambda: nnsight_side.score_candidates(theirs, val["harmful"], val["harmless"], ref_refusal_ids,
                                                          1)),
    }
    out = {}
    for name, (base_run, first_layer_run) in runs.items():
        base, first_layer = counted(base_run)[1], counted(first_layer_run)[1]
        per_candidate = (first_layer - base) / len(chat.positions)
        total = base + n_scored * per_candidate
        out[name] = {"gflops_per_candidate": per_candidate / 1e9, "gflops": total / 1e9,
                     "gflops_per_second": total / 1e9 / seconds[name]}
    return out


def generation_direction(chat, scores, chosen, n_layers: int, prune: float) -> tuple[int, int, str]:
    """(position index, layer, why) of the direction to generate under: the paper's choice; else the one
    chosen with the demo's relaxed KL filter; else the lowest bypass score among the scored candidates."""
    from tlrefusal.demo_job import DEMO_KL_THRESHOLD
    from tlrefusal.selection import SelectionConfig, choose

    why = "chosen by the paper's filters"
    if chosen is None:
        relaxed = SelectionConfig(prune_layer_fraction=prune, kl_threshold=DEMO_KL_THRESHOLD)
        chosen = choose(scores, n_layers, relaxed).chosen
        why = f"none survives the paper's filters; chosen with KL <= {DEMO_KL_THRESHOLD}"
    if chosen is None:
        chosen = min((s for s in scores if not math.isnan(s.bypass_score)), key=lambda s: s.bypass_score)
        why = "none survives any filter; the lowest bypass score"
    return chat.positions.index(chosen.position), chosen.layer, why


def _reference_setup(intervention, r: torch.Tensor, layer: int) -> dict:
    """A row of the intervention table as the reference sides take it: (ablate, add, layer, coeff) keywords.

    The coefficient comes from the row, so that `tlrefusal.interventions.intervention_table` stays the one
    place the signs are set."""
    if intervention.kind == "ablation":
        return {"ablate": r}
    if intervention.kind == "actadd":
        return {"add": r, "layer": layer, "coeff": intervention.coeff}
    return {}


def _tlrefusal_generate(model, chat, prompts, n_tokens, hooks, batch_size=32):
    """tlrefusal's side: its greedy generation (`tlrefusal.generation.greedy_tokens`) under the row's hooks,
    forced to `n_tokens` new tokens (no stop tokens)."""
    from tlrefusal.generation import greedy_tokens

    return greedy_tokens(model, chat, prompts, n_tokens, hooks, batch_size=batch_size)


def _first_difference(ours: list[int], theirs: list[int]) -> int:
    return next((j for j, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))


def generation_check(model, chat, others, r, layer: int, prompts: dict, n_tokens: int) -> dict:
    """Greedy completions under each row of the intervention table by every side: speed, refusal, and
    identical completions.

    Every side generates exactly `n_tokens` per prompt (no early stop), so tokens/s compare; replies are
    cut at the first stop token (EOS or the template's end of turn) before they are compared or judged.
    A completion that differs from tlrefusal's is explained by the logit gap between the two most likely
    tokens where they part (plain PyTorch, same intervention): a near-tie is float rounding between
    frameworks, a large gap would be a bug.
    """
    from reference_steps import is_refusal

    from tlrefusal.generation import until_stop
    from tlrefusal.interventions import intervention_table
    from tlrefusal.refusal import judge_replies

    table = intervention_table(r, layer, model.n_layers)  # the paper's signs: -r on harmful, +r on harmless
    stops = chat.stop_ids
    plain = next(o for o in others if o.name == "plain torch")
    sides = {"tlrefusal": lambda ps, iv: _tlrefusal_generate(model, chat, ps, n_tokens, iv.hooks)}
    sides |= {o.name: (lambda ps, iv, o=o: o.generate(ps, n_tokens, **_reference_setup(iv, r, layer)))
              for o in others}
    for run in sides.values():  # warm-up
        run(prompts["harmful"][:2], table.by_kind("harmful", "ablation"))
    report: dict = {"prompts_per_label": {k: len(v) for k, v in prompts.items()}, "new_tokens_each": n_tokens,
                    "interventions": {}}
    baseline: dict = {}
    for kind in (iv.kind for iv in table.harmful):
        rows = {label: table.by_kind(label, kind) for label in prompts}
        entry: dict = {"seconds": {}, "tokens_per_second": {}, "refusal": {}, "changed_from_baseline": {},
                       "vs_tlrefusal": {}}
        replies: dict = {name: {} for name in sides}
        for name, run in sides.items():
            started = time.perf_counter()
            for label, batch in prompts.items():
                replies[name][label] = [until_stop(t, stops) for t in run(batch, rows[label])]
            entry["seconds"][name] = time.perf_counter() - started
            entry["tokens_per_second"][name] = sum(map(len, prompts.values())) * n_tokens / entry["seconds"][name]
            texts = {label: [chat.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
                     for label, tokens in replies[name].items()}
            # Each side judges its own replies: tlrefusal with its judge, the reference sides with theirs.
            entry["refusal"][name] = {
                label: (judge_replies(prompts[label], texts[label]).rate if name == "tlrefusal"
                        else sum(map(is_refusal, texts[label])) / len(texts[label]))
                for label in texts}
            if kind == "baseline":
                baseline[name] = replies[name]
            entry["changed_from_baseline"][name] = sum(
                a != b for label in prompts for a, b in zip(replies[name][label], baseline[name][label], strict=True))
        for name in sides:
            if name == "tlrefusal":
                continue
            differ, gaps = 0, []
            for label, batch in prompts.items():
                for prompt, ours, theirs in zip(batch, replies["tlrefusal"][label], replies[name][label], strict=True):
                    if ours == theirs:
                        continue
                    differ += 1
                    k = _first_difference(ours, theirs)
                    gaps.append(plain.top2_gap(prompt, ours[:k], **_reference_setup(rows[label], r, layer)))
            entry["vs_tlrefusal"][name] = {"identical": sum(map(len, prompts.values())) - differ, "differ": differ,
                                           "top2_logit_gap_where_they_part": gaps}
        report["interventions"][kind] = entry
    tps = {name: report["interventions"]["ablation"]["tokens_per_second"][name] for name in sides}
    floor = report["interventions"]["baseline"]["tokens_per_second"]["plain torch"]  # generate, no hooks
    report["ablation_tokens_per_second_over_plain_generate"] = {name: v / floor for name, v in tps.items()}
    return report


def _gflop(entry: dict | None) -> str:
    return f", {entry['gflops']:.0f} GFLOP" if entry and "gflops" in entry else ""


def print_table(report: dict) -> None:
    """The fidelity and speed table, in Markdown."""
    e, r = report["extraction"], report["ratios"]
    cand = report["fidelity"]["candidates"]
    rows = [("mean activations, " f"{e['tlrefusal']['prompt_passes']} prompts",
             *(f"{e[n]['median_seconds']:.1f} s{_gflop(e[n])}" for n in ("tlrefusal", "nnsight", "plain torch")),
             f"{r['extraction_tlrefusal_over_nnsight']:.2f} of NNsight, {r['extraction_tlrefusal_over_plain']:.2f} "
             "of plain",
             "min cosine " + " / ".join(f"{cand[n]['min_cosine']:.6f}" for n in cand) + ", max diff "
             + " / ".join(f"{cand[n]['max_abs_diff']:.1g}" for n in cand))]
    s = report["selection"]
    if s:
        f = s["flops"] or {}
        rows.append((f"candidate scoring, {s['candidates_scored']} candidates",
                     f"{s['seconds']['tlrefusal']:.1f} s{_gflop(f.get('tlrefusal'))}",
                     f"{s['seconds']['nnsight']:.1f} s{_gflop(f.get('nnsight'))}", "",
                     f"{s['speedup_nnsight_over_tlrefusal']:.2f}x faster than NNsight",
                     "max score diff " + ", ".join(f"{k.split('_')[0]} {v:.1g}" for k, v in s["max_abs_score_diff"].items())
                     + f"; chosen {s['chosen']['tlrefusal']} / {s['chosen']['nnsight']} (same: {s['same_choice']})"))
    g = report.get("generation")
    if g:
        n = sum(g["prompts_per_label"].values())
        for name, entry in g["interventions"].items():
            tps = entry["tokens_per_second"]
            ref = entry["refusal"]
            same = ", ".join(f"{v['identical']}/{n} identical to {k}" + (
                f" (top-2 gaps where they part: {', '.join(f'{x:.2g}' for x in v['top2_logit_gap_where_they_part'])})"
                if v["differ"] else "") for k, v in entry["vs_tlrefusal"].items())
            rows.append((f"generation, {name}, {n} x {g['new_tokens_each']} tokens",
                         *(f"{tps[k]:.0f} tok/s, refusal {ref[k]['harmful']:.0%} / {ref[k]['harmless']:.0%}"
                           for k in ("tlrefusal", "nnsight", "plain torch")),
                         "" if name != "ablation" else " / ".join(
                             f"{v:.2f}" for v in g["ablation_tokens_per_second_over_plain_generate"].values())
                         + " of plain generate (tlrefusal / NNsight / plain hooks)", same))
    print("| step | tlrefusal | NNsight | plain PyTorch | ratio | fidelity |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if g:
        d = g["direction"]
        print(f"generation direction: position {d['position']}, layer {d['layer']} ({d['why']}); refusal = harmful / "
              "harmless")


if __name__ == "__main__":
    main()
