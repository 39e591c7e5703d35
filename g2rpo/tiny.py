"""Tiny, randomly initialised stand-ins for FLUX.1-dev, SD3.5-Medium and the reward models, built offline.

Every test and the CPU demo run on these. `prepare_reduced_flux` builds a second stand-in at FLUX.1-dev's
true widths (d = 3072, T5 width 4096, CLIP width 768, the real VAE) with only 1-2 blocks of each kind,
stored in bf16 as FLUX.1-dev ships: the real memory and I/O per block, at a size a CPU can train. They are written to disk in the *real* formats -- a
diffusers ``FluxPipeline`` folder, an HPS-v2.1 ``{"state_dict": ...}`` checkpoint plus an open_clip
base folder, and an open_clip ``local-dir`` folder for the CLIP score -- so that they are read back
by exactly the loaders used for the real weights (`g2rpo.models`, `g2rpo.rewards`); only the
architecture named in the config differs.

Everything is seeded and deterministic: building twice gives byte-identical weight files.
Build with ``python scripts/prepare_tiny_checkpoints.py`` (writes ``ckpt/tiny``).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

from g2rpo.io import atomic_directory, atomic_write_bytes, save_safetensors

# FLUX.1-dev's VAE latent normalisation; kept so the decode path reads real values from the config.
FLUX_VAE_SCALING_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159

# FLUX.1-dev's scheduler settings (scheduler/scheduler_config.json of the real checkpoint).
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

# black-forest-labs/FLUX.1-dev transformer/config.json (11.9 B parameters)
FLUX_DEV_TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))

# black-forest-labs/FLUX.1-dev vae/config.json (83.8 M parameters)
FLUX_DEV_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                           layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                           scaling_factor=FLUX_VAE_SCALING_FACTOR, shift_factor=FLUX_VAE_SHIFT_FACTOR,
                           use_quant_conv=False, use_post_quant_conv=False)

TINY_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,  # 16 VAE channels x 2x2 patch packing, as FLUX.1-dev
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,  # = T5 d_model
    pooled_projection_dim=32,  # = CLIP text hidden size
    guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
)

# Name under which the tiny open_clip architecture is known; a config selects it instead of ViT-H-14.
TINY_CLIP_ARCH = "g2rpo-tiny-ViT"
TINY_CLIP_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# ViT-H-14 (laion2B) and DFN5B both normalise with the OpenAI CLIP statistics.
CLIP_PREPROCESS_CFG = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,  # 4 levels keep FLUX's x8 spatial compression
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=FLUX_VAE_SCALING_FACTOR,  # the decode path reads FLUX's latent normalisation from the config
    shift_factor=FLUX_VAE_SHIFT_FACTOR,
    use_quant_conv=False,  # as FLUX.1-dev's VAE
    use_post_quant_conv=False,
)

T5_VOCAB_SIZE = 1000  # upper bound for the sentencepiece model (plus 100 <extra_id_*> tokens)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def build_clip_tokenizer():
    """The exact CLIP BPE tokenizer of FLUX's ``tokenizer/`` folder, rebuilt from open_clip's bundled vocab."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    reference = SimpleTokenizer()
    vocab = dict(reference.encoder)
    # open_clip names the special tokens differently from the Hugging Face vocabulary.
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [pair for pair, _ in sorted(reference.bpe_ranks.items(), key=lambda item: item[1])]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 77
    return tokenizer


def _t5_training_corpus(prompts: list[str], seed: int) -> list[str]:
    words = sorted({word for prompt in prompts for word in prompt.split()})
    rng = random.Random(seed)
    shuffled = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 16))) for _ in range(3000)]
    charset = "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()-_/&%+=*#@"
    return prompts + shuffled + [charset]


def build_t5_tokenizer(prompts: list[str], seed: int = 0):
    """A small sentencepiece-unigram T5 tokenizer (pad 0, eos 1, unk 2, 100 extra ids), trained locally."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_t5_training_corpus(prompts, seed)),
        model_writer=model,
        vocab_size=T5_VOCAB_SIZE,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,  # single-threaded training is deterministic
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=100)
    tokenizer.model_max_length = 512
    return tokenizer, model.getvalue()


# --------------------------------------------------------------------------------------------
# FLUX pipeline
# --------------------------------------------------------------------------------------------


def build_tiny_flux_pipeline(prompts: list[str], seed: int = 0, transformer_config: dict = TINY_TRANSFORMER_CONFIG,
                             vae_config: dict = TINY_VAE_CONFIG, dtype: torch.dtype = torch.float32):
    """Assemble a complete ``FluxPipeline`` of random models (CPU, ``dtype``): tiny ones by default.

    The text encoders are always 2 small layers, at the widths the transformer expects (its
    ``pooled_projection_dim`` for CLIP, ``joint_attention_dim`` for T5).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from g2rpo.models import default_dtype

    tokenizer = build_clip_tokenizer()
    tokenizer_2, _ = build_t5_tokenizer(prompts, seed)

    with default_dtype(dtype):  # built directly in dtype: a true-width transformer never exists in fp32
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**transformer_config)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_config)
        torch.manual_seed(seed + 2)
        text_encoder = _tiny_clip_text(tokenizer, transformer_config["pooled_projection_dim"])
        torch.manual_seed(seed + 3)
        text_encoder_2 = _tiny_t5(tokenizer_2, transformer_config["joint_attention_dim"])
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _tiny_clip_text(tokenizer, width: int, projection: bool = False):
    """A 2-layer CLIP text encoder of hidden size ``width`` (FLUX's); ``projection``: with its text projection to
    ``width`` (SD3's ``CLIPTextModelWithProjection``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    extra = {"projection_dim": width} if projection else {}
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(
        CLIPTextConfig(
            **extra,
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            # the special-token ids of openai/clip-vit-large-patch14's config, as FLUX.1-dev ships it
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )


def _tiny_t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="gated-gelu",  # T5 v1.1, like FLUX's t5-v1_1-xxl
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


# --------------------------------------------------------------------------------------------
# SD3 pipeline
# --------------------------------------------------------------------------------------------

# stabilityai/stable-diffusion-3.5-medium: the scheduler's static shift, the VAE's latent normalisation and the
# transformer's config (2.5 B parameters; dual attention in the first 13 blocks, RMS q/k norms).
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
SD3_VAE_SCALING_FACTOR = 1.5305
SD3_VAE_SHIFT_FACTOR = 0.0609
SD35M_TRANSFORMER_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                                dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")

TINY_SD3_TRANSFORMER_CONFIG = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16,  # 16 VAE channels, 2x2 patches inside the model
    num_layers=2, attention_head_dim=8, num_attention_heads=4,
    joint_attention_dim=64,  # = T5 d_model (the CLIP sequences are zero-padded to it)
    caption_projection_dim=32,
    pooled_projection_dim=64,  # = CLIP-L projection + CLIP-G projection
    pos_embed_max_size=16,  # images up to 256 px
    dual_attention_layers=(0,),  # SD3.5's MMDiT-X block in the first layer, as SD3.5-Medium's first 13
    qk_norm="rms_norm",
)
TINY_SD3_VAE_CONFIG = dict(TINY_VAE_CONFIG, scaling_factor=SD3_VAE_SCALING_FACTOR, shift_factor=SD3_VAE_SHIFT_FACTOR)


def build_tiny_sd3_pipeline(prompts: list[str], seed: int = 0, transformer_config: dict = TINY_SD3_TRANSFORMER_CONFIG,
                            dtype: torch.dtype = torch.float32):
    """Assemble a complete ``StableDiffusion3Pipeline`` of random tiny models: CLIP-L and CLIP-G text encoders with
    projections (``CLIPTextModelWithProjection``, each half of ``pooled_projection_dim``), a T5 encoder at
    ``joint_attention_dim``, the VAE with SD3's latent normalisation, SD3.5-Medium's scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from g2rpo.models import default_dtype

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer()
    tokenizer_3, _ = build_t5_tokenizer(prompts, seed)
    half = transformer_config["pooled_projection_dim"] // 2
    with default_dtype(dtype):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**transformer_config)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**TINY_SD3_VAE_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = _tiny_clip_text(tokenizer, half, projection=True)
        torch.manual_seed(seed + 3)
        text_encoder_2 = _tiny_clip_text(tokenizer_2, half, projection=True)
        torch.manual_seed(seed + 4)
        text_encoder_3 = _tiny_t5(tokenizer_3, transformer_config["joint_attention_dim"])
    for module in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        module.eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def reduced_flux_config(double_blocks: int = 1, single_blocks: int = 1) -> dict:
    """FLUX.1-dev's transformer config with only ``double_blocks`` + ``single_blocks`` blocks (19 + 38 in the real one)."""
    return dict(FLUX_DEV_TRANSFORMER_CONFIG, num_layers=double_blocks, num_single_layers=single_blocks)


def prepare_reduced_flux(out_dir: str | Path, prompts: list[str], double_blocks: int = 1, single_blocks: int = 1,
                         seed: int = 0, force: bool = False) -> Path:
    """A FLUX pipeline folder at FLUX.1-dev's true widths and VAE, with few blocks, in bf16 (as FLUX.1-dev ships).

    1 + 1 blocks: a 0.55 B-parameter transformer (1.1 GB on disk); each further double block adds
    340 M parameters, each single block 142 M. Skipped if ``out_dir`` exists, unless ``force``.
    """
    out_dir = Path(out_dir)
    if force or not out_dir.exists():
        pipeline = build_tiny_flux_pipeline(prompts, seed, reduced_flux_config(double_blocks, single_blocks),
                                            FLUX_DEV_VAE_CONFIG, dtype=torch.bfloat16)
        write_pipeline(pipeline, out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# open_clip reward models
# --------------------------------------------------------------------------------------------


def build_tiny_open_clip(seed: int):
    """A randomly initialised open_clip CLIP of the tiny architecture."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(**TINY_CLIP_MODEL_CFG)
    return model.eval()


def write_open_clip_folder(model, directory: Path) -> None:
    """Write ``open_clip_config.json`` + ``open_clip_model.safetensors``, the layout of a Hub open_clip repo."""
    config = {"model_cfg": TINY_CLIP_MODEL_CFG, "preprocess_cfg": CLIP_PREPROCESS_CFG}
    with atomic_directory(directory) as tmp:
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_safetensors(model.state_dict(), tmp / "open_clip_model.safetensors")


def write_hps_folder(directory: Path, seed: int) -> None:
    """The HPS-v2.1 layout: ``HPS_v2.1_compressed.pt`` plus the open_clip base folder it fine-tunes.

    The HPS weights are a different random draw than the base weights, so a loader that forgot to
    apply them would be caught by the tests.
    """
    base = build_tiny_open_clip(seed)
    tuned = build_tiny_open_clip(seed + 1)
    with atomic_directory(directory) as tmp:
        write_open_clip_folder(base, tmp / "open_clip_base")
        buffer = io.BytesIO()
        torch.save({"state_dict": tuned.state_dict()}, buffer)
        atomic_write_bytes(tmp / "HPS_v2.1_compressed.pt", buffer.getvalue())


def write_pickscore_folder(directory: Path, seed: int) -> None:
    """A transformers ``CLIPModel`` + ``CLIPProcessor`` folder, the layout of PickScore_v1 and its processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 224, "patch_size": 32},
        projection_dim=32,
    )
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                         image_mean=CLIP_PREPROCESS_CFG["mean"], image_std=CLIP_PREPROCESS_CFG["std"])
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer())
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)


def _tiny_bert_vocab() -> list[str]:
    """A WordPiece vocabulary small enough for a tiny model, large enough to tokenise any lowercase prompt."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    words = ["a", "the", "of", "and", "in", "on", "with", "cat", "dog", "red", "car", "at", "photo"]
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(".,!?'-:;()\"") + list(dict.fromkeys(words + letters))
            + [f"##{c}" for c in letters])


def write_image_reward_folder(directory: Path, seed: int) -> None:
    """ImageReward's released layout at tiny size: ``ImageReward.pt`` (BLIP ViT, text encoder and head in the
    package's names), ``med_config.json`` and a BERT ``tokenizer/`` folder."""
    from transformers import BertTokenizer

    from g2rpo.image_reward import ImageRewardModel, blip_vision_config, text_config, to_released_names

    with atomic_directory(directory) as tmp:
        (tmp / "tokenizer").mkdir()
        (tmp / "tokenizer" / "vocab.txt").write_text("\n".join(_tiny_bert_vocab()) + "\n")
        BertTokenizer(str(tmp / "tokenizer" / "vocab.txt"), do_lower_case=True).save_pretrained(tmp / "tokenizer")
        med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
               "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
               "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 4,
               "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(_tiny_bert_vocab()) + 2,
               "encoder_width": 128, "add_cross_attention": True}
        (tmp / "med_config.json").write_text(json.dumps(med, indent=2) + "\n")
        torch.manual_seed(seed)
        vision = blip_vision_config(width=128, depth=2, intermediate=512, patch=16, image_size=64)  # 2 heads of 64, MLP x4
        model = ImageRewardModel(vision, text_config(med, 128), [(16, 32), (8, 16), (8, 8), (4, 8), (1, 4)])
        with torch.no_grad():  # no parameter at its constant init (LayerNorms at 1 and 0 would hide a mix-up of two)
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        buffer = io.BytesIO()
        torch.save(to_released_names(model.eval()), buffer)
        atomic_write_bytes(tmp / "ImageReward.pt", buffer.getvalue())


# Qwen2.5-VL's special tokens, in its order (the first is also the pad token).
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")

# A ChatML template written for the tiny judge: the turn layout of Qwen2.5-VL's own (its default system message,
# an image as <|vision_start|><|image_pad|><|vision_end|>), which the real judge's folder brings itself.
TINY_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# What the tiny judge learns to answer, whatever it is shown: the semantic question's score line.
TINY_JUDGE_ANSWER = "Alignment Score (1-5): 3"


def build_qwen_tokenizer(corpus: list[str], vocab_size: int = 600):
    """A small byte-level BPE in Qwen2's format (vocab + merges), trained locally, plus Qwen2.5-VL's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tokenizer


def random_images(count: int, generator: torch.Generator, size: int = 64) -> list:
    """``count`` PIL images of uniform noise."""
    from PIL import Image

    return [Image.fromarray((torch.rand(size, size, 3, generator=generator) * 255).round().to(torch.uint8).numpy())
            for _ in range(count)]


def write_unified_reward_folder(directory: Path, prompts: list[str], seed: int, steps: int = 24) -> None:
    """UnifiedReward-qwen-7b's layout at tiny size: a ``Qwen2_5_VLForConditionalGeneration`` (2 + 2 layers, width 64)
    and its processor (Qwen2 BPE tokenizer, Qwen2-VL image processor, chat template).

    Random weights never write the answer format, so the tiny judge is then fitted for ``steps`` Adam steps
    (teacher forcing on the prompts and noise images, a few seconds on a CPU) to answer `TINY_JUDGE_ANSWER`,
    which the real generate -> parse path reads as 3. ``steps=0`` leaves it random (what tests comparing two
    generation paths use: every token of a random judge depends on the image and the prompt).
    """
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    from g2rpo.unified_reward import QUESTIONS, judge_messages

    questions = [q.template for q in QUESTIONS.values()]
    tokenizer = build_qwen_tokenizer(questions * 4 + prompts + [TINY_JUDGE_ANSWER] * 50)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),  # 4 to 16 image tokens
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=TINY_QWEN_CHAT_TEMPLATE)
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                         bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"],
                         pad_token_id=special["<|endoftext|>"], tie_word_embeddings=False),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = special["<|endoftext|>"]
    model.generation_config.eos_token_id = special["<|im_end|>"]

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    answer_length = len(tokenizer(TINY_JUDGE_ANSWER + "<|im_end|>")["input_ids"])
    tokenizer.padding_side = "left"
    model.train()
    for step in range(steps):
        batch = [prompts[(4 * step + i) % len(prompts)] for i in range(4)]
        chats = [processor.apply_chat_template(judge_messages(p), tokenize=False, add_generation_prompt=True)
                 + TINY_JUDGE_ANSWER + "<|im_end|>" for p in batch]
        inputs = processor(text=chats, images=random_images(4, generator), padding=True, return_tensors="pt")
        logits = model(**inputs, logits_to_keep=answer_length + 1).logits[:, :-1]  # those that predict the answer
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), inputs["input_ids"][:, -answer_length:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)


# --------------------------------------------------------------------------------------------
# Everything
# --------------------------------------------------------------------------------------------


# part -> build(folder, prompts, seed); each model has its own seed offset.
_BUILDERS = {
    "flux": lambda d, prompts, seed: _family("flux").build_tiny(d, prompts, seed),
    "sd3": lambda d, prompts, seed: _family("sd3").build_tiny(d, prompts, seed + 60),
    "hps": lambda d, prompts, seed: write_hps_folder(d, seed + 10),
    "clip_score": lambda d, prompts, seed: write_open_clip_folder(build_tiny_open_clip(seed + 20), d),
    "pickscore": lambda d, prompts, seed: write_pickscore_folder(d, seed + 30),
    "imagereward": lambda d, prompts, seed: write_image_reward_folder(d, seed + 40),
    "unifiedreward": lambda d, prompts, seed: write_unified_reward_folder(d, prompts, seed + 50),
}
TINY_PARTS = tuple(_BUILDERS)


def prepare_tiny_checkpoints(out_dir: str | Path, prompts: list[str], seed: int = 0, force: bool = False,
                             only: tuple[str, ...] | None = None) -> dict:
    """Write ``flux/``, ``sd3/``, ``hps/``, ``clip_score/``, ``pickscore/``, ``imagereward/`` and ``unifiedreward/`` under
    ``out_dir`` (``only``: just those parts); skip existing parts.

    Each part is built in a temporary directory and renamed into place, so an interrupted run never
    leaves a half-written checkpoint behind. Returns ``{part: path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, build in _BUILDERS.items():
        if only is not None and name not in only:
            continue
        target = out_dir / name
        if force or not target.exists():
            build(target, prompts, seed)
        written[name] = target
    return written


def _family(kind: str):
    from g2rpo.models import family

    return family(kind)


def write_pipeline(pipeline, directory: Path) -> None:
    with atomic_directory(directory) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
