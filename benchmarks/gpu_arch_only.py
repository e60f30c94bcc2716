"""Make a CUDA package's setup.py build for one GPU architecture only (used by gpu_check.sh).

mamba-ssm and causal-conv1d list their ``-gencode arch=compute_NN,code=sm_NN`` targets in
setup.py (several architectures: a build for all of them takes far longer than the GPU check's
budget). This keeps the pairs for ``ARCH`` (e.g. ``90``) and drops the others: a line naming
another architecture and the ``"-gencode"`` line just before it become one ``pass``. A file
with no target for ``ARCH`` is left as it is, and so is one that would no longer parse.

    python benchmarks/gpu_arch_only.py path/to/setup.py 90
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ARCH_RE = re.compile(r"arch=compute_(\d+)[a-z]?,code=(?:sm|compute)_(\d+)")


def keep_arch(text: str, arch: str) -> tuple[str, int, int]:
    """(new text, targets kept, targets dropped)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    kept = dropped = 0
    for line in lines:
        match = ARCH_RE.search(line)
        if match is None:
            out.append(line)
            continue
        if match.group(1) == arch:
            kept += 1
            out.append(line)
            continue
        dropped += 1
        if out and out[-1].strip().endswith('"-gencode")'):
            out.pop()
        # A `pass` in its place keeps an `if` block that held only this target valid.
        indent = line[: len(line) - len(line.lstrip())]
        out.append(f"{indent}pass  # sm_{match.group(2)} dropped by gpu_arch_only.py\n")
    return "".join(out), kept, dropped


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: gpu_arch_only.py SETUP_PY ARCH (e.g. 90)", file=sys.stderr)
        return 2
    path, arch = Path(argv[0]), argv[1]
    text, kept, dropped = keep_arch(path.read_text(), arch)
    if kept == 0:
        print(f"{path}: no -gencode target for sm_{arch}; left unchanged (it builds its own list)")
        return 0
    try:
        compile(text, str(path), "exec")
    except SyntaxError as exc:
        print(f"{path}: the edited file would not parse ({exc}); left unchanged", file=sys.stderr)
        return 1
    path.write_text(text)
    print(f"{path}: kept {kept} sm_{arch} target(s), dropped {dropped} other(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
