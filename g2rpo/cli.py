"""How every entry point ends: a refusal as one line, anything else with its traceback.

    from g2rpo.cli import run_main
    if __name__ == "__main__":
        run_main(main)

A *refusal* is an expected error of ours that says what is wrong and how to fix it: a bad config value, a
missing or mismatched input file, an output folder that is locked or holds another run, a checkpoint that is
missing, corrupted or does not fit, a full disk, an option the machine cannot run. It ends the process with
``error: <message>`` as the last line on stderr (the message on one line) and exit code 2 -- no traceback
(``G2RPO_TRACEBACK=1`` shows it). Anything else is a bug or a crash: its full traceback, the rank that raised
it, exit code 1.

Under `g2rpo.launch` (every launcher script starts torchrun through it) a worker does not print its refusal:
it leaves it in ``$G2RPO_REFUSALS/rank<N>.txt``, and the launcher prints each distinct message once, after
torchrun's own lines, so that a job's log ends with the reason and not with one copy per rank.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, NoReturn

REFUSAL_EXIT = 2
ERROR_EXIT = 1
REFUSALS_ENV = "G2RPO_REFUSALS"
_OURS = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "scripts")


class Refusal(Exception):
    """Base of the project's own refusals that are not a ValueError or a file error (a locked folder, a refused
    evaluation, a run stopped after too many non-finite updates)."""


def one_line(message: str) -> str:
    """A multi-line message on one line: a line ending in ':' runs on into the next, the others join with '; '."""
    out = ""
    for line in (line.strip() for line in str(message).splitlines()):
        if line:
            out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def _raised_by_us(exc: BaseException) -> bool:
    """The innermost frame of ``exc``'s traceback is in the g2rpo package or the project's scripts (a ValueError
    from inside torch or diffusers is not a refusal of ours)."""
    tb = exc.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return any(path.is_relative_to(root) for root in _OURS)


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is an expected, explained error (see the module docstring) rather than a bug."""
    if isinstance(exc, Refusal):
        return True
    if isinstance(exc, OSError):
        explained = isinstance(exc, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)) \
            or exc.errno == errno.ENOSPC
        return explained and _raised_by_us(exc)
    return isinstance(exc, ValueError) and _raised_by_us(exc)


def _rank() -> tuple[int, int]:
    from g2rpo.distributed import process_rank

    return process_rank()


def report_refusal(message: str) -> None:
    """Print ``message`` as the process's last line, or hand it to the launcher (`g2rpo.launch`)."""
    message = one_line(message)
    rank, world = _rank()
    folder = os.environ.get(REFUSALS_ENV)
    if folder and Path(folder).is_dir():
        tmp = Path(folder) / f".rank{rank}.tmp"
        tmp.write_text(message + "\n")
        os.replace(tmp, Path(folder) / f"rank{rank}.txt")
        return
    print(f"error: {message}" + (f" (rank {rank})" if world > 1 else ""), file=sys.stderr, flush=True)


def _leave(code: int) -> NoReturn:
    from g2rpo.distributed import is_distributed, teardown

    sys.stdout.flush()
    sys.stderr.flush()
    if is_distributed():
        teardown(code, sync=False)
    sys.exit(code)


def run_main(main: Callable[[], object]) -> NoReturn:
    """Run an entry point's ``main()`` and end the process as the module docstring says."""
    from g2rpo.distributed import RankFailure

    try:
        main()
    except SystemExit as stop:
        if isinstance(stop.code, str):  # raise SystemExit("...") of a script: a refusal in its own words
            report_refusal(stop.code.removeprefix("error: "))
            _leave(REFUSAL_EXIT)
        _leave(stop.code if isinstance(stop.code, int) else 0)
    except RankFailure as failure:  # another rank failed and reports it; under the launcher, say nothing more
        if not os.environ.get(REFUSALS_ENV):
            rank, _ = _rank()
            print(f"stopped (rank {rank}): {one_line(str(failure))}", file=sys.stderr, flush=True)
        _leave(REFUSAL_EXIT)
    except KeyboardInterrupt:
        _leave(128 + 2)
    except BaseException as exc:  # noqa: BLE001 -- every error ends here, classified
        if is_refusal(exc) and os.environ.get("G2RPO_TRACEBACK") != "1":
            report_refusal(str(exc))
            _leave(REFUSAL_EXIT)
        rank, world = _rank()
        print(f"unexpected error on rank {rank} of {world} ({type(exc).__name__}); traceback:", file=sys.stderr)
        traceback.print_exc()
        _leave(ERROR_EXIT)
    _leave(0)
