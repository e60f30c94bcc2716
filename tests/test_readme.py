"""The README's Python example runs as written."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from recipes.config import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "out" / "hf" / "model.safetensors").is_file()
    assert namespace["tokens"].shape == (1, 3 + 16)


# ---- Docs that are true: what the README, the recipes and the scripts say agrees with what runs ----

ROOT = README.parent
DOCS = [
    README,
    ROOT / "Makefile",
    *sorted((ROOT / "yamls").rglob("*.yaml")),
    *sorted((ROOT / "docs").rglob("*.md")),
]
PRE_DECAY = re.compile(r"(runs(?:/[\w.-]+)+?)/checkpoints/pre-decay/pre-decay-ba(\d+)\.pt")


@functools.cache
def load_recipe(recipe: Path) -> TrainConfig:
    """A shipped recipe's resolved config, loaded once per test session."""
    from recipes.config import load_train_config

    return load_train_config([recipe], [])


RECIPES = sorted(p for p in (ROOT / "yamls").rglob("*.yaml") if p.parent.name != "data")


def _demo_seq_len() -> int:
    """The sequence length `make demo` converts the demo streams to (the Makefile's data.convert line)."""
    lines = [line for line in (ROOT / "Makefile").read_text().splitlines() if "data.convert" in line]
    lengths = {int(m) for line in lines for m in re.findall(r"--seq-len (\d+)", line)}
    assert lengths, "no data.convert --seq-len in the Makefile"
    return min(lengths)  # the demo's (the long-document streams are longer)


def pre_decay_batch(recipe: Path, seq_len: int) -> int:
    """The batch at which a run of ``recipe`` writes its pre-decay checkpoint, from its schedule alone:
    the first batch boundary at or after the stable phase's end (callbacks/pre_decay_checkpoint.py)."""
    from types import SimpleNamespace

    from composer.core import Time, Timestamp, TimeUnit

    from callbacks import registry
    from recipes.units import Geometry, convert_schedule_times

    cfg = load_recipe(recipe)
    name, args = cfg.scheduler_args()
    assert cfg.batch_rampup is None, f"{recipe}: a batch ramp needs the planner's geometry"
    geometry = Geometry(seq_len, cfg.global_train_batch_size, None)
    args, _, problems = convert_schedule_times(name, args, cfg.max_duration, geometry)
    assert not problems, problems
    scheduler = registry.schedulers.build(name, args, where="scheduler")
    end = Time.from_timestring(cfg.max_duration)
    stable_end = scheduler.stable_end(
        SimpleNamespace(max_duration=end, timestamp=Timestamp(), dataloader_len=None)
    )
    tokens_per_batch = cfg.global_train_batch_size * seq_len
    per_batch = {
        TimeUnit.BATCH: 1,
        TimeUnit.SAMPLE: cfg.global_train_batch_size,
        TimeUnit.TOKEN: tokens_per_batch,
    }
    return -(-int(stable_end.value) // per_batch[stable_end.unit])


def recipes_writing(run_dir: str) -> list[Path]:
    """The recipes whose run folder (``run_root/run_name``) is ``run_dir``."""
    run_name = run_dir.rsplit("/", 1)[-1]
    found = []
    for recipe in RECIPES:
        named = f"run_name: {run_name}\n" in recipe.read_text()
        if named and str(load_recipe(recipe).run_dir) == run_dir:
            found.append(recipe)
    return found


def test_pre_decay_checkpoint_names_are_the_ones_the_runs_write() -> None:
    """A pre-decay checkpoint named in a doc or a recipe header is the file its run writes: the batch is
    recomputed from that run's recipe (its schedule and max_duration), not copied from any text."""
    seq_len = _demo_seq_len()
    mentions = [
        (doc, m.group(1), int(m.group(2))) for doc in DOCS for m in PRE_DECAY.finditer(doc.read_text())
    ]
    assert any(run == "runs/demo/stable" for _, run, _ in mentions), (
        "the demo's pre-decay checkpoint is named nowhere"
    )
    wrong = []
    for doc, run, batch in mentions:
        recipes = recipes_writing(run)
        assert recipes, f"{doc.relative_to(ROOT)} names {run}, which no recipe in yamls/ writes"
        expected = {pre_decay_batch(recipe, seq_len) for recipe in recipes}
        if batch not in expected:
            wrong.append(
                f"{doc.relative_to(ROOT)}: pre-decay-ba{batch}.pt of {run}, its recipe writes ba{expected}"
            )
    assert not wrong, "\n".join(wrong)


def test_pre_decay_batch_is_recomputed_from_the_schedule(tmp_path: Path) -> None:
    """The reference above against a hand computation: WSD over 270 batches decaying the last 0.2 -> 216,
    and over 100 batches with a 30-batch decay -> 70."""
    assert pre_decay_batch(ROOT / "yamls" / "tiny" / "demo.yaml", 256) == 270 - 54
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"base: {ROOT / 'yamls' / 'tiny' / 'wsd.yaml'}\nmax_duration: 100ba\n"
        "scheduler: {name: wsd, t_warmup: 10ba, t_decay: 30ba}\n"
    )
    assert pre_decay_batch(recipe, 256) == 70


def markdown_tables(text: str) -> list[tuple[int, int, list[list[str]]]]:
    """Every table as (first line, last line, rows of cells), the header row first, the rule dropped."""
    lines = text.splitlines()
    tables, start = [], None
    for i, line in enumerate([*lines, ""]):
        if line.startswith("|") and start is None:
            start = i
        elif not line.startswith("|") and start is not None:
            rows = [[c.strip() for c in row.strip().strip("|").split("|")] for row in lines[start:i]]
            tables.append((start, i - 1, [rows[0], *rows[2:]]))
            start = None
    return tables


def _number(cell: str) -> float | None:
    cell = cell.replace(",", "")
    return float(cell) if re.fullmatch(r"-?\d+(\.\d+)?", cell) else None


def count_problems(text: str) -> list[str]:
    """A table's ``total`` row against the sum of its rows, and each count the text around the table
    states for one of its columns (``32 faults injected``, ``24 recovered``) against that total."""
    lines = text.splitlines()
    problems = []
    for first, last, (header, *rows) in markdown_tables(text):
        totals = [r for r in rows if r[0].lower() == "total"]
        if not totals:
            continue
        body = [r for r in rows if r[0].lower() != "total"]
        total = {}
        for col, name in enumerate(header[1:], start=1):
            values = [_number(r[col]) for r in body]
            stated = _number(totals[0][col])
            if stated is None or None in values:
                continue
            total[name.split()[0].lower()] = stated
            if sum(values) != stated:
                problems.append(
                    f"README line {first + 1}: column '{name}' sums to {sum(values):g}, total says {stated:g}"
                )
        # The paragraphs just before and after the table.
        before = "\n".join(lines[max(0, first - 6) : first])
        after = "\n".join(lines[last + 1 : last + 8])
        for prose in (before, after):
            for count, word in re.findall(r"(\d[\d,]*) (?:faults? )?([a-z]+)", prose):
                if word in total and float(count.replace(",", "")) != total[word]:
                    problems.append(
                        f"README line {first + 1}: the text says {count} {word}, the table's total is {total[word]:g}"
                    )
    return problems


def test_counts_in_the_text_agree_with_their_tables() -> None:
    text = README.read_text()
    assert any(r[0] == "total" for _, _, (_, *rows) in markdown_tables(text) for r in rows), "no total row"
    assert count_problems(text) == []


def test_count_check_catches_a_wrong_total_and_a_wrong_sentence() -> None:
    table = "| fault | injected | recovered by rerun |\n| --- | ---: | ---: |\n| a | 2 | 1 |\n| b | 1 | 1 |\n"
    assert count_problems(table + "| total | 3 | 2 |\n\n3 faults injected, 2 recovered.\n") == []
    assert count_problems(table + "| total | 3 | 3 |\n") == [
        "README line 1: column 'recovered by rerun' sums to 2, total says 3"
    ]
    assert count_problems(table + "| total | 3 | 2 |\n\n4 faults injected.\n") == [
        "README line 1: the text says 4 injected, the table's total is 3"
    ]


REQUIREMENTS = sorted(ROOT.glob("requirements*.txt"))
SCRIPTS = [ROOT / "Makefile", *sorted((ROOT / "benchmarks").glob("*.sh")), *sorted((ROOT / ".ci").glob("*"))]
ALIASES = {"composer": "mosaicml", "streaming": "mosaicml-streaming"}  # the names the README uses
PIN = re.compile(r"(?<![\w.-])([A-Za-z][\w.-]*[A-Za-z0-9])(?:\[[\w,]+\])?==([0-9][\w.]*)")


def _canonical(name: str) -> str:
    name = re.sub(r"[-_.]+", "-", name).lower()
    return ALIASES.get(name, name)


def version_problems(requirements: dict[str, str], scripts: dict[str, str], readme: str) -> list[str]:
    """Each package version named in a script (``name==v``) or the README (``name v``) agrees with the
    requirements files; a package the requirements do not list is pinned to one version everywhere."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    specs: dict[str, list[SpecifierSet]] = {}
    for text in requirements.values():
        for line in text.splitlines():
            line = line.split("#")[0].strip()
            m = re.match(r"([A-Za-z][\w.-]*)(?:\[[\w,]+\])?\s*([<>=!~].*)?$", line)
            if m:
                specs.setdefault(_canonical(m.group(1)), []).append(SpecifierSet(m.group(2) or ""))
    named: dict[str, dict[str, set[str]]] = {}  # package -> version -> where
    for where, text in scripts.items():
        for name, version in PIN.findall(text):
            named.setdefault(_canonical(name), {}).setdefault(version, set()).add(where)
    words = "|".join(re.escape(n) for n in sorted({*specs, *ALIASES}, key=len, reverse=True))
    for name, version in re.findall(rf"(?<![\w/.-])({words}) (\d+\.\d+(?:\.\w+)*)", readme, flags=re.I):
        named.setdefault(_canonical(name), {}).setdefault(version, set()).add("README.md")
    problems = []
    for name, versions in sorted(named.items()):
        if name in specs:
            for version, where in sorted(versions.items()):
                try:
                    # "Composer 0.32" names the series of the pinned 0.32.1
                    ok = any(
                        Version(version) in spec
                        or any(s.operator == "==" and s.version.startswith(version + ".") for s in spec)
                        for spec in specs[name]
                    )
                except InvalidVersion:
                    ok = False
                if not ok:
                    allowed = " or ".join(str(s) for s in specs[name])
                    problems.append(
                        f"{name} {version} ({', '.join(sorted(where))}): the requirements say {allowed}"
                    )
        elif len(versions) > 1:
            listed = "; ".join(f"{v} in {', '.join(sorted(w))}" for v, w in sorted(versions.items()))
            problems.append(f"{name} is named with {len(versions)} versions: {listed}")
    return problems


def test_each_version_is_named_once() -> None:
    requirements = {p.name: p.read_text() for p in REQUIREMENTS}
    scripts = {str(p.relative_to(ROOT)): p.read_text() for p in SCRIPTS if p.is_file()}
    assert "mamba-ssm==2.3.1" in requirements["requirements-gpu.txt"]
    assert version_problems(requirements, scripts, README.read_text()) == []


def test_version_check_catches_two_values() -> None:
    requirements = {"requirements-gpu.txt": "mamba-ssm==2.3.1\ntorch>=2.6,<2.7.1\n"}
    assert version_problems(requirements, {"gpu.sh": "pip install mamba-ssm==2.3.1"}, "torch 2.7.0") == []
    assert version_problems(requirements, {"gpu.sh": "pip install mamba-ssm==2.3.2"}, "") == [
        "mamba-ssm 2.3.2 (gpu.sh): the requirements say ==2.3.1"
    ]
    assert version_problems({"r.txt": "mosaicml==0.32.1"}, {}, "Composer 0.32 and Composer 0.32.1") == []
    assert version_problems(requirements, {}, "Composer pins torch 2.7.1") == [
        "torch 2.7.1 (README.md): the requirements say <2.7.1,>=2.6"
    ]
    assert version_problems({}, {"Makefile": "einops==0.8.2", "gpu.sh": "einops==0.8.1"}, "") == [
        "einops is named with 2 versions: 0.8.1 in gpu.sh; 0.8.2 in Makefile"
    ]


COMMANDS = ("python", "python3", "composer", "torchrun", "pytest", "huggingface-cli", "ruff")


def bare_commands(text: str) -> list[str]:
    """Commands that call a program of .venv without its path: at the start of a line of a ```bash
    block (after environment assignments), and inline code that starts with one."""
    names = "|".join(re.escape(c) for c in COMMANDS)
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        found += [line for line in block.splitlines() if re.match(rf"(?:[A-Z_]+=\S+ )*(?:{names}) ", line)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += re.findall(rf"`(?:{names}) [^`]*`", prose)
    return found


def test_readme_commands_call_the_venv_by_path() -> None:
    """The README says once that its commands call .venv's programs by path; each one does."""
    text = README.read_text()
    assert "calls the programs of `.venv` by\npath" in text
    assert bare_commands(text) == []
    assert bare_commands("```bash\nFOO=1 python -m x\n.venv/bin/python -m y\n```\nrun `composer -n 2 a`") == [
        "FOO=1 python -m x",
        "`composer -n 2 a`",
    ]


def documented_outputs() -> set[str]:
    """What the documented commands create: ``--out`` / ``--local-dir`` / ``OUT=`` arguments in the
    README, the Makefile (its variables expanded) and the recipe headers, and every recipe's run folder."""
    texts = [README.read_text(), *(p.read_text() for p in (ROOT / "yamls").rglob("*.yaml"))]
    makefile = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) [:?]?= (\S+)$", makefile, flags=re.M))
    texts.append(re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), makefile))
    outputs = {
        path.rstrip("/")
        for text in texts
        for path in re.findall(r"(?:--out|--local-dir|\bOUT=)[ ]?([\w./{}$()-]*[\w/])", text)
    }
    return outputs | {str(load_recipe(recipe).run_dir) for recipe in RECIPES}


@pytest.mark.parametrize("key", ["tokenizer", "init_from.path"])
def test_files_the_recipes_read_are_made_by_a_documented_command(key: str) -> None:
    """Each local path a recipe reads its tokenizer or starting weights from is in the repository or is
    written by a command the README, the Makefile or a recipe header gives (e.g. ``--out``), unless the
    recipe's header launches it with that key set (``init_from.path=DIR_OF_A_TINY_BAMBA``)."""
    outputs = documented_outputs()
    missing = []
    for recipe in RECIPES:
        cfg = load_recipe(recipe)
        value = cfg.tokenizer if key == "tokenizer" else (cfg.init_from.path if cfg.init_from else None)
        header = [line for line in recipe.read_text().splitlines() if line.startswith("#")]
        if any(f" {key}=" in line for line in header):
            continue
        if value and "://" not in value and not (ROOT / value).exists() and value not in outputs:
            missing.append(f"{recipe.relative_to(ROOT)}: {key}={value}")
    assert not missing, "made by no documented command:\n" + "\n".join(missing)
