"""Mutation testing (mutmut) of the modules where a silent error costs a training run.

    python -m tests.mutants [MODULE ...]          (make mutants [MODULES="schedulers loader"])

For each module, a copy of the checkout (tracked files only) gets a ``[tool.mutmut]`` section that
mutates that one file and runs only the fast tests that target it; mutmut then applies each
mutant and runs those tests, one mutant at a time, each with mutmut's time limit (15 x the
tests' own time). The table gives killed / survived / timed out / other per module and the
score (killed and timed out over all); the survivors are listed by name for ``mutmut show``
(run it in the copy, whose path is printed). Not in CI: it takes minutes per module.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module -> (file mutated, the fast tests that target it)
MODULES: dict[str, tuple[str, list[str]]] = {
    "schedulers": ("callbacks/schedulers.py", ["tests/test_schedulers.py"]),
    "positional_weighting": ("callbacks/positional_weighting.py", ["tests/test_positional_weighting.py"]),
    "batch_rampup": ("callbacks/batch_rampup.py", ["tests/test_batch_rampup.py"]),
    "loader": ("data/loader.py", ["tests/test_data_loader.py"]),
    "nonfinite_guard": ("callbacks/nonfinite_guard.py", ["tests/test_reliability.py"]),
    "integrity": ("handover/integrity.py", ["tests/test_reliability.py"]),
    "init_from": ("handover/init_from.py", ["tests/test_init_from.py"]),
}
PYTEST_ARGS = [
    "-p",
    "no:xdist",
    "-p",
    "no:timeout",
    "-p",
    "no:cacheprovider",
    "-m",
    "not slow and not gpu",
    "-q",
]


def config(path: str, tests: list[str]) -> str:
    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["callbacks", "common", "data", "handover", "models", "recipes", "eval"]\n'
        f"only_mutate = {toml_list([path])}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
        f"pytest_add_cli_args = {toml_list(PYTEST_ARGS)}\n"
        'also_copy = ["yamls", "benchmarks", "models/cpu_scan.c"]\n'
    )


def copy_checkout(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def run_module(name: str, work: Path) -> Counter:
    path, tests = MODULES[name]
    dest = work / name
    dest.mkdir(parents=True)
    copy_checkout(dest)
    pyproject = dest / "pyproject.toml"
    text = re.sub(r"^addopts = .*$", 'addopts = "-ra --strict-markers"', pyproject.read_text(), flags=re.M)
    pyproject.write_text(text + config(path, tests))
    mutmut = str(Path(sys.executable).parent / "mutmut")
    print(f"== {name}: mutating {path} against {' '.join(tests)} in {dest}", flush=True)
    subprocess.run([mutmut, "run", "--max-children", "1"], cwd=dest, stdout=subprocess.DEVNULL, check=False)
    out = subprocess.run(
        [mutmut, "results", "--all", "true"], cwd=dest, capture_output=True, text=True
    ).stdout
    counts: Counter = Counter()
    for line in out.splitlines():
        if ": " in line:
            mutant, status = line.strip().rsplit(": ", 1)
            counts[status] += 1
            if status != "killed":
                print(f"   {status}: {mutant}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("modules", nargs="*", help=f"some of {', '.join(MODULES)} (default: all)")
    parser.add_argument("--work", type=Path, help="where the copies go (default: a temporary folder, kept)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module {', '.join(unknown)}; choose among {', '.join(MODULES)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="mutants-"))
    rows = {name: run_module(name, work) for name in args.modules or MODULES}
    print(
        "\n| module | mutants | killed | timed out | survived | other | score |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for name, c in rows.items():
        total = sum(c.values())
        other = total - c["killed"] - c["timeout"] - c["survived"]
        score = (c["killed"] + c["timeout"]) / total if total else 0.0
        print(
            f"| {name} | {total} | {c['killed']} | {c['timeout']} | {c['survived']} | {other} | {score:.0%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
