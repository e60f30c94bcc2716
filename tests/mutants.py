"""Mutation testing (mutmut) of the modules where a silent error costs a training run.

    python -m tests.mutants [MODULE ...]          (make mutants [MODULES="schedulers loader"])

For each module, a copy of the checkout (tracked files only) gets a ``[tool.mutmut]`` section that
mutates that one file and runs only the fast tests that target it; mutmut then applies each
mutant and runs those tests, one mutant at a time, each with mutmut's time limit (15 x the
tests' own time), the tests that cover the mutated function, fastest first (a mutant a quick test kills
does not wait for the slow ones: mutmut stops at the first failure). The table gives killed / survived / timed out / other per module and the
score (killed and timed out over all); the survivors are listed by name for ``mutmut show``
(run it in the copy, whose path is printed). Not in CI: it takes minutes per module.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    """One module under mutation: the file, the fast tests that target it, and optionally which of
    its functions are mutated (``name`` or ``Class.method``; ``Class.*`` for every method)."""

    path: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()  # () = every function of the file


# The modules where a silent error costs a training run. Edit the paths here when files move
# (e.g. into handover/); a test selection may name single tests (file::test).
MODULES: dict[str, Target] = {
    "schedulers": Target(
        "callbacks/schedulers.py", ("tests/test_schedulers.py", "tests/test_schedulers_edges.py")
    ),
    "positional_weighting": Target(
        "callbacks/positional_weighting.py",
        ("tests/test_positional_weighting.py", "tests/test_positional_weighting_edges.py"),
    ),
    "batch_rampup": Target(
        "callbacks/batch_rampup.py", ("tests/test_batch_rampup.py", "tests/test_batch_rampup_edges.py")
    ),
    # The sample accounting: what a sample holds, its position ids, and the resumption state.
    "loader": Target(
        "data/loader.py",
        ("tests/test_loader_accounting_edges.py", "tests/test_data_loader.py"),
        (
            "make_example",
            "mix_id",
            "PackedTokenDataset.get_item",
            "PackedTokenDataset.state_dict",
            "PackedTokenDataset.load_state_dict",
        ),
    ),
    "nonfinite_guard": Target(
        "callbacks/nonfinite_guard.py",
        (
            "tests/test_reliability.py::test_a_nan_stops_the_run_before_the_step_and_before_any_checkpoint",
            "tests/test_reliability.py::test_with_rollback_a_nan_batch_is_rolled_back_and_no_weight_goes_non_finite",
            "tests/test_nonfinite_guard_edges.py",
        ),
    ),
    # Whole-or-absent writes and the local recovery (the object-store recovery runs against moto's
    # server, minutes per mutant: tests/test_object_store_recovery.py).
    "checkpoint_safety": Target(
        "handover/integrity.py",
        (
            *(
                f"tests/test_reliability.py::{test}"
                for test in (
                    "test_an_interrupted_monolithic_write_leaves_nothing",
                    "test_a_written_checkpoint_appears_whole_under_its_name",
                    "test_a_broken_monolithic_checkpoint_is_named",
                    "test_a_flipped_byte_fails_the_crc",
                    "test_a_sharded_checkpoint_is_whole_only_with_its_metadata_and_every_byte",
                    "test_recovery_sets_broken_ones_aside_and_points_latest_at_the_newest_good",
                )
            ),
            "tests/test_integrity_edges.py",
        ),
        (
            "install_atomic_checkpoint_writes",
            "_step",
            "_candidates",
            "_quarantine",
            "remove_interrupted_writes",
            "recover_checkpoint_folder",
        ),
    ),
    # The weight selection and its checks (not the run-time loading, covered by the slow runs).
    "init_from": Target(
        "handover/init_from.py",
        (
            *(
                f"tests/test_init_from.py::{test}"  # its selection tests; the training runs take minutes
                for test in (
                    "test_inherit_first_half_is_bit_for_bit",
                    "test_listed_blocks_renumber_attention_layers",
                    "test_wrong_attention_positions_are_named",
                    "test_vocabulary_mismatch_names_parameter_shapes_and_fix",
                    "test_tokenizer_larger_than_the_checkpoint_vocabulary_is_refused",
                    "test_settings_that_change_the_numbers_must_match",
                    "test_rotary_setting_is_checked_though_shapes_agree",
                )
            ),
            "tests/test_init_from_edges.py",
            "tests/test_init_from_messages.py",
        ),
        (
            "InitFromConfig.*",
            "parse_rewarmup",
            "inherited_config",
            "_setting_differences",
            "select_weights",
        ),
    ),
}

PYTEST_ARGS = [
    "-p",
    "tests.mutants",  # pytest_collection_modifyitems below: fastest tests first
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


def pytest_collection_modifyitems(items: list) -> None:
    """Under ``mutmut run`` (this module is a pytest plugin there, ``-p tests.mutants``): the tests in
    order of their durations in mutmut's stats (in the working folder, ``mutants/``), fastest first."""
    stats = Path("mutmut-stats.json")
    if stats.is_file():
        durations = json.loads(stats.read_text())["duration_by_test"]
        items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


def config(target: Target) -> str:
    def toml_list(items: list[str] | tuple[str, ...]) -> str:
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["callbacks", "common", "data", "models", "recipes", "eval", "handover"]\n'
        f"only_mutate = {toml_list([target.path])}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(target.tests)}\n"
        f"pytest_add_cli_args = {toml_list(PYTEST_ARGS)}\n"
        'also_copy = ["yamls", "benchmarks", "models/cpu_scan.c"]\n'
    )


def mutant_patterns(target: Target) -> list[str]:
    """mutmut's mutant names for ``target.functions`` (``pkg.mod.x_func__mutmut_3``,
    ``pkg.mod.xǁClassǁmethod__mutmut_3``), as fnmatch patterns; [] = every mutant of the file."""
    module = target.path.removesuffix(".py").replace("/", ".")
    patterns = []
    for function in target.functions:
        cls, _, method = function.rpartition(".")
        patterns.append(f"{module}.xǁ{cls}ǁ{method}__mutmut_*" if cls else f"{module}.x_{function}__mutmut_*")
    return patterns


def copy_checkout(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def run_module(name: str, work: Path) -> Counter:
    target = MODULES[name]
    dest = work / name
    dest.mkdir(parents=True)
    copy_checkout(dest)
    pyproject = dest / "pyproject.toml"
    # Not --strict-markers: with pytest-timeout off, conftest's timeout marker on slow tests is unknown.
    text = re.sub(r"^addopts = .*$", 'addopts = "-ra"', pyproject.read_text(), flags=re.M)
    pyproject.write_text(text + config(target))
    # python -m mutmut, not the venv's mutmut script: a venv moved or shared between checkouts keeps
    # a stale interpreter path in that script's first line.
    mutmut = [sys.executable, "-m", "mutmut"]
    patterns = mutant_patterns(target)
    only = f" (functions {', '.join(target.functions)})" if target.functions else ""
    print(f"== {name}: mutating {target.path}{only} against {' '.join(target.tests)} in {dest}", flush=True)
    # One OpenMP thread: mutmut forks a child per mutant, and a child forked while torch's OpenMP pool
    # is up waits forever on that pool's lock (every mutant would then "time out").
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(
        [*mutmut, "run", "--max-children", "1", *patterns], cwd=dest, stdout=subprocess.DEVNULL, env=env
    )
    out = subprocess.run(
        [*mutmut, "results", "--all", "true"], cwd=dest, capture_output=True, text=True, check=True
    ).stdout
    counts: Counter = Counter()
    for line in out.splitlines():
        if ": " not in line:
            continue
        mutant, status = line.strip().rsplit(": ", 1)
        if patterns and not any(fnmatch.fnmatchcase(mutant, p) for p in patterns):
            continue
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
