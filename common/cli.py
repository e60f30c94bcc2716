"""How every command-line entry point of this repository behaves.

- ``--help`` explains every option and shows its default (``parser()`` below).
- A user mistake (a ``UserError``, a ``ValueError`` from a config check, a missing or existing
  file) prints one message, ``error: <what, where, the fix>``, and exits with status 2;
  ``--debug`` shows the traceback instead. A safety stop (``RunStopped``: a NaN in training, a
  corrupt shard) prints ``stopped: <why, the fix>`` and exits with status 3. Anything else is a
  bug and keeps its traceback.
- Damaged files are faults, wrong files are mistakes. A file whose bytes are not what was
  written (a checkpoint failing its CRC-32 check, a truncated or empty checkpoint, a sharded
  checkpoint missing a shard, a source cut inside its compressed stream) stops the command
  with status 3 (``RunStopped``: ``CorruptCheckpoint``, ``DamagedSource``), naming the file: the
  command was right, the file went bad (an interrupted write, a partial download, a failing
  disk), and the fix is another copy. A path that does not exist, or a file that is no
  checkpoint at all (a text file given as one), is a mistake: status 2. Every reader of a
  checkpoint goes through ``handover.reader.verify``, and every reader of a source
  through ``data.sources.iter_documents``, so the rule holds in every command.
- Everything the command line can check is checked before anything is written, and nothing
  half-written is left behind (outputs go to a temporary name, then are renamed; output paths
  are checked first with ``common.io.check_output_path``).

    def main(argv=None):
        args = cli.parser("python -m data.convert", __doc__).parse_args(argv)
        ...

    if __name__ == "__main__":
        cli.run(main)
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import torch

USAGE_ERROR = 2  # the exit status of a user mistake (argparse's own, too)
STOPPED = 3  # the exit status of a run that a safety check stopped


class UserError(Exception):
    """A mistake the user can fix; the message names what is wrong, where, and the fix."""


class RunStopped(RuntimeError):
    """A safety check stopped the work before it could do harm; the message says why and what to do."""


# What a user can cause by what they type: bad values, missing or existing paths.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends each option's default to its help.

    Flags (off unless given) and options whose help already speaks of the default are left as written.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.nargs == 0 or "default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse's own mistakes (a missing option, ``--chats abc``) as one ``error:`` line, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(USAGE_ERROR)


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the module docstring as description, defaults shown, and ``--debug``."""
    p = _Parser(prog=prog, description=doc, formatter_class=_HelpFormatter)
    p.add_argument(
        "--debug",
        action="store_true",
        help="on an error, show the full traceback instead of a one-line message",
    )
    return p


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> NoReturn:
    """Call ``main(argv)``; exit 0, or 2 with one line for a user mistake (traceback with ``--debug``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        main(args)
    except RunStopped as exc:
        if "--debug" in args:
            raise
        print(f"stopped: {exc}", file=sys.stderr)
        sys.exit(STOPPED)
    except USER_ERRORS as exc:
        if "--debug" in args:
            raise
        message = str(exc) or type(exc).__name__
        print(f"error: {message}\n(run again with --debug for the traceback)", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or "--debug" in args:
            raise
        print(
            f"stopped: {exc}. Nothing half-written was kept: free some space (or write elsewhere) and run "
            "the same command again",
            file=sys.stderr,
        )
        sys.exit(STOPPED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)


def resolve_device(name: str) -> torch.device:
    """``--device auto|cpu|cuda`` of the evaluation commands: auto takes the GPU when one is visible."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} must be auto, cpu or cuda")
    return torch.device(name)
