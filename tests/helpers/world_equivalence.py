"""torchrun helper for tests/test_conventions.py: each method trains the same steps on any world size.

    torchrun --nproc_per_node=2 tests/helpers/world_equivalence.py OUT_DIR '{"tiny.yaml": ["max_steps=2", ...], ...}'

Trains each config of the JSON object (one after the other, in the same processes) with its overrides into
``OUT_DIR/<config file name>`` through the real `Trainer`; the test compares each run's metrics and exported
weights with one process holding all the ranks' prompt groups.
"""

import json
import sys
from pathlib import Path

import torch

from g2rpo.config import TrainConfig, load_config
from g2rpo.distributed import init_distributed, teardown
from g2rpo.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    out, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    for name, overrides in runs.items():
        cfg = load_config(TrainConfig, ROOT / "configs" / name, [*overrides, f"output_dir={out / name}"])
        Trainer(cfg, info).fit()
    teardown(0)


if __name__ == "__main__":
    main()
