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
"""

from __future__ import annotations

import os
import signal
import sys

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

    argv = with_stop_timeout(list(sys.argv[1:] if argv is None else argv))
    try:
        torchrun(argv)
    except SignalException as stop:
        sys.exit(128 + int(stop.sigval))
    except ChildFailedError as failed:
        codes = {failure.exitcode for failure in failed.failures.values()}
        if len(codes) == 1 and codes <= STOP_CODES:  # every failed worker stopped on a signal, after its checkpoint
            sys.exit(codes.pop())
        raise


if __name__ == "__main__":
    main()
