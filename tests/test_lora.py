"""LoRA (g2rpo.lora) through the one Trainer: only the adapters train, the model starts as the base, the KL
reference is the base with the adapters disabled, the exports (diffusers' LoRA file, the merged transformer)
give the adapter model's outputs, and a resumed run is bit for bit the uninterrupted one."""

import shutil

import pytest
import torch

from conftest import ROOT, small_trainer as _trainer
from g2rpo.config import TrainConfig, load_config
from g2rpo.models import load_transformer
from g2rpo.models.flux import load_flux_pipeline

LORA = ("lora.rank=4", "lora.alpha=8")


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens, dim = 16, model.config.in_channels
    return dict(hidden_states=torch.randn(1, tokens, dim, generator=g),
                encoder_hidden_states=torch.randn(1, 8, model.config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.6]), guidance=torch.tensor([3.5]), img_ids=torch.rand(tokens, 3, generator=g),
                txt_ids=torch.zeros(8, 3), return_dict=False)


@torch.no_grad()
def _forward(model, seed=0):
    return model(**_inputs(model, seed))[0]


def _local(trainer) -> dict[str, torch.Tensor]:
    for unit in trainer.engine.units:  # a forward outside the trainer leaves the root unsharded
        unit.reshard()
    return {n: p.detach().to_local().clone() for n, p in trainer.engine.module.named_parameters()}


def test_only_the_adapters_train_and_the_exports_are_the_adapter_model(tiny_models, tiny_embeddings, tmp_path):
    base = load_transformer(tiny_models.base.path, subfolder="transformer").eval()
    trainer = _trainer(tiny_models, tiny_embeddings, tmp_path / "run", *LORA, "max_steps=2", "checkpoint_start=1",
                       "lora.export_merged=true", "ppo.kl_beta=0.04", "sampling.branch_steps=[0]")
    module = trainer.engine.module
    trained = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert not hasattr(trainer.engine, "reference")  # no second model: the reference is the adapters disabled
    initial = _forward(module)
    torch.testing.assert_close(initial, _forward(base), atol=1e-6, rtol=1e-5)  # B = 0: the base (FSDP's kernels)
    before = _local(trainer)
    first = trainer.train_step(0)
    assert first["kl_ref"] == 0.0  # the one update of step 0 starts at the reference
    trainer.state.step = 1
    second = trainer.train_step(1)
    assert second["kl_ref"] > 0
    after = _local(trainer)
    assert {n for n in before if not torch.equal(before[n], after[n])} == set(trained)  # the base never moves
    with trainer.engine.reference_policy() as reference:  # the adapters disabled: the start, bit for bit
        assert torch.equal(_forward(reference), initial)
    assert all(p.requires_grad for n, p in module.named_parameters() if n in trained)  # still training afterwards
    adapted = _forward(module)
    assert (adapted - _forward(base)).abs().max() > 1e-4  # the adapters do something

    trainer.save_checkpoint(1)
    folder = tmp_path / "run/checkpoint-1"
    merged = load_transformer(folder / "transformer").eval()
    torch.testing.assert_close(_forward(merged), adapted, atol=1e-5, rtol=1e-5)
    pipe = load_flux_pipeline(tiny_models.base.path, lora_path=folder / "lora")  # diffusers' own LoRA loader
    torch.testing.assert_close(_forward(pipe.transformer), adapted, atol=1e-5, rtol=1e-5)
    state_bytes = sum(p.stat().st_size for p in (folder / "state").rglob("*") if p.is_file())
    assert state_bytes < 4 * sum(p.numel() for p in base.parameters())  # adapters + AdamW only, not the base


def test_resume_is_bit_identical_with_its_average(tiny_models, tiny_embeddings, tmp_path):
    """LoRA + EMA, resumed from checkpoint-1 in a new folder: the adapters, the base and the EMA are bit for bit those
    of the uninterrupted run."""
    common = (*LORA, "max_steps=3", "checkpoint_start=1", "checkpoint_every=1", "ema.decay=0.9")
    straight = _trainer(tiny_models, tiny_embeddings, tmp_path / "a", *common)
    straight.fit()
    shutil.copytree(tmp_path / "a/checkpoint-1", tmp_path / "b/checkpoint-1")
    resumed = _trainer(tiny_models, tiny_embeddings, tmp_path / "b", *common, "resume=auto")
    resumed.fit()
    expected, got = _local(straight), _local(resumed)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    ema = {n: s.to_local() for n, s in straight.engine.ema.shadow.items()}
    assert ema.keys() == {n for n, p in straight.engine.module.named_parameters() if p.requires_grad}
    assert all(torch.equal(s.to_local(), ema[n]) for n, s in resumed.engine.ema.shadow.items())
    assert (tmp_path / "b/checkpoint-2/lora_ema/pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "b/checkpoint-2/transformer").exists()  # no merged export unless asked


def test_lora_config_errors(tiny_models, tiny_embeddings, tmp_path):
    with pytest.raises(ValueError, match="lora.rank=4 needs engine.kind=fsdp"):
        load_config(TrainConfig, ROOT / "configs/tiny.yaml", [*LORA, "engine.kind=deepspeed"])
    with pytest.raises(ValueError, match="lora.rank=-1: must be >= 0"):
        load_config(TrainConfig, ROOT / "configs/tiny.yaml", ["lora.rank=-1"])
    with pytest.raises(ValueError, match=r"lora.target_modules=\['attn.to_qkv'\]: no layer of the FLUX transformer "
                                         r"matched"):
        _trainer(tiny_models, tiny_embeddings, tmp_path / "run", *LORA, "lora.target_modules=[attn.to_qkv]")


def test_resume_rules_of_the_new_options(tmp_path):
    """A checkpoint written before lora / ema existed resumes (absent = default); with LoRA (or a KL reference)
    the base pipeline may not change on resume, since the checkpoint holds no base weights."""
    import copy
    import json

    from g2rpo.checkpoint import check_resume
    from g2rpo.config import resume_differences, to_dict

    full = to_dict(load_config(TrainConfig, ROOT / "configs/tiny.yaml"))
    older = copy.deepcopy(full)
    del older["ema"], older["lora"]
    assert resume_differences(older, full) == ([], [])
    assert resume_differences(older, {**full, "lora": {**full["lora"], "rank": 4}})[0] == [
        "lora.rank: checkpoint 0 != now 4"]

    data = {"index": "same"}
    for saved, refused in ((full, False), (to_dict(load_config(TrainConfig, ROOT / "configs/tiny.yaml", LORA)), True)):
        path = tmp_path / f"checkpoint-{int(refused)}"
        path.mkdir()
        (path / "COMMITTED").write_text("{}")
        (path / "trainer_state.json").write_text(json.dumps({"config": saved, "world_size": 1, "data": data}))
        moved = copy.deepcopy(saved)
        moved["models"]["base"]["path"] = "ckpt/elsewhere"
        if refused:
            with pytest.raises(ValueError, match=r"models.base.path: checkpoint 'ckpt/tiny/flux' != now "
                                                 r"'ckpt/elsewhere' \(with lora.rank > 0"):
                check_resume(path, moved, 1, data)
        else:  # full fine-tuning: the checkpoint holds every weight, the pipeline path may move
            assert check_resume(path, moved, 1, data)[1] == ["models.base.path: checkpoint 'ckpt/tiny/flux' != now "
                                                             "'ckpt/elsewhere'"]
