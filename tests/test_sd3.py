"""SD3 as the second base-model family (g2rpo.models.sd3): the tiny pipeline folder in the real layout, read by
the production loaders; our sampler with classifier-free guidance against diffusers' StableDiffusion3Pipeline;
the embedding files; every method training on it by config alone, on two FSDP ranks as in one process."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ENV, ROOT, TINY_SD3_T5_LENGTH, TORCHRUN, sd3_model_overrides
from g2rpo.config import SamplingConfig, TrainConfig, load_config
from g2rpo.flow import sigma_schedule
from g2rpo.models import family as family_named
from g2rpo.models import family_of, load_transformer, load_vae, transformer_config
from g2rpo.rollout import VelocityField, ode_sample, singular_sde_rollout

PROMPT = "A red panda napping on a tree branch"


@pytest.fixture(scope="module")
def pipe(tiny_sd3_models):
    pipe = family_of(tiny_sd3_models.base.path).load_pipeline(tiny_sd3_models.base.path, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def transformer(tiny_sd3_models):
    return load_transformer(tiny_sd3_models.base.path, subfolder="transformer").eval()


@pytest.fixture(scope="module")
def family(tiny_sd3_models):
    return family_of(tiny_sd3_models.base.path)


@pytest.fixture(scope="module")
def cond(pipe, family):
    with torch.no_grad():
        encoded = family.encode(pipe, [PROMPT], "cpu", TINY_SD3_T5_LENGTH)[0]
        negative = family.encode(pipe, [""], "cpu", TINY_SD3_T5_LENGTH)[0]
    return family.conditioning(encoded, negative)


def test_tiny_folder_is_a_stable_diffusion_3_pipeline_read_by_the_production_loaders(tiny_sd3_models, pipe, family):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    folder = tiny_sd3_models.base.path
    index = json.loads((Path(folder) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert {"transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
            "tokenizer_2", "tokenizer_3"} <= set(index)
    assert family.kind == "sd3" and isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection) and isinstance(pipe.text_encoder_3, T5EncoderModel)
    assert isinstance(load_transformer(folder, subfolder="transformer"), SD3Transformer2DModel)
    config = transformer_config(folder)
    assert config["qk_norm"] == "rms_norm" and config["dual_attention_layers"] == [0]  # SD3.5's MMDiT-X block
    vae = load_vae(folder)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (1.5305, 0.0609)  # SD3.5-Medium's
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    # family_of refuses a folder of another family than the one named
    with pytest.raises(ValueError, match="a StableDiffusion3Pipeline folder, but models.kind=flux expects a FluxPipeline"):
        family_of(folder, "flux")


@pytest.mark.parametrize("steps", [10, 40, 3])
def test_the_scheduler_grid_is_diffusers_set_timesteps(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    assert torch.equal(sigma_schedule(steps, 3.0, "scheduler"), scheduler.sigmas)
    if steps == 10:  # Flow-GRPO's SD3.5 training grid
        assert sigma_schedule(10, 3.0, "scheduler")[[1, 8, 9]].tolist() == pytest.approx([0.960129, 0.278049, 0.008929],
                                                                                            abs=1e-6)


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_ode_sampler_with_cfg_equals_stable_diffusion_3_pipeline(pipe, transformer, family, cond, guidance):
    """Same start noise (the pipeline's own draw from the seed), same grid and timesteps: the same latents, and the
    same decoded image; guidance 1 is the no-CFG path (one conditional forward)."""
    cfg = SamplingConfig(num_steps=4, height=64, width=80, guidance=guidance, grid="scheduler", timestep="exact")
    ours = ode_sample(transformer, cond, cfg, torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = pipe(PROMPT, height=64, width=80, num_inference_steps=4, guidance_scale=guidance,
                      max_sequence_length=TINY_SD3_T5_LENGTH, generator=torch.Generator().manual_seed(3),
                      output_type="latent").images[0]
        image = pipe(PROMPT, height=64, width=80, num_inference_steps=4, guidance_scale=guidance,
                     max_sequence_length=TINY_SD3_T5_LENGTH, generator=torch.Generator().manual_seed(3),
                     output_type="pt").images[0]
    assert ours.shape == (16, 8, 10)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(family.decode(pipe.vae, ours[None], 64, 80)[0], image.float(), atol=1e-5, rtol=1e-5)


def test_cfg_is_one_batched_forward_of_the_unconditional_and_conditional_rows(transformer, cond):
    """Each velocity under guidance g is one transformer call on [empty prompt; prompt] rows, v_u + g (v_c - v_u),
    equal to two separate forwards combined by hand."""
    rows = []

    def policy(**kwargs):
        rows.append(kwargs["hidden_states"].shape[0])
        return transformer(**kwargs)

    policy.config = transformer.config
    x, sigma = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(0.7)
    v = VelocityField(policy, cond, (64, 64), 4.5, quantize=False)(x, sigma)
    assert rows == [6]  # 3 samples, 2 rows each, one call
    with torch.no_grad():
        t = torch.full((3,), 700.0)
        u = transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.negative_prompt_embeds.expand(3, -1, -1),
                        pooled_projections=cond.negative_pooled_prompt_embeds.expand(3, -1), return_dict=False)[0]
        c = transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.prompt_embeds.expand(3, -1, -1),
                        pooled_projections=cond.pooled_prompt_embeds.expand(3, -1), return_dict=False)[0]
    torch.testing.assert_close(v, u + 4.5 * (c - u), atol=1e-5, rtol=1e-5)
    rows.clear()
    torch.testing.assert_close(VelocityField(policy, cond, (64, 64), 1.0, quantize=False)(x, sigma), c, atol=1e-5,
                               rtol=1e-5)
    assert rows == [3]


def test_singular_rollout_shared_order_equals_reference_order_on_sd3(transformer, cond):
    import dataclasses

    cfg = SamplingConfig(num_steps=6, branch_steps=[0, 2], granularities=[1, 2], group_size=3, height=32, width=32,
                         guidance=4.5, grid="scheduler", timestep="exact")
    shared = singular_sde_rollout(transformer, cond, cfg, torch.Generator().manual_seed(1))
    reference = singular_sde_rollout(transformer, cond, dataclasses.replace(cfg, order="reference"),
                                     torch.Generator().manual_seed(1))
    assert shared.completions.shape == (3, 2, 2, 16, 4, 4)
    for name in ("anchor_latents", "next_latents", "old_log_probs", "completions"):
        torch.testing.assert_close(getattr(shared, name), getattr(reference, name), atol=1e-5, rtol=1e-5)


def test_embedding_files_round_trip_with_the_empty_prompt(tiny_sd3_embeddings, tiny_sd3_models, pipe, family):
    from safetensors.torch import load_file

    from g2rpo.data import EmbeddingDataset
    from g2rpo.models.sd3 import SD3Embedding

    fingerprint = json.loads((tiny_sd3_embeddings / "fingerprint.json").read_text())
    assert fingerprint["family"] == "sd3" and fingerprint["max_sequence_length"] == TINY_SD3_T5_LENGTH
    assert set(fingerprint["text_encoders"]) == set(family.text_parts)
    dataset = EmbeddingDataset(tiny_sd3_embeddings / "index.jsonl", transformer_config(tiny_sd3_models.base.path),
                               family)
    assert dataset.check_files() == len(dataset) == 100
    embedding, caption = dataset[3]
    assert isinstance(embedding, SD3Embedding)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            caption, None, None, do_classifier_free_guidance=True, max_sequence_length=TINY_SD3_T5_LENGTH)
    assert embedding.prompt_embeds.shape == (77 + TINY_SD3_T5_LENGTH, 64)
    torch.testing.assert_close(embedding.prompt_embeds, embeds[0])
    torch.testing.assert_close(embedding.pooled_prompt_embeds, pooled[0])
    torch.testing.assert_close(embedding.negative_prompt_embeds, negative[0])  # the empty prompt, encoded, not zeros
    torch.testing.assert_close(embedding.negative_pooled_prompt_embeds, negative_pooled[0])
    assert load_file(tiny_sd3_embeddings / "negative.safetensors").keys() == {"prompt_embeds", "pooled_prompt_embeds"}
    # embeddings of one family are refused for a base model of another, naming both
    with pytest.raises(ValueError, match=r"embeddings of SD3 \(models.kind=sd3\), but the base model is FLUX"):
        EmbeddingDataset(tiny_sd3_embeddings / "index.jsonl", family=family_named("flux"))


# The 2-step comparison of every method on the tiny SD3 (CFG 4.5 in sampling and in the training forwards).
SD3_STEP = ("max_steps=2", "sample_every=0", "eval_every=0", "data.holdout=0", "checkpoint_start=1000",
            "save_dtype=float32", "sampling.num_steps=4", "sampling.group_size=4", "sampling.height=32",
            "sampling.width=32", "sampling.guidance=4.5", "sampling.grid=scheduler", "sampling.timestep=exact")
SD3_CONFIGS = {"tiny.yaml": ("sampling.branch_steps=[0,1]",), "tiny_dancegrpo.yaml": (), "tiny_flowgrpo.yaml": (),
               "tiny_mixgrpo.yaml": (), "tiny_densegrpo.yaml": ()}


@pytest.mark.slow
def test_every_method_trains_on_tiny_sd3_the_same_on_two_ranks_as_one_process(tiny_sd3_models, tiny_sd3_embeddings,
                                                                               tmp_path):
    """The five tiny method configs, pointed at the SD3 pipeline and its embeddings by overrides alone (models.kind
    from the folder): two FSDP ranks == one process holding both prompt groups, in losses, rewards and weights
    after 2 steps -- which moved far more than they differ; the export holds SD3's position table."""
    from safetensors.torch import load_file

    from g2rpo.distributed import DistInfo
    from g2rpo.trainer import Trainer

    common = [*sd3_model_overrides(tiny_sd3_models), f"data.index={tiny_sd3_embeddings / 'index.jsonl'}", *SD3_STEP]
    runs = {name: [*common, *extra] for name, extra in SD3_CONFIGS.items()}
    two = tmp_path / "two"
    result = subprocess.run([*TORCHRUN, str(ROOT / "tests/helpers/world_equivalence.py"), str(two), json.dumps(runs)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    def weights(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    start = weights(Path(tiny_sd3_models.base.path) / "transformer")
    assert "pos_embed.pos_embed" in start
    for name, overrides in runs.items():
        cfg = load_config(TrainConfig, ROOT / "configs" / name, [*overrides, "data.prompts_per_rank=2",
                                                                 f"output_dir={tmp_path / 'one' / name}"])
        trainer = Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
        assert trainer.family.kind == "sd3"
        trainer.fit()
        paths = [tmp_path / "one" / name, two / name]
        one_m, two_m = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in paths)
        assert len(one_m) == len(two_m) == 2
        for a, b in zip(one_m, two_m):
            for key in ("loss", "reward/hps", "reward/clip_score"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (name, key)
        one_w, two_w = (weights(next(run.glob("checkpoint-*/transformer"))) for run in paths)
        assert one_w.keys() == two_w.keys() == start.keys()
        assert torch.equal(one_w["pos_embed.pos_embed"], start["pos_embed.pos_embed"])
        diff = max((one_w[k] - two_w[k]).abs().max().item() for k in one_w)
        moved = max((one_w[k] - start[k].float()).abs().max().item() for k in one_w)
        assert diff < 1e-5 and moved > 100 * diff, (name, diff, moved)


def test_lora_on_sd3_trains_and_loads_into_the_pipeline(tiny_sd3_models, tiny_sd3_embeddings, tmp_path):
    """LoRA (Flow-GRPO's SD3 targets) through the trainer: the exported adapters load with diffusers' own
    StableDiffusion3Pipeline.load_lora_weights, and that transformer computes what the merged export computes."""
    from g2rpo.distributed import DistInfo
    from g2rpo.trainer import Trainer

    cfg = load_config(TrainConfig, ROOT / "configs/tiny_sd35m_densegrpo.yaml", [
        *sd3_model_overrides(tiny_sd3_models), f"data.index={tiny_sd3_embeddings / 'index.jsonl'}",
        f"output_dir={tmp_path / 'run'}", "max_steps=1", "eval_every=0", "sample_every=0", "data.holdout=0",
        "sampling.num_steps=3", "sampling.group_size=3", "sampling.height=32", "sampling.width=32", "lora.rank=4",
        "lora.alpha=8", "lora.export_merged=true", "save_dtype=float32"])
    Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu"))).fit()
    checkpoint = tmp_path / "run" / "checkpoint-0"
    family = family_of(tiny_sd3_models.base.path)
    with_lora = family.load_pipeline(tiny_sd3_models.base.path, torch.float32, lora_path=checkpoint / "lora").transformer
    merged = load_transformer(checkpoint / "transformer").eval()
    base = load_transformer(tiny_sd3_models.base.path, subfolder="transformer").eval()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 16, 4, 4, generator=g), timestep=torch.tensor([900.0, 300.0]),
                  encoder_hidden_states=torch.randn(2, 93, 64, generator=g),
                  pooled_projections=torch.randn(2, 64, generator=g), return_dict=False)
    with torch.no_grad():
        a, b, c = (m.eval()(**inputs)[0] for m in (with_lora, merged, base))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-4  # the adapters moved


def test_evaluation_on_sd3_prints_densegrpos_paper_rows(tiny_sd3_models, tmp_path, prompts):
    """The evaluation of an SD3 pipeline samples with its CFG (default 4.5) through StableDiffusion3Pipeline and
    prints DenseGRPO's table (SD3.5-M) beside ours: PickScore in its units, GenEval and OCR named as not computed."""
    import contextlib
    import io

    import yaml

    from g2rpo.config import to_dict
    from g2rpo.evaluation import evaluate
    from g2rpo.reward_registry import build_reward

    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump(to_dict(tiny_sd3_models)))
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts[:2]) + "\n")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        evaluate(["--base", tiny_sd3_models.base.path, "--prompts", str(prompt_file), "--models-config", str(models),
                  "--out", str(tmp_path / "eval"), "--metrics", "pickscore", "--height", "64", "--width", "64",
                  "--steps", "3", "--dtype", "float32", "--device", "cpu"])
    settings = json.loads((tmp_path / "eval" / "settings.json").read_text())
    assert settings["guidance"] == 4.5  # the family's default CFG scale
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert "DenseGRPO paper's table (SD3.5-Medium" in summary and summary in printed.getvalue()
    lines = summary.splitlines()
    assert "| | GenEval | OCR | PickScore |" in lines and "| DenseGRPO (paper) | 0.970 | 0.950 | 24.640 |" in lines
    scores = [json.loads(line)["pickscore"] for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    assert lines[-1] == f"| this evaluation (eval) | not computed | not computed | {sum(scores) / 2:.3f} |"
    # the image is the pipeline's own sample at that seed and guidance, scored by the reward directly
    pipe = family_of(tiny_sd3_models.base.path).load_pipeline(tiny_sd3_models.base.path, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipe(prompts[1], height=64, width=64, num_inference_steps=3, guidance_scale=4.5,
                     max_sequence_length=128, generator=torch.Generator().manual_seed(1), output_type="np").images[0]
    image = torch.from_numpy((image * 255).round() / 255).permute(2, 0, 1)[None].float()
    expected = build_reward("pickscore", tiny_sd3_models).score(image, [prompts[1]])[0].item()
    assert scores[1] == pytest.approx(expected, abs=1e-4)


def test_gaussian_lora_init_is_peft_gaussian_and_the_old_models_key_is_named():
    """lora.init: gaussian draws lora_A from N(0, 1/rank²) (peft's "gaussian", Flow-GRPO's SD3 init), lora_B zeros;
    a models file with the old ``flux:`` section is told where it went."""
    from g2rpo.config import ModelsConfig, from_dict
    from g2rpo.lora import initial_value

    a = initial_value("x.attn.to_q.lora_A.default.weight", (8, 4096), seed=0, init="gaussian")
    assert abs(a.mean().item()) < 3 * (1 / 8) / (8 * 4096) ** 0.5 and a.std().item() == pytest.approx(1 / 8, rel=0.02)
    assert torch.equal(initial_value("x.attn.to_q.lora_B.default.weight", (64, 8), 0, "gaussian"), torch.zeros(64, 8))
    kaiming = initial_value("x.attn.to_q.lora_A.default.weight", (8, 4096), seed=0)
    assert kaiming.abs().max() <= 1 / 4096 ** 0.5 and not torch.equal(a, kaiming)
    with pytest.raises(ValueError, match=r"unknown key\(s\) flux; .* \(flux is now base \(models.base.path"):
        from_dict(ModelsConfig, {"flux": {"path": "ckpt/flux"}}, "models.yaml")
