"""The dtype names tlrefusal loads models in; light to import (no torch), so the CLI can list them in
`--help` without loading torch."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)  # auto: the checkpoint's own dtype (config.json), float32 if none
