"""Configuration: the training run's nested dataclasses (sampling, method, PPO, engine, ...) and the resume rules.

Three modules, one import: this one (what a run does), g2rpo.config_models (where the models live: the
``models:`` section) and g2rpo.config_loading (strict YAML loading); everything is importable from here.
``load_config(ModelsConfig, "configs/models/tiny.yaml", ["base.dtype=bfloat16"])`` reads the file,
applies the overrides (values parsed as YAML), and builds the dataclasses. Unknown keys, wrong
types and invalid values raise ``ValueError`` naming the file or override, the dotted field and what was
expected. Every field has a default equal to the reference recipe (real FLUX.1-dev weights);
``configs/`` files only state what differs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# re-exported: ``from g2rpo.config import load_config, ModelsConfig, ...`` stays the one import
from g2rpo.config_loading import apply_overrides, attribute_error, from_dict, load_config, to_dict  # noqa: F401
from g2rpo.config_models import (DTYPES, BaseModelConfig, ClipScoreModelConfig, HPSModelConfig,  # noqa: F401
                                 ImageRewardModelConfig, ModelsConfig, PickScoreModelConfig, UnifiedRewardModelConfig)


# --------------------------------------------------------------------------------------------
# Sampling (singular-SDE rollouts, docs/algorithm.md §1-3)
# --------------------------------------------------------------------------------------------


@dataclass
class SamplingConfig:
    num_steps: int = 16
    """T, sampling steps of the anchor trajectory."""
    shift: float = 3.0
    """time shift k of the sigma schedule, shift(t) = k·t / (1 + (k-1)·t)."""
    eta: float = 0.7
    """noise level of the single SDE step at each branching point."""
    branch_steps: list[int] = field(default_factory=lambda: list(range(8)))
    """K (the reference's eta_step_list): grid indices where a group branches, each in 0..T-2."""
    granularities: list[int] = field(default_factory=lambda: [1, 2])
    """G (granular_list): strides of the deterministic completions after each branch."""
    group_size: int = 12
    """N, generations per prompt; all share one start noise and one anchor trajectory."""
    guidance: float = 3.5
    """FLUX: the distilled guidance scale given to the transformer (FLUX.1-dev: 3.5); SD3: the classifier-free
    guidance scale (Flow-GRPO's SD3.5-M: 4.5; 1 = no CFG, one forward per sample)."""
    grid: str = "uniform"
    """the σ grid: uniform, σ_i = shift(1 − i/T) (G²RPO, DanceGRPO, FLUX) | scheduler, diffusers'
    FlowMatchEulerDiscreteScheduler at a static shift (StableDiffusion3Pipeline, Flow-GRPO's SD3 trainer)."""
    height: int = 720
    """image height in pixels (multiple of 16)."""
    width: int = 720
    """image width in pixels (multiple of 16)."""
    order: str = "shared"
    """"shared" (default: the branch reuses the anchor's velocity, granularities share their first two
    evaluations, a branch step's N completions run as one batch) or "reference" (the reference
    recipe's order: per generation, batch 1, nothing shared). Same outputs up to float rounding."""
    micro_batch: int = 0
    """most samples per transformer call in the completions (and, for the full-trajectory methods, in their
    sampling); 0 = the whole group at once."""
    timestep: str = "quantized"
    """the transformer's timestep input: quantized, floor(σ·1000)/1000 (G²RPO's official trainer, DanceGRPO) |
    exact, σ unrounded (Flow-GRPO feeds σ·1000 as it is)."""

    def __post_init__(self):
        if self.grid not in ("uniform", "scheduler"):
            raise ValueError(f"grid={self.grid!r}: expected uniform (σ = shift(1 − i/T)) or scheduler (diffusers' "
                             f"FlowMatchEulerDiscreteScheduler)")
        if self.guidance < 0:
            raise ValueError(f"guidance={self.guidance}: must be >= 0")
        if self.timestep not in ("quantized", "exact"):
            raise ValueError(f"timestep={self.timestep!r}: expected quantized (floor(σ·1000)/1000, G²RPO, DanceGRPO) or "
                             f"exact (Flow-GRPO)")
        if self.num_steps < 2:
            raise ValueError(f"num_steps={self.num_steps}: need >= 2 (one branch step plus one completion step)")
        if self.shift <= 0:
            raise ValueError(f"shift={self.shift}: must be > 0")
        if self.eta <= 0:
            raise ValueError(f"eta={self.eta}: must be > 0, or the branch step is deterministic and every "
                             f"advantage is 0")
        if not self.branch_steps:
            raise ValueError("branch_steps is empty: give at least one branching step, e.g. [0]")
        if len(set(self.branch_steps)) != len(self.branch_steps):
            raise ValueError(f"branch_steps {self.branch_steps}: contains duplicates")
        if not self.granularities or any(g < 1 for g in self.granularities):
            raise ValueError(f"granularities {self.granularities}: need at least one, each >= 1")
        if len(set(self.granularities)) != len(self.granularities):
            raise ValueError(f"granularities {self.granularities}: contains duplicates")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: GRPO needs >= 2 generations per group")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value <= 0 or value % 16:
                raise ValueError(f"{name}={value}: must be a positive multiple of 16 (VAE x8, then 2x2 packing)")
        if self.order not in ("shared", "reference"):
            raise ValueError(f"order={self.order!r}: expected 'shared' or 'reference'")
        if self.micro_batch < 0:
            raise ValueError(f"micro_batch={self.micro_batch}: must be >= 0 (0 = whole group)")


# --------------------------------------------------------------------------------------------
# Training (docs/algorithm.md §4-6)
# --------------------------------------------------------------------------------------------


@dataclass
class RewardSpec:
    name: str = "hps"
    """the reward: a registry name that can train (g2rpo.reward_registry: hps | clip_score | pickscore), a factory
    ``package.module:factory`` (importable from the working directory or an installed package), or ``http`` (a
    reward server); g2rpo.reward_plugins, README "Add a reward"."""
    weight: float | None = None
    """weight of this reward's advantage term in the MGAI sum; unset: the registry's default (1, the reference's)."""
    args: dict[str, Any] = field(default_factory=dict)
    """a factory's keyword arguments (it is called as factory(device=..., **args)); http: url, timeout_s,
    batch_size, retries, backoff_s, format (png | jpeg), jpeg_quality."""
    label: str | None = None
    """its name in the logs (reward/<label>, <label>_reward.txt); default: the registry name, the factory's
    ``name`` attribute or its module's last part, or http."""

    def __post_init__(self):
        try:
            entry = self.entry()
        except ValueError as exc:
            raise ValueError(f"rewards: name={self.name!r}: {exc}") from None
        if self.weight is None:
            self.weight = entry.default_weight

    def entry(self):
        """The reward's `g2rpo.reward_registry.RewardEntry` (a registry row, or one made for a factory or a server)."""
        from g2rpo.reward_plugins import resolve

        return resolve(self.name, self.args, self.label, training=True)

    @property
    def key(self) -> str:
        """The reward's name in the logs and metrics."""
        return self.entry().name


@dataclass
class OptimConfig:
    lr: float = 2e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    """any name diffusers.optimization.get_scheduler knows (constant, constant_with_warmup, cosine, ...)."""
    warmup_steps: int = 0
    """in optimiser updates (one per branching step)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr}: must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={self.betas}: expected two values in [0, 1)")
        if self.max_grad_norm <= 0:
            raise ValueError(f"optim.max_grad_norm={self.max_grad_norm}: must be > 0")


@dataclass
class PPOConfig:
    clip_range: float = 1e-4
    """ε of the clipped ratio."""
    adv_clip_max: float = 5.0
    """advantages are clipped to ±adv_clip_max after the MGAI sum."""
    update: str = "per_branch"
    """g2rpo: per_branch (one optimiser step per branch step k, the released trainers) | accumulate (the K
    losses / K accumulated into one optimiser step per training step, the other upstream version)."""
    kl_beta: float = 0.0
    """β of the KL penalty to the frozen initial transformer, ``loss + β·KL(π_θ ‖ π_ref)`` per trained transition
    (Flow-GRPO, DenseGRPO: 0.04 / 0.01); 0 (the default, as G²RPO, DanceGRPO and MixGRPO) builds no reference.
    FSDP engine only; the reference's shards take half the trained shards' memory under bf16."""
    kl_form: str = "exact"
    """the KL term's form: exact, the Gaussian KL mean((μ_θ − μ_ref)²)/(2·std²) of the transition | flow_grpo,
    Flow-GRPO's code: mean((μ_θ − μ_ref)²)/(2·s²) with s the noise level, i.e. |dt| times the exact one (its β
    values were tuned with it)."""

    guard: bool = False
    """GRPO-Guard's regulated clipping (as Flow-GRPO's train_sd3_GRPO_Guard.py, its ``rationorm`` switch, which turns
    on both): the ratio normalised, ``log r̂ = s·(log p_θ − log p_old + mean((μ_θ − μ_old)²)/(2s²))`` with ``s`` the
    transition's std (= ``mean(ε·(μ_θ − μ_old))``, centred on 1 at every timestep), and each transition's clipped
    loss re-weighted by ``1/|dt|`` (the gradient's scale the same at every timestep); the KL term is not re-weighted.
    Its clip ranges are far smaller (the official configs: 2e-6 to 4e-6). Cost: the rollout keeps each trained
    transition's mean (the full-trajectory methods: one latent per step and generation, as much memory as the
    trajectories themselves; G²RPO: one per branch step); no extra forward. g2rpo.loss.guard_clip_loss."""

    def __post_init__(self):
        if self.kl_form not in ("exact", "flow_grpo"):
            raise ValueError(f"ppo.kl_form={self.kl_form!r}: expected exact or flow_grpo")
        if self.clip_range <= 0:
            raise ValueError(f"ppo.clip_range={self.clip_range}: must be > 0")
        if self.adv_clip_max <= 0:
            raise ValueError(f"ppo.adv_clip_max={self.adv_clip_max}: must be > 0")
        if self.update not in ("per_branch", "accumulate"):
            raise ValueError(f"ppo.update={self.update!r}: expected per_branch or accumulate")
        if not (isinstance(self.kl_beta, (int, float)) and self.kl_beta >= 0):
            raise ValueError(f"ppo.kl_beta={self.kl_beta!r}: must be a number >= 0 (0 turns the KL term off)")


@dataclass
class AdvantageConfig:
    """How rewards become group-normalised advantages, A = (R − mean R) / (std R + eps), the mean each prompt
    group's. Each method's own code sets these differently; its configs carry its values (docs/algorithm.md,
    "Method conventions")."""

    std: str = "unbiased"
    """unbiased (ddof 1: G²RPO, DanceGRPO, MixGRPO) | population (ddof 0: Flow-GRPO's numpy std)."""
    eps: float = 1.0e-8
    """added to the std (G²RPO, DanceGRPO: 1e-8; Flow-GRPO: 1e-4)."""
    std_over: str = "group"
    """group (each prompt group's N generations) | global (every generation of the step, on every rank:
    Flow-GRPO's global_std, true in its recipes)."""
    precision: str = "float32"
    """dtype of the statistics: float32 | float64 (Flow-GRPO: numpy float64)."""
    combine: str = "per_reward"
    """several rewards: per_reward (each normalised, then their weighted sum: G²RPO's MGAI, DanceGRPO, MixGRPO)
    | weighted_sum (the weighted sum of the raw scores, normalised once: Flow-GRPO's combined reward)."""
    normalize_weights: bool = False
    """divide the reward weights by their sum before use (MixGRPO)."""

    def __post_init__(self):
        choices = {"std": ("unbiased", "population"), "std_over": ("group", "global"),
                   "precision": ("float32", "float64"), "combine": ("per_reward", "weighted_sum")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"advantage.{name}={getattr(self, name)!r}: expected {' or '.join(allowed)}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"advantage.eps={self.eps!r}: must be a number > 0 (1e-8; Flow-GRPO: 1e-4)")


METHODS = ("g2rpo", "dancegrpo", "flowgrpo", "mixgrpo", "densegrpo")


@dataclass
class TrajectoryConfig:
    """The full-trajectory methods (dancegrpo, flowgrpo, mixgrpo, densegrpo): N whole trajectories per prompt."""

    noise: str = "flow_grpo"
    """noise level of a stochastic transition: flow_grpo (s = η·sqrt(σ/(1−σ)); Flow-GRPO, MixGRPO) | dance
    (s = η, DanceGRPO's FLUX step) | psi (DenseGRPO's calibrated ψ(t), read from dense.psi_table)."""
    same_start_noise: bool = True
    """one start noise for the whole group (DanceGRPO's init_same_noise) instead of one per generation."""
    ignore_last: bool = False
    """the last transition is deterministic and never trained (DanceGRPO: its reward image is the last step's
    x̂0, which is the Euler step to σ = 0)."""
    timestep_fraction: float = 1.0
    """each generation trains ⌊fraction · n⌋ of its n stochastic transitions (DanceGRPO 0.6: 9 of 15; Flow-GRPO
    0.99: 15 of 16); 1 = all, in order."""
    select: str = "random"
    """which ⌊fraction · n⌋: random, a random subset per sample (DanceGRPO's permutation per sample) | first, the
    first ones in grid order, the same for every sample (Flow-GRPO)."""
    samples_per_update: int = 0
    """generations per optimiser step across all ranks (DanceGRPO on 16 GPUs: 4 per GPU, 64); each update takes
    the same share of every prompt group of the step, samples_per_update / (ranks · data.prompts_per_rank), so
    any world size runs the same updates; 0 = all of the step's (one optimiser step per training step)."""
    micro_batch: int = 1
    """transitions per training forward (1 = the reference's batch-1 order; more is the same loss up to float
    rounding, in fewer calls)."""

    def __post_init__(self):
        if self.noise not in ("flow_grpo", "dance", "psi"):
            raise ValueError(f"trajectory.noise={self.noise!r}: expected flow_grpo, dance or psi")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"trajectory.timestep_fraction={self.timestep_fraction}: must be in (0, 1]")
        if self.select not in ("random", "first"):
            raise ValueError(f"trajectory.select={self.select!r}: expected random (DanceGRPO) or first (Flow-GRPO)")
        if self.samples_per_update < 0 or self.micro_batch < 0:
            raise ValueError(f"trajectory.samples_per_update={self.samples_per_update}, micro_batch="
                             f"{self.micro_batch}: must be >= 0")


@dataclass
class WindowConfig:
    """MixGRPO's sliding SDE window (ODE elsewhere; only the window is trained)."""

    size: int = 4
    """transitions in the window (MixGRPO: 4)."""
    start: int = 0
    """grid index of the first window transition at step 0."""
    shift_every: int = 25
    """training steps between moves of the window (MixGRPO: 25; MixGRPO-Flash: 20)."""
    stride: int = 1
    """transitions the window moves towards lower noise per shift (0 = a fixed window, MixGRPO-Flash*)."""
    solver: str = "euler"
    """the ODE steps after the window: euler (MixGRPO) | dpmsolver++ (MixGRPO-Flash: DPM-Solver++(2M), midpoint,
    its history carrying x̂0 across the window)."""
    post_compress: float = 1.0
    """MixGRPO-Flash's compressed tail: the steps after the window shrink to ⌊(T − last)·ratio⌋ − 1 (at least 1;
    MixGRPO-Flash: 0.4); 1 keeps the T-step grid."""

    def __post_init__(self):
        if self.size < 1 or self.start < 0 or self.shift_every < 1 or self.stride < 0:
            raise ValueError(f"window: size={self.size} (>= 1), start={self.start} (>= 0), shift_every="
                             f"{self.shift_every} (>= 1), stride={self.stride} (>= 0)")
        if self.solver not in ("euler", "dpmsolver++"):
            raise ValueError(f"window.solver={self.solver!r}: expected euler (MixGRPO) or dpmsolver++ (MixGRPO-Flash)")
        if not 0 < self.post_compress <= 1:
            raise ValueError(f"window.post_compress={self.post_compress}: must be in (0, 1] (MixGRPO-Flash: 0.4; 1 = "
                             f"no compression)")


@dataclass
class DenseConfig:
    """DenseGRPO: step-wise rewards of the ODE completion of every x_i."""

    psi_table: str = ""
    """JSON ψ(t) table written by scripts/densegrpo/calibrate_psi.py (used when trajectory.noise is psi)."""


@dataclass
class EngineConfig:
    kind: str = "fsdp"
    """fsdp (FSDP2, any number of processes, one included) | deepspeed (ZeRO-2/3)."""
    fsdp_sharding: str = "full_shard"
    """full_shard (free each block's gathered weights after its forward) | shard_grad_op (keep them until backward)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 2 or 3."""
    mixed_precision: str = "bf16"
    """bf16: compute in bf16 with fp32 master weights (FSDP2: bf16 parameters and all-gathers, fp32 gradient
    reduction, MixedPrecisionPolicy) | autocast: the reference's numerics -- fp32 parameters and all-gathers
    under torch bf16 autocast (twice the all-gather traffic; gathered rollout weights in fp32, 47.6 GB for
    FLUX.1-dev, so pair it with rollout_weights=sharded on 80 GB GPUs) | fp32: everything in fp32 (the tiny CPU
    config). DeepSpeed runs bf16 as autocast."""
    activation_checkpointing: bool = True
    """recompute each FLUX block's activations in the backward pass."""
    device: str = "auto"
    """auto (cuda if available) | cuda | cpu."""
    offload: bool = False
    """keep the fp32 weights, gradients and AdamW states in CPU memory (FSDP2: CPUOffloadPolicy, the optimiser
    steps on the CPU; DeepSpeed: optimiser states, and parameters at ZeRO-3): the one-GPU option."""
    load_strategy: str = "slices"
    """FSDP: how the weights reach the shards. slices = every rank reads only its rows of each tensor from the
    safetensors files; broadcast = rank 0 reads each tensor and broadcasts it (docs/benchmarks.md compares)."""
    rollout_weights: str = "gathered"
    """gathered = before a step's rollouts gather every block once in the compute dtype and keep it until they
    end (FSDP: unshard the units, no second model; ZeRO-3: an unsharded copy refreshed per optimiser step) --
    same outputs, no collective per forward, one bf16 transformer per rank while rolling out (23.8 GB for
    FLUX.1-dev); sharded = re-gather every block on every forward (the reference's way, least memory)."""
    compile_rollout: bool = False
    """torch.compile the module rollouts and held-out sampling run on (not the training forward): equal to eager
    up to float rounding; each new batch shape compiles first (~20 s on CPU). DeepSpeed ZeRO-3 needs
    rollout_weights=gathered for it."""

    def __post_init__(self):
        if self.kind not in ("fsdp", "deepspeed"):
            hint = (" (DDP is gone: FSDP2 shards the 190 GB of fp32 weights, gradients and AdamW states that DDP "
                    "would copy to every GPU)") if self.kind == "ddp" else ""
            raise ValueError(f"engine.kind={self.kind!r}: expected fsdp or deepspeed{hint}")
        if self.fsdp_sharding not in ("full_shard", "shard_grad_op"):
            raise ValueError(f"engine.fsdp_sharding={self.fsdp_sharding!r}: expected full_shard or shard_grad_op")
        if self.zero_stage not in (2, 3):
            raise ValueError(f"engine.zero_stage={self.zero_stage}: expected 2 or 3")
        if self.mixed_precision not in ("bf16", "autocast", "fp32"):
            raise ValueError(f"engine.mixed_precision={self.mixed_precision!r}: expected bf16, autocast or fp32")
        if self.load_strategy not in ("slices", "broadcast"):
            raise ValueError(f"engine.load_strategy={self.load_strategy!r}: expected slices or broadcast")
        if self.rollout_weights not in ("gathered", "sharded"):
            raise ValueError(f"engine.rollout_weights={self.rollout_weights!r}: expected gathered or sharded")
        if self.compile_rollout and self.kind == "deepspeed" and self.zero_stage == 3 \
                and self.rollout_weights == "sharded":
            raise ValueError("engine.compile_rollout=true with engine.kind=deepspeed and zero_stage=3 needs "
                             "engine.rollout_weights=gathered (a ZeRO-3 module is not compiled for rollouts)")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"engine.device={self.device!r}: expected auto, cuda or cpu")


@dataclass
class DataConfig:
    index: str = "data/rl_embeddings/index.jsonl"
    """JSONL index written by the preprocessing step."""
    prompts_per_rank: int = 1
    """prompt groups each rank rolls out per step (the reference: 1)."""
    shuffle: bool = True
    holdout: int = 0
    """the last `holdout` prompts of the index are never trained on; they are the evaluation set."""

    def __post_init__(self):
        if self.holdout < 0:
            raise ValueError(f"data.holdout={self.holdout}: must be >= 0")
        if self.prompts_per_rank < 1:
            raise ValueError(f"data.prompts_per_rank={self.prompts_per_rank}: must be >= 1")


@dataclass
class LoRAConfig:
    rank: int = 0
    """LoRA rank (g2rpo.lora; FSDP engine): 0 = full fine-tuning (the reference); Flow-GRPO trains rank 32."""
    alpha: float = 64.0
    """the adapters' output is scaled by alpha / rank (Flow-GRPO: 64 at rank 32)."""
    target_modules: list[str] = field(default_factory=lambda: ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                                                               "attn.to_add_out"])
    """peft name suffixes of the adapted linear layers (default: Flow-GRPO's, every attention projection)."""
    export_merged: bool = False
    """also export the merged transformer (W + alpha/rank · B A, save_dtype) as checkpoint-N/transformer."""
    init: str = "kaiming"
    """lora_A's initialisation (lora_B starts at 0, so the model starts as the base either way): kaiming, peft's
    default | gaussian, N(0, 1/rank²), peft's "gaussian" (Flow-GRPO's SD3 trainer)."""

    def __post_init__(self):
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"lora.init={self.init!r}: expected kaiming (peft's default) or gaussian")
        if self.rank < 0:
            raise ValueError(f"lora.rank={self.rank}: must be >= 0 (0 turns LoRA off)")
        if self.rank and (self.alpha <= 0 or not self.target_modules):
            raise ValueError(f"lora.alpha={self.alpha}, lora.target_modules={self.target_modules}: LoRA needs alpha > 0 "
                             f"and at least one target module")


@dataclass
class EMAConfig:
    decay: float = 0.0
    """EMA of the trained weights (g2rpo.ema): 0 = off; Flow-GRPO uses 0.9 with update_every 8."""
    update_every: int = 1
    """average after every N-th applied optimiser update."""
    warmup: bool = True
    """Flow-GRPO's warm-up: the decay after the s-th update is min((1 + s) / (10 + s), decay)."""
    device: str = "device"
    """where each rank keeps its shards of the average: device (the training device) | cpu (host memory)."""
    eval: bool = True
    """the held-out evaluation also samples with the averaged weights (logged as heldout/ema_<reward>)."""

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay={self.decay}: expected 0 (off) or a value in (0, 1)")
        if self.update_every < 1:
            raise ValueError(f"ema.update_every={self.update_every}: must be >= 1")
        if self.device not in ("device", "cpu"):
            raise ValueError(f"ema.device={self.device!r}: expected device or cpu")


@dataclass
class EvalConfig:
    """The held-out evaluation (every ``eval_every`` steps) as a watch for reward hacking (README "Watching for reward
    hacking"): the trained rewards (in-domain) beside rewards the run is not trained on (out-of-domain), a fixed-seed
    sample strip, a detector over the history, the best checkpoint by a named criterion."""

    rewards: list[str] | None = None
    """the rewards scored: registry names or package.module:factory; unset: every registry reward whose files are
    present (UnifiedReward only when named). Those not trained on are logged as out-of-domain (heldout_ood/...)."""
    batch_size: int = 8
    """images decoded and scored per call."""
    reward_device: str = "device"
    """where the out-of-domain rewards live and score: device (the training device) | cpu (off the GPU, slower)."""
    strip: int = 4
    """held-out prompts in the sample strip (the same prompts and noise at every evaluation; samples/heldout/); 0: none."""
    window: int = 2
    """the detector: consecutive evaluations an out-of-domain reward must stay below its start..."""
    margin: float = 0.5
    """...by more than this many of its start's standard deviations (across the held-out prompts), while the
    in-domain rewards are above theirs: a hacking flag (g2rpo.hacking)."""
    stop_on_hacking: bool = False
    """stop the run (with a checkpoint) at the evaluation where the detector fires."""
    best_by: str = ""
    """keep a pointer to the best checkpoint (output_dir/best.json; inference and evaluation take <output_dir>/best):
    ood (the mean of the out-of-domain z-scores), a held-out reward's name (its mean), or "" (none)."""

    def __post_init__(self):
        if self.batch_size < 1 or self.strip < 0 or self.window < 1 or self.margin < 0:
            raise ValueError(f"eval.batch_size={self.batch_size}, strip={self.strip}, window={self.window}, "
                             f"margin={self.margin}: expected batch_size >= 1, strip >= 0, window >= 1, margin >= 0")
        if self.reward_device not in ("device", "cpu"):
            raise ValueError(f"eval.reward_device={self.reward_device!r}: expected device or cpu")
        if self.rewards is not None and len(set(self.rewards)) != len(self.rewards):
            raise ValueError(f"eval.rewards {self.rewards}: each reward may appear once")


@dataclass
class LoggingConfig:
    """Where rank 0's logs go besides metrics.jsonl / heldout.jsonl (always written): TensorBoard (the default) and
    Weights & Biases (optional; ``pip install wandb``)."""

    tensorboard: bool = True
    """TensorBoard scalars and sample strips in output_dir/tensorboard."""
    wandb: bool = False
    """also log every scalar, the held-out sample strips and the config to a W&B run (its files in output_dir/wandb).
    The run's id is kept in output_dir/wandb_run.json, so a resumed run continues the same W&B run."""
    wandb_project: str = "g2rpo"
    wandb_entity: str = ""
    """the W&B team or user ("": your default entity)."""
    wandb_name: str = ""
    """the run's display name ("": output_dir's folder name)."""
    wandb_mode: str = "online"
    """online (needs ``wandb login`` or WANDB_API_KEY) | offline (nothing leaves the machine; upload later with
    ``wandb sync <output_dir>/wandb/offline-run-*``)."""
    wandb_tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.wandb_mode not in ("online", "offline"):
            raise ValueError(f"logging.wandb_mode={self.wandb_mode!r}: expected online or offline")
        if self.wandb:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ValueError("logging.wandb=true needs the wandb package, which is not installed: pip install "
                                 "wandb (or set logging.wandb=false)")
            if not self.wandb_project:
                raise ValueError("logging.wandb_project is empty: name the W&B project to log to")


@dataclass
class TrainConfig:
    method: str = "g2rpo"
    """g2rpo | dancegrpo | flowgrpo | mixgrpo | densegrpo (g2rpo.methods; README "Methods")."""
    models: ModelsConfig = field(default_factory=ModelsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("hps")])
    optim: OptimConfig = field(default_factory=OptimConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    max_steps: int = 301
    """training steps; each is one rollout per group and one optimiser update per branching step."""
    seed: int = 42
    output_dir: str = "outputs/g2rpo_hps"
    checkpoint_every: int = 50
    checkpoint_start: int = 150
    """first step that may be checkpointed (then every checkpoint_every steps, and the last step)."""
    save_dtype: str = "bfloat16"
    """dtype of the exported transformer (checkpoint-*/transformer): bfloat16 (as FLUX.1-dev ships, 23.8 GB) or
    float32 (exact, 47.6 GB). The resumable state always keeps the fp32 weights."""
    sample_every: int = 10
    """write a PNG grid of this rank-0 step's anchor samples every N steps (0 = never)."""
    decode_batch_size: int = 16
    """VAE decodes per call when scoring completions."""
    resume: str = ""
    """how the run starts, spelt the same in a YAML file, a resume=... override, --resume and RESUME=: none or ""
    (a fresh start; refused where output_dir holds a run), auto (the newest committed checkpoint in output_dir,
    else fresh), or a checkpoint folder."""
    keep_last: int = 1
    """keep the resumable state (FLUX.1-dev: 143 GB) of only the newest N checkpoints (0 = all); the exported
    transformers are always kept."""
    io_timeout_minutes: float = 60.0
    """how long the collectives that wait on file I/O (writing, hashing and verifying checkpoints) may wait;
    the default process group's time-out (NCCL: 10 minutes) would cut a slow shared file system short."""
    verify_checksums: bool = True
    """check every checkpoint file's SHA-256 before resuming (sizes are always checked)."""
    max_consecutive_skips: int = 3
    """stop when more than this many skips happen in a row (a skip: one optimiser update with a non-finite
    loss or gradient norm, or a whole step with a non-finite reward)."""
    eval_every: int = 0
    """every N steps (and before the first and after the last), the mean reward of deterministic samples of
    the held-out prompts (data.holdout) is logged as heldout/<reward> (0 = never)."""
    overwrite: bool = False
    """start afresh in an output_dir that holds an earlier run, deleting that run's files first (logs, configs,
    checkpoints); without it such a folder is refused unless resume=auto continues it."""

    def __post_init__(self):
        self.resume = normalize_resume(self.resume)
        _check_method_fields(self)
        if not self.rewards:
            from g2rpo.reward_registry import training_rewards

            raise ValueError(f"rewards is empty: name at least one reward ({', '.join(training_rewards())})")
        names = [r.key for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards {names}: each reward may appear once")
        if self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps}: must be >= 1")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={self.checkpoint_every}: must be >= 1")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"save_dtype={self.save_dtype!r}: expected float32 or bfloat16")
        if self.eval_every and not self.data.holdout:
            raise ValueError(f"eval_every={self.eval_every} needs held-out prompts: set data.holdout > 0")
        if self.keep_last < 0:
            raise ValueError(f"keep_last={self.keep_last}: must be >= 0 (0 keeps every checkpoint)")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips={self.max_consecutive_skips}: must be >= 1")
        if self.io_timeout_minutes <= 0:
            raise ValueError(f"io_timeout_minutes={self.io_timeout_minutes}: must be > 0")
        if self.decode_batch_size < 1:
            raise ValueError(f"decode_batch_size={self.decode_batch_size}: must be >= 1")
        if self.ppo.kl_beta and self.engine.kind != "fsdp":
            raise ValueError(f"ppo.kl_beta={self.ppo.kl_beta} needs engine.kind=fsdp (the frozen reference is a "
                             f"second FSDP2-sharded transformer); engine.kind={self.engine.kind!r} has none: set "
                             f"ppo.kl_beta=0 or engine.kind=fsdp")
        if self.lora.rank and self.engine.kind != "fsdp":
            raise ValueError(f"lora.rank={self.lora.rank} needs engine.kind=fsdp; set lora.rank=0 or engine.kind=fsdp")
        if self.ema.decay and self.engine.kind != "fsdp":
            raise ValueError(f"ema.decay={self.ema.decay} needs engine.kind=fsdp (the average is kept per FSDP2 shard); "
                             f"set ema.decay=0 or engine.kind=fsdp")
        if self.overwrite and self.resume:
            raise ValueError(f"overwrite=true with resume={self.resume}: choose one -- continue the run in output_dir "
                             f"(resume; RESUME= for the launchers) or delete it and start afresh (overwrite; OVERWRITE=1)")


def normalize_resume(value) -> str:
    """``resume`` in one spelling: "" (fresh; also "none" and a YAML null), "auto", or the checkpoint path as given."""
    text = "" if value is None else str(value).strip()
    return "" if text.lower() in ("", "none", "null") else "auto" if text.lower() == "auto" else text


def checkpoint_due(cfg: "TrainConfig", step: int) -> bool:
    """Whether a checkpoint is written after ``step`` (0-based): every ``checkpoint_every`` steps from
    ``checkpoint_start``, and after the last step."""
    periodic = step >= cfg.checkpoint_start and (step - cfg.checkpoint_start) % cfg.checkpoint_every == 0
    return step == cfg.max_steps - 1 or periodic


def checkpoint_steps(cfg: "TrainConfig") -> list[int]:
    return [step for step in range(cfg.max_steps) if checkpoint_due(cfg, step)]


def update_share(cfg: "TrainConfig", world_size: int) -> int:
    """Generations of each prompt group per optimiser update: ``trajectory.samples_per_update`` spread evenly over
    the step's ``world_size · data.prompts_per_rank`` groups (the whole group where it is 0). Refused in one line
    where it does not divide."""
    n, total = cfg.sampling.group_size, cfg.trajectory.samples_per_update
    if cfg.method == "g2rpo" or total == 0:
        return n
    groups = world_size * cfg.data.prompts_per_rank
    share, rest = divmod(total, groups)
    if rest or share == 0 or n % share:
        raise ValueError(f"trajectory.samples_per_update={total}: generations per optimiser step across all ranks, "
                         f"taken evenly from the step's {groups} prompt groups ({world_size} rank(s) x "
                         f"data.prompts_per_rank={cfg.data.prompts_per_rank}); needs a multiple of {groups} whose "
                         f"share per group divides sampling.group_size={n}")
    return share


def _default(cls, name):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _check_method_fields(cfg: "TrainConfig") -> None:
    """The method exists, and no section or field set for another method is silently ignored."""
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r}: expected one of {', '.join(METHODS)}")
    unused = []
    if cfg.method == "g2rpo":
        unused += [name for name in ("trajectory", "window", "dense") if getattr(cfg, name) != _default(TrainConfig, name)]
        s = cfg.sampling
        bad = [k for k in s.branch_steps if not 0 <= k <= s.num_steps - 2]
        if bad:
            raise ValueError(f"sampling.branch_steps {bad}: each must be in 0..{s.num_steps - 2} (num_steps - 2) so "
                             f"that a completion step remains after the branch")
    else:
        for name in ("branch_steps", "granularities"):
            if getattr(cfg.sampling, name) != _default(SamplingConfig, name):
                unused.append(f"sampling.{name}")
        if cfg.ppo.update != "per_branch":
            unused.append("ppo.update")
        if cfg.method != "mixgrpo" and cfg.window != WindowConfig():
            unused.append("window")
        if cfg.window.post_compress < 1 and cfg.sampling.grid != "uniform":
            raise ValueError("window.post_compress < 1 (MixGRPO-Flash) compresses the uniform grid; it needs "
                             "sampling.grid=uniform")
        if cfg.method != "densegrpo" and cfg.dense != DenseConfig():
            unused.append("dense")
        if cfg.trajectory.noise == "psi" and not cfg.dense.psi_table:
            raise ValueError("trajectory.noise=psi needs dense.psi_table (write one with "
                             "scripts/densegrpo/calibrate_psi.py)")
    if unused:
        raise ValueError(f"method={cfg.method} does not use {', '.join(unused)}; remove it, or choose the method "
                         f"that does (README \"Methods\")")



# Config fields a resumed run may change: the new value takes effect from the resume step on and is
# logged there (config_history.jsonl and the console). Every other field must equal the checkpoint's,
# or the resume is refused with the list. A name ending in "." covers its whole section.
RESUME_MAY_CHANGE = (
    "max_steps", "checkpoint_every", "checkpoint_start", "keep_last", "save_dtype", "sample_every", "eval_every",
    "decode_batch_size", "io_timeout_minutes", "verify_checksums", "max_consecutive_skips", "resume", "overwrite",
    "output_dir",
    "optim.lr", "optim.max_grad_norm", "optim.lr_scheduler", "optim.warmup_steps",
    "engine.fsdp_sharding", "engine.activation_checkpointing", "engine.device", "engine.load_strategy",
    "engine.rollout_weights", "engine.compile_rollout", "ema.device", "ema.eval", "lora.export_merged", "eval.",
    "logging.",
    "sampling.order", "sampling.micro_batch", "trajectory.micro_batch",
    "data.index",  # the path; the content is compared on its own (g2rpo.checkpoint)
    "models.base.path", "models.hps.base_dir", "models.hps.checkpoint", "models.clip_score.path", "models.pickscore.",
    "models.imagereward.", "models.unifiedreward.",
)


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"a.b.c": value}`` over a nested dict (lists are values)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def resume_refusal(name: str, now: dict) -> str | None:
    """Why field ``name`` may not differ from the checkpoint's on resume under config ``now`` (flattened): ``""``
    when it is not in `RESUME_MAY_CHANGE`, a reason when only this run's setup forbids it, None when it may."""
    if name == "models.base.path" and (now.get("lora.rank") or now.get("ppo.kl_beta")):  # the base is in the model
        return (" (with lora.rank > 0 or ppo.kl_beta > 0 the checkpoint holds no base weights: the adapters, or the "
                "KL reference, are those of the base it was trained from)")
    if any(name == field or (field.endswith(".") and name.startswith(field)) for field in RESUME_MAY_CHANGE):
        return None
    return ""


def resume_differences(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """``(refused, changed)``: the fields that differ between a checkpoint's config and this run's, as
    ``"field: checkpoint A != now B"`` lines, split by `resume_refusal`. A field the checkpoint's config
    lacks (written before the field existed) counts as its default, so older checkpoints resume while the new
    option stays off."""
    a, b = flatten(saved), flatten(now)
    defaults = flatten(to_dict(TrainConfig()))
    refused, changed = [], []
    for name in sorted(set(a) | set(b)):
        old, new = a.get(name, defaults.get(name, "(absent)")), b.get(name, "(absent)")
        if old != new:
            line = f"{name}: checkpoint {old!r} != now {new!r}"
            reason = resume_refusal(name, b)
            (changed if reason is None else refused).append(line + (reason or ""))
    return refused, changed
