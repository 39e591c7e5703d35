"""Strict YAML config loading: errors name the file, the field and what was expected."""

from dataclasses import dataclass, field

import pytest

from g2rpo.config import ModelsConfig, TrainConfig, apply_overrides, from_dict, load_config, to_dict
from conftest import ROOT


@dataclass
class _Inner:
    steps: int = 16
    rate: float = 1e-4
    granularities: list[int] = field(default_factory=lambda: [1, 2])
    note: str | None = None


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    flag: bool = False


def test_reference_yaml_equals_defaults():
    """configs/models/flux_dev.yaml only restates the defaults (the real weights' locations)."""
    assert load_config(ModelsConfig, ROOT / "configs" / "models" / "flux_dev.yaml") == ModelsConfig()
    assert load_config(ModelsConfig) == ModelsConfig()


def test_tiny_yaml_differs_only_in_paths_arch_and_dtypes():
    tiny, real = to_dict(load_config(ModelsConfig, ROOT / "configs" / "models" / "tiny.yaml")), to_dict(ModelsConfig())
    assert tiny["hps"]["arch"] != real["hps"]["arch"]
    # the GPU dtypes: FLUX.1-dev in bf16; HPS and the CLIP score fp32 weights scored faithfully (the official
    # sequence; on the CPU the batched tensor path); PickScore in half precision
    real_dtypes = {"base": "bfloat16", "hps": "float32", "clip_score": "float32", "pickscore": "float16",
                   "imagereward": "float32"}
    for section in real_dtypes:
        assert tiny[section]["dtype"] == "float32" and real[section]["dtype"] == real_dtypes[section]
        assert (tiny[section].get("preprocess"), real[section].get("preprocess")) in ((None, None),
                                                                                    ("tensor", "faithful"))
        paths = {k: v for k, v in tiny[section].items() if k not in ("arch", "dtype", "preprocess")}
        assert paths and all(str(v).startswith("ckpt/tiny/") for v in paths.values()), section


def test_types_are_coerced_and_checked():
    cfg = from_dict(_Outer, {"inner": {"steps": 8, "rate": 1, "granularities": [1, 2, 3], "note": None}, "flag": True})
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.granularities == [1, 2, 3] and cfg.flag is True
    with pytest.raises(ValueError, match=r"cfg.yaml: inner\.steps: expected int, got str '8'"):
        from_dict(_Outer, {"inner": {"steps": "8"}}, "cfg.yaml")
    with pytest.raises(ValueError, match=r"inner\.steps: expected int, got bool"):
        from_dict(_Outer, {"inner": {"steps": True}})
    with pytest.raises(ValueError, match=r"inner\.granularities\[1\]: expected int"):
        from_dict(_Outer, {"inner": {"granularities": [1, "two"]}})
    with pytest.raises(ValueError, match=r"inner: expected a mapping"):
        from_dict(_Outer, {"inner": 3})


def test_unknown_keys_are_errors_naming_file_and_path(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("base:\n  path: x\n  dtyp: float32\n")
    with pytest.raises(ValueError, match=r"models.yaml: base: unknown key\(s\) dtyp; valid keys are dtype, path"):
        load_config(ModelsConfig, path)


def test_invalid_value_names_field_and_where_it_came_from(tmp_path):
    """A bad value is named with its source: the file it is in, or the command-line override that set it."""
    with pytest.raises(ValueError, match=r"^command-line override base.dtype=int8: expected one of float32, bfloat16"):
        load_config(ModelsConfig, overrides=["base.dtype=int8"])
    path = tmp_path / "models.yaml"
    path.write_text("base:\n  dtype: int8\n")
    with pytest.raises(ValueError, match=rf"^{path}: base.dtype='int8': expected one of float32, bfloat16"):
        load_config(ModelsConfig, path, ["base.path=x"])
    tiny = ROOT / "configs" / "tiny.yaml"
    for override, expected in (("ema.decay=1.5", "command-line override ema.decay=1.5: expected 0 (off) or a value in"),
                               ("sampling.num_steps=1", "command-line override sampling.num_steps=1: num_steps=1: "),
                               ("ema.decayy=1", "command-line override ema.decayy=1: unknown key(s) decayy; valid keys"),
                               ("data.holdout=0", "command-line override data.holdout=0: eval_every=4 needs held-out")):
        with pytest.raises(ValueError) as refused:
            load_config(TrainConfig, tiny, [override])
        assert str(refused.value).startswith(expected), str(refused.value)
    own = tmp_path / "own.yaml"  # the file's own bad value, beside an unrelated override: the file is named
    own.write_text("eval_every: 4\ndata: {holdout: 0}\n")
    with pytest.raises(ValueError, match=rf"^{own}: eval_every=4 needs held-out prompts"):
        load_config(TrainConfig, own, ["max_steps=3"])


def test_overrides():
    cfg = load_config(ModelsConfig, ROOT / "configs" / "models" / "tiny.yaml",
                      ["base.dtype=bfloat16", "hps.arch=ViT-H-14", "clip_score.path=/x/y"])
    assert (cfg.base.dtype, cfg.hps.arch, cfg.clip_score.path) == ("bfloat16", "ViT-H-14", "/x/y")
    assert cfg.base.path == "ckpt/tiny/flux"
    assert apply_overrides({}, ["a.b.c=[1, 2]", "a.d=3.5", "e=text"]) == {"a": {"b": {"c": [1, 2]}, "d": 3.5}, "e": "text"}
    with pytest.raises(ValueError, match="section.field=value"):
        apply_overrides({}, ["base.dtype"])
    with pytest.raises(ValueError, match=r"'path' is not a section"):
        apply_overrides({"flux": {"path": "x"}}, ["flux.path.deeper=1"])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(ModelsConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("flux: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_config(ModelsConfig, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="list.yaml: expected a mapping"):
        load_config(ModelsConfig, listy)


def test_engine_and_checkpoint_options_are_validated():
    from g2rpo.config import EngineConfig, TrainConfig

    with pytest.raises(ValueError, match=r"engine.kind='ddp': expected fsdp or deepspeed \(DDP is gone: FSDP2 shards"):
        EngineConfig(kind="ddp")
    with pytest.raises(ValueError, match=r"engine.fsdp_sharding='no_shard': expected full_shard or shard_grad_op"):
        EngineConfig(fsdp_sharding="no_shard")
    with pytest.raises(ValueError, match=r"engine.mixed_precision='no': expected bf16, autocast or fp32"):
        EngineConfig(mixed_precision="no")
    with pytest.raises(ValueError, match=r"engine.load_strategy='mmap': expected slices or broadcast"):
        EngineConfig(load_strategy="mmap")
    with pytest.raises(ValueError, match=r"io_timeout_minutes=0: must be > 0"):
        load_config(TrainConfig, overrides=["io_timeout_minutes=0"])
    # at scale: keep one resumable state (143 GB for FLUX.1-dev) and export in bf16, as FLUX.1-dev ships
    defaults = TrainConfig()
    assert (defaults.keep_last, defaults.save_dtype, defaults.engine.mixed_precision) == (1, "bfloat16", "bf16")
    one_gpu = load_config(TrainConfig, ROOT / "configs" / "g2rpo_hps_clip_1gpu.yaml")
    assert (one_gpu.engine.kind, one_gpu.engine.offload) == ("fsdp", True)  # FSDP2 + CPUOffloadPolicy


def test_a_training_config_reads_its_models_from_the_models_file(tmp_path):
    """``models: configs/models/<name>.yaml``: training and evaluation read the weights' folders from one file."""
    for config, models in (("g2rpo_hps_clip.yaml", "flux_dev.yaml"), ("tiny_dancegrpo.yaml", "tiny.yaml")):
        cfg = load_config(TrainConfig, ROOT / "configs" / config)
        assert to_dict(cfg.models) == to_dict(load_config(ModelsConfig, ROOT / "configs/models" / models)), config
    cfg = load_config(TrainConfig, ROOT / "configs/tiny.yaml", ["models.base.path=elsewhere"])
    assert cfg.models.base.path == "elsewhere" and cfg.models.hps.arch == "g2rpo-tiny-ViT"  # overrides still apply
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: configs/models/nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"bad.yaml: models: configs/models/nowhere.yaml: file not found"):
        load_config(TrainConfig, bad)
