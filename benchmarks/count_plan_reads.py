"""How often the way from a recipe to a built Trainer reads the tokenizer, the mixture and the index files.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/count_plan_reads.py

Makes a tiny corpus (one stream, train and val splits), then counts, with ``sys.setprofile``,
from ``load_train_config`` to the built Trainer of ``yamls/tiny/wsd.yaml``: calls into
``data/loader.py`` from other files, tokenizer reads (``data.tokenizer.load_tokenizer`` and
transformers' ``from_pretrained``), mixture YAML reads (``load_mixture``) and ``index.json`` reads
(``Path.read_text``). Issue 17 section 1: each input is read once on the way.
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from data.sources import SourceSpec
    from recipes import train
    from recipes.config import load_train_config
    from tests.conftest import tiny_overrides
    from tests.data_helpers import convert_sources, make_docs, make_tokenizer, write_jsonl, write_mixture

    root = Path(tempfile.mkdtemp())
    tok = make_tokenizer(root / "tok", vocab_size=300)
    docs = write_jsonl(root / "docs.jsonl", [{"text": t} for t in make_docs(200, seed=1)])
    convert_sources(root / "mds" / "docs", tok, [SourceSpec(path=str(docs))], val_fraction=0.1)
    mixture = write_mixture(
        root / "mix.yaml", {"stable": {"docs": {"local": str(root / "mds" / "docs"), "proportion": 1.0}}}
    )
    corpus = {"tokenizer": tok, "mixture": mixture, "root": root}
    overrides = [*tiny_overrides(corpus, root / "runs"), "scheduler.t_warmup=2ba", "scheduler.t_decay=0.25"]

    loader = str(ROOT / "data" / "loader.py")
    entries: Counter[str] = Counter()
    reads: Counter[str] = Counter()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or frame.f_back is None:
            return
        code, caller = frame.f_code, frame.f_back.f_code
        where = f"{Path(caller.co_filename).name}:{caller.co_name}"
        if code.co_filename == loader and caller.co_filename != loader:
            entries[code.co_name] += 1
        if code.co_name == "load_tokenizer" and code.co_filename.endswith("data/tokenizer.py"):
            reads[f"tokenizer (load_tokenizer) <- {where}"] += 1
        elif code.co_name == "from_pretrained" and "tokenization_utils_base" in code.co_filename:
            reads["tokenizer (transformers from_pretrained)"] += 1
        elif code.co_name == "load_mixture":
            reads[f"mixture YAML (load_mixture) <- {where}"] += 1
        elif code.co_name == "read_text" and str(frame.f_locals.get("self", "")).endswith("index.json"):
            reads[f"index.json (Path.read_text) <- {where}"] += 1

    sys.setprofile(profile)
    cfg = load_train_config([ROOT / "yamls" / "tiny" / "wsd.yaml"], overrides)
    trainer = train.build_trainer(train.prepare_run(cfg))
    sys.setprofile(None)
    trainer.close()
    print(f"data/loader.py entered from other files: {sum(entries.values())} {dict(entries)}")
    print("| reads | where |\n|---:|---|")
    for what, count in sorted(reads.items()):
        print(f"| {count} | {what} |")


if __name__ == "__main__":  # the converter's worker pool starts processes that import this file
    main()
