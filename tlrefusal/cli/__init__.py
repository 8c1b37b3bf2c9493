"""The `tlrefusal` command line: each command parses flags, builds a config, calls one library function and
renders the result. `common` holds what they share; the commands live in `workflow` (`run`),
`run` (extract, show), `model` and `demo`.
"""
from tlrefusal.cli import workflow, run, model, demo  # noqa: F401,I001  (each registers its commands on `app`, in this order)
from tlrefusal.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    # Rich draws the library's progress; transformers' logging is kept to errors. huggingface_hub keeps its
    # download bars, so that a multi-GB download from the hub does not look frozen.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    app()
