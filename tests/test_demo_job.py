"""The demo job's intervention check, on a tiny model (the full job trains the organism: a benchmark)."""
import json

import torch

from tlrefusal import artifacts
from tlrefusal.demo_job import export_for_run, intervention_refusal, refusal_summary
from tlrefusal.harmless import demo_harmless_prompts
from tlrefusal.progress import NO_PROGRESS


def test_intervention_refusal_uses_held_out_prompts_and_every_intervention(tiny_dirs, tmp_path):
    used = demo_harmless_prompts()[:500]  # leave 20 harmless prompts unused
    artifacts.write_json(tmp_path / artifacts.PROMPTS,
                         {"harmless_train": [{"instruction": p, "category": None} for p in used]})
    direction = artifacts.RefusalDirection(torch.randn(32, generator=torch.Generator().manual_seed(0),
                                                       dtype=torch.float64), layer=1, position=-1, model="tiny")
    result = refusal_summary(intervention_refusal(tmp_path, tiny_dirs["llama"], direction, eval_n=30,
                                                  max_new_tokens=4, cache_dir=None, progress=NO_PROGRESS))
    assert set(result) == {"harmful", "harmless"}
    assert set(result["harmful"]) == {"baseline", "ablation", "actadd (-r)"}
    assert set(result["harmless"]) == {"baseline", "ablation", "actadd (+r)"}
    assert result["harmless"]["baseline"]["n"] == 20  # only the prompts extraction did not use
    assert result["harmful"]["baseline"]["n"] == 30
    assert result["harmless"]["baseline"]["example"]["prompt"] not in used
    for runs in result.values():
        for r in runs.values():
            assert 0.0 <= r["rate"] <= 1.0
    json.dumps(result)  # the summary is plain JSON


def test_export_for_run_writes_once_per_direction(tiny_dirs, tmp_path):
    def save_direction(seed):
        vector = torch.randn(32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        artifacts.RefusalDirection(vector, 1, -1, str(tiny_dirs["llama"])).save(tmp_path / artifacts.DIRECTION)

    save_direction(0)
    first = export_for_run(tmp_path, tiny_dirs["llama"])
    assert first.verification.passed and (tmp_path / artifacts.ORTHOGONALIZED / "config.json").is_file()
    assert export_for_run(tmp_path, tiny_dirs["llama"]) == first  # same direction: reused, not rewritten
    save_direction(1)
    second = export_for_run(tmp_path, tiny_dirs["llama"])
    assert second.direction.sha256 != first.direction.sha256
