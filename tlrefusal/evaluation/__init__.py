"""Evaluation of a model and a refusal direction under each intervention (`tlrefusal eval`).

- `config`: `EvalConfig`, what to evaluate and how;
- `sets`: the held-out prompt sets, sampled once;
- `backends`: what generates replies: the TransformerBridge (hooks) or vLLM (a checkpoint as loaded);
- `completions`: batched greedy replies per set and intervention, saved as JSONL and reused;
- `scores`: refusal score (substring) and safety score per set and intervention;
- `guard`: the Llama Guard 2 safety judge (prompt, verdict, the 15-word rule), from a local model folder;
- `loss`, `ce_data`, `ce`: CE loss over masked tokens (float64 sums), its text sources, and the per-dataset table;
- `coherence`: lm-eval benchmarks through the bridge (or lm-eval's vLLM model for a checkpoint);
- `magnitude`: the projection-magnitude study (projection ratio at the direction's layer vs refusal log-odds);
- `report`: `EvalReport` (report.json) and its markdown (report.md);
- `runner`: `run_eval`, composing the above into RUN/eval/;
- `compare`: a run's report beside another run's (ours or an NNsight replication's).
"""
