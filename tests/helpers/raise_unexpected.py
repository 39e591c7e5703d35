"""A worker with a bug, for tests/test_refusals.py: under `g2rpo.launch` rank 1 raises an unexpected error (one that
is no refusal), rank 0 ends cleanly; the error must keep its traceback and name its rank.

    python -m g2rpo.launch --standalone --nproc_per_node=2 tests/helpers/raise_unexpected.py
"""

from g2rpo.cli import run_main
from g2rpo.distributed import process_rank


def main() -> None:
    rank, _ = process_rank()
    if rank == 1:
        {}["no such key"]  # a KeyError: a bug, not an explained refusal


if __name__ == "__main__":
    run_main(main)
