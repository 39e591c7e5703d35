"""HPS-v2.1 and CLIP-score loaders on the tiny checkpoints (same code as for ViT-H-14)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from g2rpo.config import ModelsConfig, load_config
from g2rpo.rewards import load_clip_score_model, load_hps_model
from g2rpo.tiny import TINY_CLIP_MODEL_CFG


def _image(seed=0, size=(96, 80)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _load_hps(cfg):
    return load_hps_model(cfg.arch, cfg.base_dir, cfg.checkpoint)


def test_hps_loads_the_hps_weights_not_the_base(tiny_models):
    from safetensors.torch import load_file

    bundle = _load_hps(tiny_models.hps)
    expected = torch.load(tiny_models.hps.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    base = load_file(f"{tiny_models.hps.base_dir}/open_clip_model.safetensors")
    state = bundle.model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    assert not torch.equal(state["visual.conv1.weight"], base["visual.conv1.weight"])
    assert {p.dtype for p in bundle.model.parameters()} == {torch.float32}
    assert not bundle.model.training


def test_hps_preprocess_tokenizer_and_features(tiny_models):
    from open_clip.tokenizer import SimpleTokenizer

    bundle = _load_hps(tiny_models.hps)
    pixels = bundle.preprocess(_image()).unsqueeze(0)
    assert pixels.shape == (1, 3, 224, 224)
    text = ["a red fox in snow", "two penguins sharing an umbrella"]
    tokens = bundle.tokenizer(text)
    assert tokens.shape == (2, 77)
    ids = [49406] + SimpleTokenizer().encode(text[0]) + [49407]
    assert tokens[0, : len(ids)].tolist() == ids and not tokens[0, len(ids):].any()
    with torch.no_grad():
        out = bundle.model(pixels, tokens)
    assert out["image_features"].shape == (1, TINY_CLIP_MODEL_CFG["embed_dim"])
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(2), atol=1e-5)


def test_clip_score_model_loads_its_folder_weights(tiny_models):
    from safetensors.torch import load_file

    bundle = load_clip_score_model(tiny_models.clip_score.path)
    expected = load_file(f"{tiny_models.clip_score.path}/open_clip_model.safetensors")
    state = bundle.model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    pixels = bundle.preprocess(_image(1)).unsqueeze(0)
    with torch.no_grad():
        image_features = bundle.model.encode_image(pixels)
        text_features = bundle.model.encode_text(bundle.tokenizer(["a bowl of ramen"]))
    assert image_features.shape == text_features.shape == (1, TINY_CLIP_MODEL_CFG["embed_dim"])


def test_hps_missing_files_are_named(tiny_models, tmp_path):
    cfg = tiny_models.hps
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_hps_model(cfg.arch, cfg.base_dir, tmp_path / "nope.pt")


def test_hps_needs_no_base_weights(tiny_models, tmp_path):
    """HPS-v2.1's checkpoint holds every parameter: the base weights (3.9 GB for ViT-H-14) are never read."""
    config_only = tmp_path / "base"
    config_only.mkdir()
    shutil.copy(f"{tiny_models.hps.base_dir}/open_clip_config.json", config_only)
    loaded = load_hps_model(tiny_models.hps.arch, config_only, tiny_models.hps.checkpoint).model.state_dict()
    expected = _load_hps(tiny_models.hps).model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in expected.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reward_models_are_built_in_the_configured_dtype(tiny_models, dtype):
    """Every parameter and buffer in ``dtype`` (no fp32 copy kept), equal to the fp32 weights cast once."""
    from g2rpo.reward_registry import build_reward

    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    models = load_config(ModelsConfig, ROOT / "configs/models/tiny.yaml",
                         [f"{k}={v}" for k, v in _paths(tiny_models)] + [f"hps.dtype={name}",
                                                                          f"clip_score.dtype={name}"])
    for reward, full in (("hps", _load_hps(tiny_models.hps)), ("clip_score",
                                                               load_clip_score_model(tiny_models.clip_score.path))):
        model = build_reward(reward, models).model
        assert {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()} == {dtype}
        expected = full.model.state_dict()
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, expected[key].to(dtype)), (reward, key)
        images = _images(2)
        scores = build_reward(reward, models).score(images, ["a red fox", "a bowl of ramen"])
        reference = build_reward(reward, tiny_models).score(images, ["a red fox", "a bowl of ramen"])
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores, reference, atol=3e-2, rtol=0)  # half-precision rounding only


def _paths(models):
    return (("base.path", models.base.path), ("hps.base_dir", models.hps.base_dir),
            ("hps.checkpoint", models.hps.checkpoint), ("clip_score.path", models.clip_score.path),
            ("pickscore.model", models.pickscore.model), ("pickscore.processor", models.pickscore.processor))


def test_hps_unknown_arch_without_config_is_an_error(tiny_models, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(f"{tiny_models.hps.base_dir}/open_clip_model.safetensors", base)
    with pytest.raises(ValueError, match="not-an-arch.*open_clip_config.json"):
        load_hps_model("not-an-arch", base, tiny_models.hps.checkpoint)


def test_truncated_hps_checkpoint_is_named(tiny_models, tmp_path):
    broken = tmp_path / "HPS_v2.1_compressed.pt"
    data = open(tiny_models.hps.checkpoint, "rb").read()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="HPS checkpoint.*HPS_v2.1_compressed.pt"):
        load_hps_model(tiny_models.hps.arch, tiny_models.hps.base_dir, broken)


def test_clip_score_folder_without_weights_is_an_error(tiny_models, tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    shutil.copy(f"{tiny_models.clip_score.path}/open_clip_config.json", folder)
    with pytest.raises(FileNotFoundError, match="no weights in .*clip"):
        load_clip_score_model(folder)


def _images(n, size=(3, 96, 128), seed=0):
    # smooth images (a blurred noise field), like decoded samples rather than white noise
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, size[0], size[1] // 8, size[2] // 8, generator=g)
    return torch.nn.functional.interpolate(coarse, size=size[1:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("name", ["hps", "clip_score"])
def test_faithful_scores_equal_the_official_sequence(tiny_models, name, tmp_path):
    """models.<reward>.preprocess=faithful (fp32 weights) equals a transcription of the official trainer's
    scoring: the decoded tensor through diffusers' VaeImageProcessor.postprocess to PIL, saved as PNG and
    reopened (DanceGRPO's files; lossless), the model's own transform, batch 1, the forward and the cosine
    under fp16 autocast. It differs from the tensor path by more than rounding (uint8, fp16)."""
    import dataclasses

    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from g2rpo.reward_registry import build_reward
    from g2rpo.rewards import load_clip_score_model, load_hps_model

    decoded = _images(3, seed=2) * 2 - 1  # the VAE's output range
    images = (decoded / 2 + 0.5).clamp(0, 1)  # what g2rpo.models.decode_latents hands the rewards
    prompts = ["a cat on a sofa", "a red car", "mountains at dawn"]
    section = dataclasses.replace(getattr(tiny_models, name), preprocess="faithful", dtype="float32")
    models = dataclasses.replace(tiny_models, **{name: section})
    faithful = build_reward(name, models).score(images, prompts)

    if name == "hps":
        h = tiny_models.hps
        bundle = load_hps_model(h.arch, h.base_dir, h.checkpoint, dtype="float32")
    else:
        bundle = load_clip_score_model(tiny_models.clip_score.path, dtype="float32")
    official = []
    for i, pil in enumerate(VaeImageProcessor().postprocess(decoded, output_type="pil")):
        pil.save(tmp_path / f"{i}.png")
        image = bundle.preprocess(Image.open(tmp_path / f"{i}.png")).unsqueeze(0)
        text = bundle.tokenizer([prompts[i]])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            if name == "hps":
                outputs = bundle.model(image, text)
                score = torch.diagonal(outputs["image_features"] @ outputs["text_features"].T)
            else:
                features = torch.nn.functional.normalize(bundle.model.encode_image(image), dim=-1)
                text_features = torch.nn.functional.normalize(bundle.model.encode_text(text), dim=-1)
                score = (features @ text_features.T)[0]
        official.append(score.float())
    official = torch.cat(official)
    singles = torch.cat([build_reward(name, models).score(images[i:i + 1], prompts[i:i + 1]) for i in range(3)])
    assert torch.equal(singles, official), (singles, official)
    torch.testing.assert_close(faithful, official, atol=2e-3, rtol=0)  # batched: fp16 GEMMs of another shape
    tensor_path = build_reward(name, dataclasses.replace(models, **{name: dataclasses.replace(section, preprocess="tensor")}))
    assert (tensor_path.score(images, prompts) - official).abs().max() > 1e-5


@pytest.mark.parametrize("name", ["hps", "clip_score"])
def test_tensor_scores_equal_the_models_own_pil_preprocessing(tiny_models, name):
    """score() on tensors vs the model's PIL transform on the same (uint8-rounded) images."""
    from g2rpo.reward_registry import build_reward

    reward = build_reward(name, tiny_models)
    images = (_images(3) * 255).round() / 255  # representable exactly as uint8 PIL images
    prompts = ["a red fox in snow", "a bowl of ramen", "a lighthouse in a storm"]
    bundle = load_hps_model(tiny_models.hps.arch, tiny_models.hps.base_dir, tiny_models.hps.checkpoint) \
        if name == "hps" else load_clip_score_model(tiny_models.clip_score.path)
    pil = [Image.fromarray((img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()) for img in images]
    with torch.no_grad():
        pixels = torch.stack([bundle.preprocess(p) for p in pil])
        img = torch.nn.functional.normalize(bundle.model.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(bundle.model.encode_text(bundle.tokenizer(prompts)), dim=-1)
    expected = (img * txt).sum(-1)
    # HPS resizes tensors in both paths; open_clip resizes the PIL image (PIL's bicubic), hence the looser bound
    torch.testing.assert_close(reward.score(images, prompts), expected, atol=1e-5 if name == "hps" else 2e-3, rtol=0)
    assert torch.allclose(reward.preprocess(images), pixels, atol=1e-5 if name == "hps" else 0.1)


def test_scores_are_batch_invariant_and_validated(tiny_models):
    from g2rpo.reward_registry import build_reward

    reward = build_reward("hps", tiny_models)
    images, prompts = _images(4, seed=1), ["a cat", "a dog", "a tree", "a house"]
    batched = reward.score(images, prompts)
    singles = torch.cat([reward.score(images[i:i + 1], prompts[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, singles, atol=1e-6, rtol=0)
    assert batched.shape == (4,) and batched.abs().max() <= 1
    assert torch.equal(reward.score(images.double(), prompts), batched)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        reward.score(images, prompts[:3])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward.score(images[0], prompts[:1])
    with pytest.raises(ValueError, match="reward 'pick': expected one of hps, clip_score, pickscore, imagereward"):
        build_reward("pick", tiny_models)


def test_one_reward_registry_names_every_reward_everywhere(tmp_path):
    """g2rpo.reward_registry is the only table: the evaluation's columns, the training rewards the config
    accepts (an evaluation-only one refused as such), their default weight and their log files."""
    from g2rpo.config import RewardSpec
    from g2rpo.evaluation import METRIC_COLUMNS
    from g2rpo.metrics import MetricsLogger
    from g2rpo.reward_registry import REWARDS, training_rewards

    assert METRIC_COLUMNS == {"hps": "HPS-v2.1", "clip_score": "CLIP Score", "pickscore": "PickScore",
                              "imagereward": "ImageReward", "unifiedreward": "UnifiedReward"}
    assert training_rewards() == ["hps", "clip_score", "pickscore"] and list(METRIC_COLUMNS) == list(REWARDS)
    assert RewardSpec("clip_score").weight == REWARDS["clip_score"].default_weight == 1.0
    assert RewardSpec("hps", -1.0).weight == -1.0
    with pytest.raises(ValueError, match=r"name='imagereward': reward 'imagereward' \(evaluation only: imagereward "
                                         r"cannot score inside the training step\): expected one of hps, clip_score, "
                                         r"pickscore"):
        RewardSpec("imagereward")
    assert REWARDS["pickscore"].train_scale == 1 / 26  # Flow-GRPO trains on PickScore / 26
    with pytest.raises(ValueError, match=r"name='hpsv3': reward 'hpsv3': expected one of hps, clip_score, pickscore, "
                                         r"http \(a reward server\) or package.module:factory \(your own\)$"):
        RewardSpec("hpsv3")
    logger = MetricsLogger(tmp_path, ["hps", "clip_score"])
    logger.log(0, {"eval_reward/hps": 0.25, "eval_reward/clip_score": 0.5})
    logger.close()
    assert (tmp_path / REWARDS["hps"].log_file).read_text() == "0 0.250000\n"
    assert (tmp_path / "clip_reward.txt").read_text() == "0 0.500000\n"  # the reference's file name


def test_loading_holds_one_state_dict_and_keeps_only_the_model(tiny_models, tmp_path):
    """Peak host memory while loading HPS in bf16 from an fp32 checkpoint: the state dict (4 B/param) plus the
    model built in bf16 (2 B/param) -- not an fp32 model, base weights and HPS weights at once (12 B/param).
    Afterwards only the bf16 model remains. Measured on a 65 M-parameter open_clip model."""
    import io
    import json

    from open_clip.model import CLIP

    from g2rpo.memory import PhaseMeter
    from g2rpo.models import release_memory

    _load_hps(tiny_models.hps)  # imports and one-time registrations, outside the measurement
    cfg = {"embed_dim": 256, "vision_cfg": {"image_size": 224, "layers": 6, "width": 512, "head_width": 64,
                                            "patch_size": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 6}}
    (tmp_path / "base").mkdir()
    (tmp_path / "base/open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    model = CLIP(**cfg)
    params = sum(p.numel() for p in model.parameters())
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict()}, buffer)
    (tmp_path / "hps.pt").write_bytes(buffer.getvalue())
    del model, buffer
    release_memory()
    meter = PhaseMeter("cpu")
    bundle = load_hps_model("g2rpo-test-mid", tmp_path / "base", tmp_path / "hps.pt", dtype=torch.bfloat16)
    release_memory()
    phase = meter.mark("load")
    assert meter.resettable
    assert phase["peak_rss_increase_gb"] * 1e9 < 1.25 * 6 * params, phase  # measured: 423 MB for 6 B/param = 390 MB
    assert (phase["rss_after_gb"] - phase["rss_before_gb"]) * 1e9 < 1.3 * 2 * params, phase  # the bf16 model
    assert next(bundle.model.parameters()).dtype == torch.bfloat16


def _image_reward_package():
    """ImageReward's own BLIP code (the image-reward wheel env_setup.sh installs without its pins), importable
    on our versions: its package __init__ (which needs OpenAI's clip) is skipped, and the few transformers 4 /
    timm 0.6 / fairscale names it imports are given back -- no line of its model code is changed."""
    import importlib.util
    import sys
    import types

    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    spec = importlib.util.find_spec("ImageReward")
    if spec is None:
        pytest.fail("the image-reward package is missing: run bash env_setup.sh")
    blip_dir = Path(spec.submodule_search_locations[0]) / "models" / "BLIP"
    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        setattr(modeling_utils, name, getattr(modeling_utils, name, None) or getattr(pytorch_utils, name))
    modeling_utils.find_pruneable_heads_and_indices = getattr(modeling_utils, "find_pruneable_heads_and_indices", None)
    stubs = {"fairscale": {}, "fairscale.nn": {}, "fairscale.nn.checkpoint": {},
             "fairscale.nn.checkpoint.checkpoint_activations": {"checkpoint_wrapper": lambda module, **kw: module},
             "timm.models.hub": {"download_cached_file": None}}
    for name, attributes in stubs.items():
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            vars(sys.modules[name]).update(attributes)
    package = types.ModuleType("_image_reward_blip")
    package.__path__ = [str(blip_dir)]
    sys.modules["_image_reward_blip"] = package
    import _image_reward_blip.med as med
    import _image_reward_blip.vit as vit

    # transformers 5 dropped these ModuleUtilsMixin helpers that its BertModel calls; their v4 definitions
    med.BertModel.invert_attention_mask = lambda self, mask: (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    med.BertModel.get_head_mask = lambda self, head_mask, layers: [None] * layers
    med.BertPreTrainedModel.post_init = lambda self: None  # weights come from the file
    med.BertPreTrainedModel.init_weights = lambda self: None
    return med, vit


def test_image_reward_equals_the_packages_own_blip(tiny_models):
    """ImageReward on transformers' BLIP classes (our loader, the tiny released-layout folder) scores as the
    package's own ViT + BERT-with-cross-attention code loaded from the same ImageReward.pt, through the
    package's preprocessing (its _transform(224) sequence at the ViT's size) and tokenisation (35 tokens)."""
    import json

    from PIL import Image
    from torchvision import transforms as T

    from g2rpo.image_reward import CLIP_MEAN, CLIP_STD, MAX_LENGTH, MEAN, STD, build_tokenizer
    from g2rpo.io import load_state_dict_file
    from g2rpo.reward_registry import build_reward

    med, vit = _image_reward_package()
    folder = Path(tiny_models.imagereward.checkpoint).parent
    state = load_state_dict_file(folder / "ImageReward.pt", "ImageReward")
    config = med.BertConfig.from_json_file(str(folder / "med_config.json"))
    width = state["blip.visual_encoder.pos_embed"].shape[-1]
    config.encoder_width = width
    text = med.BertModel(config=config, add_pooling_layer=False).eval()
    text.load_state_dict({k.removeprefix("blip.text_encoder."): v for k, v in state.items()
                          if k.startswith("blip.text_encoder.")}, strict=True)
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("blip.visual_encoder.blocks."))
    visual = vit.VisionTransformer(img_size=64, patch_size=16, embed_dim=width, depth=depth, num_heads=width // 64).eval()
    visual.load_state_dict({k.removeprefix("blip.visual_encoder."): v for k, v in state.items()
                            if k.startswith("blip.visual_encoder.")}, strict=True)
    head = [state[f"mlp.layers.{i}.weight"] for i in (0, 2, 4, 6, 7)], [state[f"mlp.layers.{i}.bias"] for i in (0, 2, 4, 6, 7)]
    tokenizer = build_tokenizer(folder / "tokenizer")
    transform = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64),
                           lambda image: image.convert("RGB"), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    images = _images(3, size=(3, 80, 96), seed=4)  # not square: the resize and crop matter
    prompts = ["a red car on the road", "photo of a cat", "a dog"]
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            pil = Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
            tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            embeds = visual(transform(pil).unsqueeze(0))
            out = text(tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=embeds,
                       encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long), return_dict=True)
            h = out.last_hidden_state[:, 0, :].float()
            for weight, bias in zip(*head):
                h = torch.nn.functional.linear(h, weight, bias)  # the released head: linear layers, no activation
            expected.append((h[0, 0] - MEAN) / STD)
    expected = torch.stack(expected)
    got = build_reward("imagereward", tiny_models).score(images, prompts)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert json.loads((folder / "med_config.json").read_text())["vocab_size"] == len(tokenizer)
    assert (got.max() - got.min()) > 0  # the prompts and images move the score
