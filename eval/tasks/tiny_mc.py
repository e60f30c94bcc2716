"""The items of the tiny local lm-eval task, read from the JSON Lines file beside this one.

lm-eval calls ``load`` through the task YAML's ``custom_dataset: !function tiny_mc.load``, with
the task's metadata as keyword arguments; the path is resolved from this file, not from the
working directory, and nothing touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ITEMS = Path(__file__).with_name("tiny_mc.jsonl")


def load(**_metadata: Any) -> Any:
    """{"test": Dataset} of {question, choices, answer} rows."""
    import datasets

    rows = [json.loads(line) for line in ITEMS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
