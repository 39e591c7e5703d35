"""torchrun, with two changes for preemptible jobs: the workers get time to checkpoint, and a stop by a
signal exits 128 + signal.

    python -m g2rpo.launch --standalone --nproc_per_node=8 -m g2rpo.train --config configs/g2rpo_hps.yaml

Every argument is torchrun's. On SIGTERM/SIGINT torchrun forwards the signal to its workers and kills
them after ``--shutdown-timeout`` seconds (torchrun's default: 30), which cuts short a FLUX.1-dev step
and its checkpoint. Unless the command line sets it, this launcher passes
``--shutdown-timeout=$G2RPO_STOP_TIMEOUT`` (default 1800 s): a stop waits for the running phase of the
step and a committed checkpoint (docs: README "Resuming and failures"). The scheduler's own grace period
(Slurm ``KillWait`` or ``--signal=TERM@<seconds>``, Kubernetes ``terminationGracePeriodSeconds``) must be
at least as long. torchrun itself exits 1 after a signal; this launcher exits 128 + the signal number,
also when only the workers were signalled and all stopped so.

A worker's refusal (`g2rpo.cli`: a bad config, a missing file, a locked folder...) reaches this launcher through
``$G2RPO_REFUSALS`` instead of the worker's stderr: the launcher prints each distinct message once, as the last
line, and exits 2 -- not once per rank, and without torchrun's ChildFailedError traceback. A worker that failed
otherwise printed its own traceback; the launcher's last line then names the rank and its exit code (exit 1).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

DEFAULT_STOP_TIMEOUT = 1800
STOP_CODES = {128 + signal.SIGTERM, 128 + signal.SIGINT}


def with_stop_timeout(argv: list[str]) -> list[str]:
    """``argv`` with ``--shutdown-timeout`` added in front unless it is already given."""
    if any(arg.split("=")[0] in ("--shutdown-timeout", "--shutdown_timeout") for arg in argv):
        return argv
    return [f"--shutdown-timeout={int(os.environ.get('G2RPO_STOP_TIMEOUT', DEFAULT_STOP_TIMEOUT))}", *argv]


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from g2rpo.cli import ERROR_EXIT, REFUSAL_EXIT, REFUSALS_ENV

    argv = with_stop_timeout(list(sys.argv[1:] if argv is None else argv))
    refusals = Path(tempfile.mkdtemp(prefix="g2rpo_refusals_"))
    os.environ[REFUSALS_ENV] = str(refusals)  # the workers inherit it
    try:
        torchrun(argv)
    except SignalException as stop:
        sys.exit(128 + int(stop.sigval))
    except ChildFailedError as failed:
        codes = {rank: failure.exitcode for rank, failure in failed.failures.items()}
        if len(set(codes.values())) == 1 and set(codes.values()) <= STOP_CODES:  # every failed worker stopped on a
            sys.exit(next(iter(codes.values())))  # signal, after its checkpoint
        files = sorted(refusals.glob("rank*.txt"), key=lambda path: int(path.stem.removeprefix("rank")))
        messages = [path.read_text().strip() for path in files]
        # a negative code is a signal; once a worker has failed, torchrun stops the others with SIGTERM: not news
        own = {rank: code for rank, code in codes.items() if code >= 0} or codes
        crashed = {rank: code for rank, code in own.items() if code != REFUSAL_EXIT}
        for rank, code in sorted(crashed.items()):
            print(f"error: rank {rank} failed with exit code {code}"
                  + (" (its traceback is above)" if code == ERROR_EXIT else " (killed or crashed)"), file=sys.stderr)
        for message in dict.fromkeys(messages):  # each distinct message once, in rank order
            print(f"error: {message}", file=sys.stderr)
        if not crashed and not messages:  # exit 2 without a refusal: a usage error, which argparse printed itself
            print(f"error: the workers stopped with exit code {REFUSAL_EXIT}: a command-line usage error, shown above",
                  file=sys.stderr)
        sys.stderr.flush()
        sys.exit(ERROR_EXIT if crashed else REFUSAL_EXIT)
    finally:
        shutil.rmtree(refusals, ignore_errors=True)


if __name__ == "__main__":
    main()
