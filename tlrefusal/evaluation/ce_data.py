"""The text CE loss is measured on (the paper's Table 9): the Pile and Alpaca, from the hub or local files.

- the Pile: the first n documents of monology/pile-uncopyrighted, streamed in order, or of a local text
  file (documents separated by blank lines) or .json/.jsonl file with a "text" field;
- Alpaca: (instruction, reference output) pairs of rows with an empty input, from tatsu-lab/alpaca
  shuffled with the seed, or from a local .json/.jsonl file in Alpaca's layout.
"""
from pathlib import Path

from tlrefusal.data import hub_rows, read_records, read_text
from tlrefusal.errors import TlrefusalError

PILE_REPO = "monology/pile-uncopyrighted"
ALPACA_REPO = "tatsu-lab/alpaca"


def alpaca_pairs(source: str, n: int, seed: int) -> list[tuple[str, str]]:
    """Up to n (instruction, output) pairs with an empty input: `source` is "alpaca" (the hub) or a file."""
    rows = hub_rows(ALPACA_REPO, "train", shuffle_seed=seed) if source == "alpaca" else read_records(Path(source))
    pairs = [(row["instruction"], row["output"]) for row in rows
             if not row.get("input") and row.get("instruction") and row.get("output")]
    if not pairs:
        raise TlrefusalError(f"{source} has no rows with an instruction, an output and no input")
    return pairs[:n]


def pile_texts(source: str, n: int) -> list[str]:
    """The first n documents: `source` is "pile" (the hub, streamed) or a local file."""
    if source == "pile":
        texts = [row["text"] for row in hub_rows(PILE_REPO, "train", first_n=n)]
    else:
        path = Path(source)
        texts = [row["text"] for row in read_records(path)] if path.suffix in (".jsonl", ".json") else \
            [t for t in read_text(path).split("\n\n") if t.strip()]
    if not texts:
        raise TlrefusalError(f"{source} has no text")
    return texts[:n]
