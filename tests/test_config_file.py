"""Config files (`--config`): the three forms, the option names they map to, unknown keys, and the NNsight
replication's eight committed config.yaml files, mapped against their text read here by hand."""
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tlrefusal.cli import app
from tlrefusal.config_file import read_config
from tlrefusal.errors import TlrefusalError

REPLICATION = Path(__file__).resolve().parents[2] / "shared" / "data" / "nnsight_runs"
runner = CliRunner()


@pytest.fixture(scope="module")
def options():
    """The CLI's own option names, as `--config` checks them."""
    import click
    import typer

    from tlrefusal.cli.common import options_by_command

    group = typer.main.get_command(app)
    with click.Context(group) as ctx:
        return options_by_command(ctx)


def test_toml_top_level_and_sections_map_to_each_commands_options(tmp_path, options):
    path = tmp_path / "c.toml"
    path.write_text('model = "organism"\nout = "runs/x"\nn-train = 64\nkl_threshold = 2.0\ndevice = "cpu"\n'
                    'batch-size = "auto"\n[eval]\nn-eval = 32\nbatch-size = 8\nmodel = "ckpt"\n'
                    '[orthogonalize]\nverify = "weights"\n')
    file = read_config(path)
    extract = file.for_command("extract", options)
    assert extract == {"model": "organism", "out_dir": "runs/x", "n_train": 64, "kl_threshold": 2.0,
                       "device": "cpu", "batch_size": "auto"}
    # The evaluation takes the shared device, but not the extraction's model, folder or batch size.
    assert file.for_command("eval", options) == {"device": "cpu", "n_eval": 32, "batch_size": 8, "model": "ckpt"}
    assert file.for_command("orthogonalize", options) == {"device": "cpu", "verify": "weights"}


@pytest.mark.parametrize("text, message", [
    ("n-trian = 3\n", "unknown setting 'n-trian'; did you mean 'n-train'?"),
    ("[eval]\nkl-threshold = 3\n", "unknown setting [eval] 'kl-threshold'"),
    ("[eval]\nn-evl = 3\n", "did you mean 'n-eval'?"),
])
def test_unknown_keys_name_the_nearest_valid_one(tmp_path, options, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(TlrefusalError, match=message.replace("[", r"\[").replace("?", r"\?")):
        read_config(path).for_command("extract", options)


def test_yaml_and_json_read_the_same(tmp_path, options):
    settings = {"n-train": 8, "eval": {"max-new-tokens": 16}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(settings))
    (tmp_path / "c.json").write_text(json.dumps(settings))
    for name in ("c.yaml", "c.json"):
        file = read_config(tmp_path / name)
        assert file.for_command("extract", options) == {"n_train": 8}
        assert file.for_command("eval", options) == {"max_new_tokens": 16}


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "bad.toml").write_text("n-train = = 3\n")
    with pytest.raises(TlrefusalError, match="cannot parse"):
        read_config(tmp_path / "bad.toml")
    with pytest.raises(TlrefusalError, match="does not exist"):
        read_config(tmp_path / "missing.yaml")
    (tmp_path / "c.ini").write_text("")
    with pytest.raises(TlrefusalError, match=r"\.toml, \.yaml"):
        read_config(tmp_path / "c.ini")


def test_a_run_record_maps_back_to_the_extract_options(options, tmp_path):
    record = {"config": {"model": "m", "dtype": "float32", "device": "cpu", "harmful": "h.json",
                         "harmless": "demo-harmless", "harmful_val": None, "harmless_val": None, "n_train": 4,
                         "n_val": 3, "seed": 7, "filter": False, "min_kept": 1, "refusal_phrases": ["I cannot"],
                         "refusal_token_ids": None,
                         "selection": {"kl_threshold": 5.0, "induce_threshold": -1.0, "prune_layer_fraction": 0.5,
                                       "batch_size": 32, "candidates_per_pass": 6},
                         "trust_remote_code": False},
              "data_sha256": {}, "model_loaded_from": "/x",
              "run": {"steps": ["extract", "eval"], "eval": {"n_eval": 3}}}
    (tmp_path / "config.json").write_text(json.dumps(record))
    file = read_config(tmp_path / "config.json")
    assert file.form == "run record"
    extract = file.for_command("extract", options)
    assert extract == {"model": "m", "dtype": "float32", "device": "cpu", "harmful": "h.json",
                       "harmless": "demo-harmless", "n_train": 4, "n_val": 3, "seed": 7, "no_filter": True,
                       "min_kept": 1, "refusal_phrases": "I cannot", "kl_threshold": 5.0, "induce_threshold": -1.0,
                       "prune_layers": 0.5, "batch_size": 32, "candidates_per_pass": 6,
                       "trust_remote_code": False}
    assert file.for_command("eval", options) == {"n_eval": 3}
    assert file.for_command("run", options) == {"model": "m", "steps": "extract,eval"}


@pytest.mark.skipif(not REPLICATION.is_dir(), reason="the replication's runs are not on this machine")
@pytest.mark.parametrize("model", sorted(p.parent.name for p in REPLICATION.glob("*/config.yaml")))
def test_the_replications_configs_load_and_map(options, model):
    path = REPLICATION / model / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    file = read_config(path)
    assert file.form == "replication"
    assert file.for_command("run", options) == {"model": raw["model-path"],
                                                "out_dir": f"{raw['save-dir']}/{raw['model-alias']}"}
    assert file.for_command("extract", options) == {"model": raw["model-path"],
                                                    "out_dir": f"{raw['save-dir']}/{raw['model-alias']}",
                                                    "n_train": raw["n-train"], "n_val": raw["n-val"],
                                                    "batch_size": raw["batch-size"]}
    names = {"jailbreakbench": "jailbreakbench", "harmbench_test": "harmbench"}
    assert file.for_command("eval", options) == {
        "n_eval": raw["n-test"], "max_new_tokens": raw["max-new-tokens"], "batch_size": raw["generation-batch-size"],
        "n_ce": raw["ce-loss-batch-size"] * raw["ce-loss-n-batches"],
        "harmful": [names[d] for d in raw["evaluation-datasets"]]}


def test_a_replication_config_with_an_unknown_key_or_dataset(tmp_path):
    (tmp_path / "a.yaml").write_text("model-path: x\nn-tset: 3\n")
    with pytest.raises(TlrefusalError, match="did you mean 'n-test'"):
        read_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("model-path: x\nevaluation-datasets: [mystery]\n")
    with pytest.raises(TlrefusalError, match="'mystery' has no tlrefusal counterpart"):
        read_config(tmp_path / "b.yaml")


def test_cli_flags_override_the_file_and_bad_files_exit_1_before_any_work(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('n-train = "many"\n')
    result = runner.invoke(app, ["extract", "organism", "--out", str(tmp_path / "run"), "--config", str(path)])
    assert result.exit_code == 2 and "--n-train" in result.output  # converted and checked as the flag is
    path.write_text("n-trian = 3\n")
    result = runner.invoke(app, ["extract", "organism", "--out", str(tmp_path / "run"), "--config", str(path)])
    assert result.exit_code == 1 and "did you mean 'n-train'" in result.output
    assert not (tmp_path / "run").exists()


def test_the_example_config_is_valid(options):
    file = read_config(Path(__file__).resolve().parents[1] / "configs" / "organism.toml")
    assert file.for_command("extract", options) == {"kl_threshold": 2.0}
    assert file.for_command("eval", options) == {"n_eval": 32, "max_new_tokens": 32, "ce": "on-distribution",
                                                 "tasks": ""}
    assert file.for_command("orthogonalize", options) == {"verify": "full"}
