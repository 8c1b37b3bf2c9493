"""Where the benchmarks find the paper's data folder: the `--paper-data DIR` flag, else $TLREFUSAL_PAPER_DATA.

The folder is the paper's data as the original code publishes it: `datasets/splits/` holds the
harmful/harmless train, val and test splits (JSON lists of {"instruction", "category"}). The benchmarks
read it where it is and never copy it; nothing in the repository computes where it lives.
"""
import argparse
import os
from pathlib import Path

ENV = "TLREFUSAL_PAPER_DATA"
SPLITS = Path("datasets") / "splits"


def add_paper_data_flag(parser: argparse.ArgumentParser) -> None:
    """Add `--paper-data DIR` to a benchmark's parser (resolve it with `paper_data_dir`)."""
    parser.add_argument("--paper-data", metavar="DIR", default=None,
                        help=f"the paper's data folder (it holds {SPLITS}/); default: ${ENV}")


def paper_data_dir(arg: str | None) -> Path:
    """The `--paper-data` flag, else $TLREFUSAL_PAPER_DATA; a one-line error (SystemExit) if neither names a
    folder holding `datasets/splits/`."""
    value = arg or os.environ.get(ENV)
    if not value:
        raise SystemExit(f"error: this benchmark needs the paper's data folder (holding {SPLITS}/): "
                         f"pass --paper-data DIR or set {ENV}")
    folder = Path(value).expanduser()
    if not (folder / SPLITS).is_dir():
        origin = "--paper-data" if arg else f"${ENV}"
        raise SystemExit(f"error: {origin} is {folder}, which has no {SPLITS}/ folder: pass the paper's data folder")
    return folder


def splits_dir(arg: str | None) -> Path:
    """The paper's splits folder inside `paper_data_dir(arg)`."""
    return paper_data_dir(arg) / SPLITS
