"""EMA of the trained weights (g2rpo.ema): the average against one computed by hand from the weights after every
update, its export, the held-out evaluation with it, and nothing changed when it is off. (Its exact resume is
tests/test_lora.py's: the same DCP path, there for the adapters' average.)"""

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, small_trainer
from g2rpo import checkpoint
from g2rpo.config import TrainConfig, load_config
from g2rpo.ema import ema_decay

EMA = ("ema.decay=0.9", "ema.update_every=2")


def _trainer(tiny_models, tiny_embeddings, out, *overrides):
    return small_trainer(tiny_models, tiny_embeddings, out, "data.holdout=2", *overrides)  # 2 held-out prompts


def _live(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().to_local().clone() for n, p in trainer.engine.module.named_parameters()}


def _shadow(trainer) -> dict[str, torch.Tensor]:
    return {n: s.to_local().clone() for n, s in trainer.engine.ema.shadow.items()}


def test_decay_schedule_is_flow_grpos():
    assert ema_decay(1, 0.9) == pytest.approx(2 / 11) and ema_decay(5, 0.9) == pytest.approx(6 / 15)
    assert ema_decay(80, 0.9) == 0.9 and ema_decay(1, 0.9, warmup=False) == 0.9


def test_average_equals_the_hand_computed_one_and_is_exported(tiny_models, tiny_embeddings, tmp_path):
    """3 steps of 2 updates, averaged after updates s = 1, 3, 5 ((s + 1) % 2 == 0): the shadow equals the average
    computed by hand from the weights after each update; transformer_ema/ holds it; the held-out evaluation with it
    leaves the trained weights bit for bit as they were."""
    trainer = _trainer(tiny_models, tiny_embeddings, tmp_path / "run", *EMA, "max_steps=3", "checkpoint_start=2")
    expected = _live(trainer)  # the average starts at the initial weights
    after_each_update, update = [], trainer.engine.ema.update

    def recording_update():
        after_each_update.append(_live(trainer))
        update()

    trainer.engine.ema.update = recording_update
    trainer.fit()
    assert len(after_each_update) == 6 and trainer.engine.ema.updates == 6
    for s, weights in enumerate(after_each_update, start=1):
        if (s + 1) % 2 == 0:
            d = min((1 + s) / (10 + s), 0.9)
            expected = {n: e + (1 - d) * (weights[n] - e) for n, e in expected.items()}
    shadow = _shadow(trainer)
    assert all(s.to_local().device == p.to_local().device for s, p in  # ema.device: device
               zip(trainer.engine.ema.shadow.values(), trainer.engine.ema.params))
    for name, value in expected.items():
        torch.testing.assert_close(shadow[name], value, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(shadow[n], after_each_update[-1][n]) for n in shadow)  # it is not the live weights

    exported = load_file(tmp_path / "run/checkpoint-2/transformer_ema/diffusion_pytorch_model.safetensors")
    assert exported.keys() == shadow.keys() and all(torch.equal(exported[n], shadow[n]) for n in shadow)
    assert '"transformer_ema/config.json"' in (tmp_path / "run/checkpoint-2/COMMITTED").read_text()
    assert "transformer_ema" in checkpoint.verify_export(tmp_path / "run/checkpoint-2/transformer_ema")

    live = _live(trainer)
    rewards = trainer.heldout_rewards()
    assert set(rewards) == {"hps", "clip_score", "ema_hps", "ema_clip_score", "std/hps", "std/clip_score"}
    assert rewards["ema_hps"] != rewards["hps"]
    assert all(torch.equal(p, live[n]) for n, p in _live(trainer).items())
    with trainer.engine.ema.swapped_in():
        assert all(torch.equal(p, shadow[n]) for n, p in _live(trainer).items())


def test_off_by_default_and_refused_where_it_cannot_work(tiny_models, tiny_embeddings, tmp_path):
    trainer = _trainer(tiny_models, tiny_embeddings, tmp_path / "run", "max_steps=1", "checkpoint_start=0")
    assert trainer.engine.ema is None and trainer.cfg.ema.decay == 0
    trainer.fit()
    assert not (tmp_path / "run/checkpoint-0/transformer_ema").exists()
    assert set(trainer.heldout_rewards()) == {"hps", "clip_score", "std/hps", "std/clip_score"}
    with pytest.raises(ValueError, match=r"ema.decay=1.0: expected 0 \(off\) or a value in \(0, 1\)"):
        load_config(TrainConfig, ROOT / "configs/tiny.yaml", ["ema.decay=1.0"])
    with pytest.raises(ValueError, match="ema.decay=0.9 needs engine.kind=fsdp"):
        load_config(TrainConfig, ROOT / "configs/tiny.yaml", ["ema.decay=0.9", "engine.kind=deepspeed"])
