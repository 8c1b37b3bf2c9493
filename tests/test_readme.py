"""The README's Python example runs as written, on the demo model (a fast run folder made first)."""
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tlrefusal.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.demo


def readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 1, "the README has one Python example"
    return blocks[0]


def test_readme_example_is_short_and_uses_only_the_public_api():
    import tlrefusal

    code = readme_python()
    assert len(code.strip().splitlines()) <= 15
    used = set(re.findall(r"\btl\.(\w+)", code))
    assert used and used <= set(tlrefusal.__all__), used - set(tlrefusal.__all__)


def test_readme_example_runs_on_the_demo_model(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # A run folder like `tlrefusal extract organism --out runs/organism` writes, made fast: the demo base
    # model, few prompts, two scored layers and filters that keep any candidate.
    args = ["extract", str(demo_dir), "--out", "runs/organism", "--n-train", "8", "--n-val", "4", "--no-filter",
            "--prune-layers", "0.9", "--kl-threshold", "1e9", "--induce-threshold", "-1e9"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    exec(compile(readme_python(), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == ["baseline", "ablation", "actadd (-r)"]
    assert all("% refuse" in line for line in printed)
    assert (tmp_path / "runs" / "organism-orthogonalized" / "config.json").is_file()
