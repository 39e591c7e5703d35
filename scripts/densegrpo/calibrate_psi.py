"""DenseGRPO's exploration calibration: a per-transition noise level ψ(t) for `trajectory.noise: psi`.

    torchrun --nproc_per_node=8 scripts/densegrpo/calibrate_psi.py --config configs/densegrpo_hps.yaml \
        --rounds 20 --out outputs/psi [section.field=value ...]

Before training, with the base policy: each round samples one prompt group per rank with the current ψ,
computes the dense gains of the config's rewards (their weighted sum) and moves every stochastic
transition's ψ(t) by ±ε₂ (`g2rpo.advantages.calibrate_psi`: up where the gains' signs are balanced, down
elsewhere; the counts pool the round's groups over all ranks). Choices the paper leaves open, all
options: ψ starts at the config's noise (``--init``: Flow-GRPO's η·sqrt(σ/(1−σ)) by default), one group
per rank per round, ``--rounds`` rounds. Writes ``OUT/psi.json`` (``{"psi": [...]}``, what
``dense.psi_table`` reads, plus every round's ψ and sign balance) and ``OUT/psi.png`` (ψ(t) per round and
the sign balance per t).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a densegrpo training config (models, data, sampling)")
    p.add_argument("--out", type=Path, required=True, help="folder for psi.json and psi.png")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--eps1", type=float, default=2.0, help="sign-balance threshold per group (paper: 2)")
    p.add_argument("--eps2", type=float, default=0.01, help="step of ψ per round (paper: 0.01)")
    p.add_argument("--init", choices=("flow_grpo", "dance"), default="flow_grpo", help="initial ψ: the noise schedule")
    p.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.eps2 <= 0 or args.eps1 <= 0:
        p.error(f"--rounds {args.rounds} (>= 1), --eps1 {args.eps1} and --eps2 {args.eps2} (> 0)")
    return args


def balance(gains: torch.Tensor) -> torch.Tensor:
    """``|#{ΔR > 0} − #{ΔR < 0}|`` per transition of ``gains [B, T]``."""
    return ((gains > 0).sum(dim=0) - (gains < 0).sum(dim=0)).abs()


def calibrate(argv=None) -> dict:
    """The whole calibration, callable in-process (`main` adds the process teardown); returns the table."""
    from g2rpo.advantages import calibrate_psi, dense_gains
    from g2rpo.config import TrainConfig, load_config
    from g2rpo.distributed import all_gather_object, init_distributed, print0
    from g2rpo.io import atomic_write_bytes, atomic_write_text
    from g2rpo.trainer import Trainer

    args = parse_args(argv)
    cfg = load_config(TrainConfig, args.config, [*args.overrides, f"output_dir={args.out / 'run'}", "overwrite=true",
                                                 f"trajectory.noise={args.init}", "dense.psi_table="])
    if cfg.method != "densegrpo":
        raise SystemExit(f"error: {args.config}: method={cfg.method}; the calibration needs a densegrpo config")
    info = init_distributed(None if cfg.engine.device == "auto" else cfg.engine.device)
    trainer = Trainer(cfg, info)
    try:
        method, weights = trainer.method, trainer.reward_weights
        psi = method.base_levels.clone()
        stochastic = psi > 0  # ignore_last's deterministic step stays deterministic
        initial, history = psi.tolist(), []
        for round_index in range(args.rounds):
            method.base_levels = psi
            groups = trainer.rollout(round_index)
            trainer.score(groups)
            gains = torch.cat([dense_gains((g.rewards * weights[:, None, None]).sum(0)) for g in groups])  # [B, T]
            gains = torch.cat(all_gather_object(gains))
            groups_in_round = len(groups) * info.world_size
            counts = balance(gains)
            psi = torch.where(stochastic, calibrate_psi(psi, gains, args.eps1, args.eps2, groups=groups_in_round), psi)
            history.append({"round": round_index, "psi": psi.tolist(), "balance": counts.tolist(),
                            "groups": groups_in_round})
            print0(f"round {round_index + 1}/{args.rounds}: psi " + " ".join(f"{v:.3f}" for v in psi.tolist())
                   + f"; balance {counts.tolist()} (< {args.eps1 * groups_in_round:g} grows)")
    finally:
        trainer.close()
    table = {"psi": psi.tolist(), "config": str(args.config), "eps1": args.eps1, "eps2": args.eps2, "init": args.init,
             "initial": initial, "rounds": history}
    if info.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "psi.json", json.dumps(table, indent=1) + "\n")
        atomic_write_bytes(args.out / "psi.png", plot(history))
        print0(f"wrote {args.out / 'psi.json'} (dense.psi_table) and {args.out / 'psi.png'}")
    return table


def main(argv=None) -> None:
    from g2rpo.distributed import teardown

    calibrate(argv)
    teardown(0)


def plot(history: list[dict]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for record in history[:: max(1, len(history) // 8)] + history[-1:]:
        left.plot(record["psi"], lw=1, label=f"round {record['round'] + 1}")
    left.set_xlabel("transition t (grid index)")
    left.set_title("ψ(t)")
    left.legend(fontsize=7)
    right.bar(range(len(history[-1]["balance"])), history[-1]["balance"])
    right.set_xlabel("transition t")
    right.set_title("|#gain>0 − #gain<0|, last round")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


if __name__ == "__main__":
    from g2rpo.cli import run_main

    run_main(main)
