"""Prompt loading from files and hub names (on local files), and the paper's seeded sampling (SPEC 1.1)."""
import json
import random

import pytest

from tests.conftest import SPLITS
from tlrefusal import data
from tlrefusal.data import HubDataset, Prompt, load_prompts, prompts_hash, sample_splits
from tlrefusal.errors import TlrefusalError
from tlrefusal.harmless import demo_harmless_prompts


def test_json_jsonl_csv_txt(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "x1", "category": "c"}, {"goal": "x2"}, "x3"]))
    (tmp_path / "b.jsonl").write_text('{"prompt": "y1"}\n\n{"Goal": "y2", "Category": "k"}\n')
    (tmp_path / "c.csv").write_text("id,Behavior,SemanticCategory\n1,z1,chem\n2,\"z2, with comma\",bio\n")
    (tmp_path / "d.txt").write_text("w1\n\n  w2  \n")
    assert load_prompts(str(tmp_path / "a.json")) == [Prompt("x1", "c"), Prompt("x2"), Prompt("x3")]
    assert load_prompts(str(tmp_path / "b.jsonl")) == [Prompt("y1"), Prompt("y2", "k")]
    assert load_prompts(str(tmp_path / "c.csv")) == [Prompt("z1", "chem"), Prompt("z2, with comma", "bio")]
    assert load_prompts(str(tmp_path / "d.txt")) == [Prompt("w1"), Prompt("w2")]


@pytest.mark.parametrize("name,content,message", [
    ("empty.json", "[]", "holds no prompts"),
    ("empty.txt", "\n\n", "holds no prompts"),
    ("bad.json", "[{", "malformed"),
    ("obj.json", '{"a": 1}', "JSON object"),
    ("nofield.json", '[{"foo": "bar"}]', "no instruction field"),
    ("blank.json", '[{"instruction": "  "}]', "empty or non-text"),
    ("weird.yaml", "- a", "unsupported prompt file type"),
])
def test_bad_files_get_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TlrefusalError, match=message) as info:
        load_prompts(str(path))
    assert "\n" not in str(info.value)


def test_unknown_name_lists_known_datasets():
    with pytest.raises(TlrefusalError, match="known datasets: demo-harmful.*advbench"):
        load_prompts("no-such-dataset")


def test_hub_loader_on_local_files(tmp_path, monkeypatch):
    """The real hub code path (`datasets.load_dataset`, field mapping, Alpaca's empty-input rule) on a file."""
    import datasets

    rows = [{"instruction": "keep me", "input": "", "output": "o"},
            {"instruction": "drop me", "input": "has input", "output": "o"}]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    real = datasets.load_dataset
    calls = []

    def local_load(repo, config, split):
        calls.append((repo, config, split))
        return real("json", data_files=str(path), split="train")

    monkeypatch.setattr(datasets, "load_dataset", local_load)
    assert load_prompts("alpaca") == [Prompt("keep me")]
    assert calls == [("tatsu-lab/alpaca", None, "train")]
    monkeypatch.setitem(data.HUB_DATASETS, "custom", HubDataset("me/custom", split="x", field="output"))
    assert load_prompts("custom") == [Prompt("o"), Prompt("o")]


def test_hub_offline_is_a_clear_error():
    with pytest.raises(TlrefusalError, match="could not load dataset 'jailbreakbench'"):
        load_prompts("jailbreakbench")


def test_sampling_reproduces_the_papers_random_calls():
    pools = {name: load_prompts(str(SPLITS / f"{name}.json"))
             for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")}
    splits = sample_splits(pools["harmful_train"], pools["harmless_train"], 128, 32, 42,
                           pools["harmful_val"], pools["harmless_val"])
    # ORIG / REPL, written out: random.seed(42), then random.sample on each split in this order.
    raw = {name: json.loads((SPLITS / f"{name}.json").read_text()) for name in pools}
    random.seed(42)
    expected = {
        "harmful_train": random.sample(raw["harmful_train"], 128),
        "harmless_train": random.sample(raw["harmless_train"], 128),
        "harmful_val": random.sample(raw["harmful_val"], 32),
        "harmless_val": random.sample(raw["harmless_val"], 32),
    }
    for name, prompts in splits.items():
        assert [p.instruction for p in prompts] == [r["instruction"] for r in expected[name]], name


def test_single_pool_gives_disjoint_train_and_val():
    harmful = [Prompt(f"h{i}") for i in range(50)]
    harmless = [Prompt(f"s{i}") for i in range(60)]
    splits = sample_splits(harmful, harmless, 30, 20, seed=1)
    assert not {p.instruction for p in splits.harmful_train} & {p.instruction for p in splits.harmful_val}
    assert not {p.instruction for p in splits.harmless_train} & {p.instruction for p in splits.harmless_val}
    assert sample_splits(harmful, harmless, 30, 20, seed=1) == splits
    with pytest.raises(TlrefusalError, match="harmful val .* 20 prompts, fewer than the 21"):
        sample_splits(harmful, harmless, 30, 21, seed=1)


def test_demo_harmless_set_is_large_and_distinct():
    prompts = demo_harmless_prompts()
    assert len(prompts) == len(set(prompts)) == 520


def test_hash_changes_with_content():
    assert prompts_hash([Prompt("a")]) != prompts_hash([Prompt("b")])
    assert prompts_hash([Prompt("a")]) == prompts_hash([Prompt("a")])
