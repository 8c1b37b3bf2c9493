"""Evaluation of a model and a refusal direction under each intervention (SPEC 1.8-1.12).

- `completions`: batched greedy replies per dataset and intervention, saved as JSONL and reused;
- `guard`: the Llama Guard 2 safety score (prompt, verdict, the 15-word rule), from a local model folder;
- `loss`: CE loss over masked tokens (the Pile, Alpaca replies, the model's own replies), float64 sums;
- `magnitude`: the projection-magnitude study (projection ratio at the chosen layer vs refusal log-odds);
- `runner`: `tlrefusal eval RUN`: composes the above into RUN/eval/report.json and report.md.
"""
