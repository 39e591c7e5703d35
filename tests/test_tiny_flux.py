"""The tiny FLUX pipeline: built offline, loaded by the production loaders, exact round trips."""

import hashlib

import pytest
import torch

from g2rpo.models import load_transformer, load_vae
from g2rpo.models.flux import load_flux_pipeline
from g2rpo.tiny import (FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR, TINY_TRANSFORMER_CONFIG,
                        build_t5_tokenizer, prepare_tiny_checkpoints)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), f"{name} differs"


def test_pipeline_has_flux_components(tiny_pipeline):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    pipe = tiny_pipeline
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    for key, value in TINY_TRANSFORMER_CONFIG.items():
        loaded = pipe.transformer.config[key]
        assert (tuple(loaded) if isinstance(value, tuple) else loaded) == value, key
    # the decode path reads FLUX's latent normalisation from the VAE config
    assert pipe.vae.config.scaling_factor == FLUX_VAE_SCALING_FACTOR
    assert pipe.vae.config.shift_factor == FLUX_VAE_SHIFT_FACTOR
    assert pipe.vae.config.latent_channels == 16
    assert pipe.vae_scale_factor == 8
    assert pipe.scheduler.config.shift == 3.0 and pipe.scheduler.config.use_dynamic_shifting
    # text dims line up with the transformer's projections
    assert pipe.text_encoder.config.hidden_size == pipe.transformer.config.pooled_projection_dim
    assert pipe.text_encoder_2.config.d_model == pipe.transformer.config.joint_attention_dim
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_prompt_encoding_shapes(tiny_pipeline):
    """What preprocessing will store: T5 sequence 512, pooled CLIP, text ids."""
    pipe = tiny_pipeline
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(["a cat", "a red fox in snow"], None, max_sequence_length=512)
    assert prompt_embeds.shape == (2, 512, TINY_TRANSFORMER_CONFIG["joint_attention_dim"])
    assert pooled.shape == (2, TINY_TRANSFORMER_CONFIG["pooled_projection_dim"])
    assert text_ids.shape == (512, 3) and not text_ids.any()
    assert not torch.allclose(prompt_embeds[0], prompt_embeds[1])


def test_clip_tokenizer_equals_open_clip_bpe(tiny_pipeline, prompts):
    """The rebuilt CLIP tokenizer tokenises exactly as open_clip's reference BPE implementation."""
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    tokenizer = tiny_pipeline.tokenizer
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    for text in prompts + ["Hello WORLD!! it's 2026: über-café", "  spaces\tand\ttabs  ", "🦊 emoji"]:
        assert tokenizer(text).input_ids == [49406] + reference.encode(text) + [49407], text


def test_t5_tokenizer_equals_sentencepiece(tiny_pipeline, prompts):
    import sentencepiece as spm

    _, model = build_t5_tokenizer(prompts, seed=0)
    processor = spm.SentencePieceProcessor(model_proto=model)
    tokenizer = tiny_pipeline.tokenizer_2
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == processor.get_piece_size() + 100  # + <extra_id_0..99>
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") >= processor.get_piece_size()
    for text in prompts[:20] + ["A 3-legged robot, 42 cats & a zeppelin!"]:
        assert tokenizer(text).input_ids == processor.encode(text) + [1], text


def test_generates_64px_image_deterministically(tiny_pipeline):
    def sample(seed):
        return tiny_pipeline("a red fox in snow", height=64, width=64, num_inference_steps=4, guidance_scale=3.5,
                             generator=torch.Generator().manual_seed(seed), output_type="pt").images

    image = sample(0)
    assert image.shape == (1, 3, 64, 64) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0
    assert torch.equal(image, sample(0))
    assert not torch.equal(image, sample(1))


def test_pipeline_save_load_round_trip_is_exact(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "copy", safe_serialization=True)
    reloaded = load_flux_pipeline(tmp_path / "copy", torch.float32)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(tiny_pipeline, name), getattr(reloaded, name))
    text = "A hummingbird hovering next to a bright orange trumpet flower"
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(reloaded, name)(text).input_ids == getattr(tiny_pipeline, name)(text).input_ids
    assert dict(reloaded.scheduler.config) == dict(tiny_pipeline.scheduler.config)


def test_transformer_and_vae_loaders(tiny_pipeline, tiny_models, tmp_path):
    _assert_same_weights(load_transformer(tiny_models.base.path, subfolder="transformer"), tiny_pipeline.transformer)
    _assert_same_weights(load_vae(tiny_models.base.path), tiny_pipeline.vae)
    bf16 = load_transformer(tiny_models.base.path, "bfloat16", subfolder="transformer")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}

    # a trained transformer saved on its own is swapped into the base pipeline
    trained = load_transformer(tiny_models.base.path, subfolder="transformer")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    trained.save_pretrained(tmp_path / "trained", safe_serialization=True)
    pipe = load_flux_pipeline(tiny_models.base.path, transformer_path=tmp_path / "trained")
    _assert_same_weights(pipe.transformer, trained)
    _assert_same_weights(pipe.vae, tiny_pipeline.vae)


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_build_is_deterministic_and_seeded(tiny_ckpt, prompts, tmp_path):
    again = prepare_tiny_checkpoints(tmp_path / "again", prompts, seed=0)
    assert _digests(again["flux"]) == _digests(tiny_ckpt / "flux")
    assert _digests(again["hps"]) == _digests(tiny_ckpt / "hps")
    assert _digests(again["clip_score"]) == _digests(tiny_ckpt / "clip_score")
    assert _digests(again["pickscore"]) == _digests(tiny_ckpt / "pickscore")
    assert _digests(again["unifiedreward"]) == _digests(tiny_ckpt / "unifiedreward")  # its fit is seeded too
    other = prepare_tiny_checkpoints(tmp_path / "other", prompts, seed=1, only=("flux",))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert _digests(other["flux"])[weights] != _digests(tiny_ckpt / "flux")[weights]


def test_existing_parts_are_kept_unless_forced(tiny_ckpt, prompts, tmp_path):
    out, flux = tmp_path / "tiny", ("flux",)  # one part shows it (every part goes through the same loop)
    prepare_tiny_checkpoints(out, prompts, seed=0, only=flux)
    marker = out / "flux" / "model_index.json"
    before = marker.stat().st_mtime_ns
    prepare_tiny_checkpoints(out, prompts, seed=1, only=flux)  # exists: not rebuilt, so still the seed-0 weights
    assert marker.stat().st_mtime_ns == before
    assert _digests(out / "flux") == _digests(tiny_ckpt / "flux")
    prepare_tiny_checkpoints(out, prompts, seed=1, force=True, only=flux)
    assert _digests(out / "flux") != _digests(tiny_ckpt / "flux")
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary folders left behind"


@pytest.mark.parametrize("loader", [load_flux_pipeline, load_vae, load_transformer])
def test_missing_folder_is_named(loader, tmp_path):
    missing = tmp_path / "no-such-flux"
    with pytest.raises(FileNotFoundError, match="no-such-flux"):
        loader(missing)
