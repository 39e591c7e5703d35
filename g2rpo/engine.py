"""The trainable transformer under a parallel engine, behind one interface (`Engine`).

``build_engine(cfg, info, total_updates)`` loads the base model's transformer from the pipeline folder the
config names and returns one of:

* `FSDPEngine` (``engine.kind: fsdp``, the default, any number of processes including one):
  FSDP2 -- ``fully_shard`` on every transformer block (its family's ``block_classes``) and on the root, fp32
  master weights, a
  ``MixedPrecisionPolicy`` (bf16 parameters and all-gathers, fp32 gradient reduction; or fp32 under
  torch autocast, the reference's numerics) and optional ``CPUOffloadPolicy`` (the one-GPU option). The model is built on the meta device, sharded, and
  only then allocated and filled from the diffusers safetensors shard by shard: every rank reads
  just its own rows of each tensor (``engine.load_strategy: slices``) or rank 0 reads each tensor
  and broadcasts it (``broadcast``), so no rank ever holds the whole fp32 model in host or device
  memory. Parameter names stay the model's own.
* `DeepSpeedEngine` (``engine.kind: deepspeed``): ZeRO stage 2 or 3 around a torch AdamW, bf16 by
  torch autocast. Its start-up still loads the whole fp32 transformer on every rank's host.

Rollouts and held-out sampling run inside ``engine.rollout_policy()``. With ``engine.rollout_weights:
gathered`` (the default) FSDP unshards every unit once before them and reshards after -- the
weights gathered in the compute dtype, no second model, no collective per forward, memory released
before decoding -- and ZeRO-3 fills an unsharded copy (`RolloutWeights`) once per optimiser step.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from g2rpo.distributed import DistInfo, ensure_process_group, print0


def _no_mark(phase: str) -> None:
    pass


def persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a diffusers weights file stores beside the parameters (SD3: its fixed 2-D position table
    ``pos_embed.pos_embed``); FSDP2 does not shard them, so each rank holds them whole."""
    out = {}
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buffer
    return out


def shard_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a dim-0 ``Shard`` that ``rank`` holds: ``torch.chunk``'s split, as FSDP2 uses."""
    chunk = math.ceil(rows / world_size) if rows else 0
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


class Engine:
    """What the trainer needs from an engine; the parts every engine shares live here.

    ``module`` is what the update's forwards call (with gradients); ``rollout_policy()`` what
    rollouts call; ``backward`` / ``clip_grad_norm`` / ``step`` / ``skip_step`` make one optimiser
    update; ``save_state`` / ``load_state`` the resumable state; ``gather_params`` the full weights
    for an export, each rank keeping the ones it writes.
    """

    module: torch.nn.Module
    config: dict  # the transformer's diffusers config
    autocast_dtype: torch.dtype | None = None  # torch autocast around forwards (DeepSpeed; FSDP in "autocast" mode)
    ema = None  # g2rpo.ema.ShardedEMA of the trained weights (FSDP, ema.decay > 0), updated by every step
    lora = None  # the LoRAConfig when only peft adapters train (FSDP, lora.rank > 0; g2rpo.lora)

    def __init__(self, engine_cfg, optim_cfg, total_updates: int, info: DistInfo):
        self.cfg, self.info = engine_cfg, info
        self.max_grad_norm = optim_cfg.max_grad_norm
        self.optim_cfg, self.total_updates = optim_cfg, total_updates
        self.version = 0  # bumped whenever the parameters change (optimiser step, state load)
        self._compiled = None

    def _make_optimizer(self, params):
        from diffusers.optimization import get_scheduler

        o = self.optim_cfg
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
        self.scheduler = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.warmup_steps,
                                       num_training_steps=self.total_updates)
        return optimizer

    # ------------------------------------------------------------------ forwards

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    def _rollout_module(self) -> torch.nn.Module:
        return self.module

    @contextlib.contextmanager
    def _gathered(self):
        yield

    @contextlib.contextmanager
    def rollout_policy(self):
        """``with engine.rollout_policy() as policy:`` -- the module that rollouts and sampling call.

        Inside, the weights are gathered if ``engine.rollout_weights=gathered``, the module is in eval
        mode and the engine's autocast is on; torch.compiled if ``engine.compile_rollout``. Leaving
        releases the gathered weights and restores train mode. Collective: every rank enters together.
        """
        with self._gathered():
            module = self._rollout_module()
            if self.cfg.compile_rollout and (self._compiled is None or self._compiled._orig_mod is not module):
                self._compiled = torch.compile(module)  # parameters are graph inputs: updates need no recompile
            module.eval()
            try:
                with self.autocast():
                    yield self._compiled if self.cfg.compile_rollout else module
            finally:
                module.train()

    def mark_weights_changed(self) -> None:
        """Call after changing the parameters outside ``step`` / ``load_state``."""
        self.version += 1

    # ------------------------------------------------------------------ interface

    accumulates_backward = True
    """whether several ``backward`` calls may accumulate into one ``step`` (FSDP2: yes; DeepSpeed: no, its
    micro-step bookkeeping expects one backward per step here)."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self) -> torch.Tensor:
        """Clip the gradients to ``max_grad_norm``; the total norm before clipping (equal on every rank)."""
        raise NotImplementedError

    def step(self) -> torch.Tensor | None:
        """Optimiser and scheduler step, then zero the gradients; an engine that clips itself returns its norm."""
        raise NotImplementedError

    def skip_step(self) -> None:
        """Drop the accumulated gradients without changing any parameter."""
        raise NotImplementedError

    def save_state(self, folder: Path, group=None) -> None:
        """Model + optimiser (+ the LR scheduler, rank 0) into ``folder``. Collective over ``group``."""
        raise NotImplementedError

    def load_state(self, folder: Path, group=None) -> None:
        raise NotImplementedError

    def gather_params(self, dtype: torch.dtype, owners: dict[str, int], ema: bool = False) -> dict[str, torch.Tensor]:
        """Full parameters in ``dtype`` on the CPU: the ones ``owners`` assigns to this rank (``ema``: of the
        averaged weights). Collective."""
        raise NotImplementedError

    def param_sizes(self) -> dict[str, int]:
        """``{name: numel}`` of every parameter of the exported transformer in model order (for planning an export;
        with LoRA: the merged model's)."""
        from g2rpo.lora import base_name, is_lora

        return {base_name(name): p.numel() for name, p in self.module.named_parameters() if not is_lora(name)}

    def trainable_numel(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)

    def fixed_buffers(self) -> dict[str, torch.Tensor]:
        """The exported transformer's persistent buffers (whole, on the CPU): written beside the parameters."""
        module = self.module.module if hasattr(self.module, "module") and not hasattr(self.module, "config") \
            else self.module
        return {name: b.detach().cpu() for name, b in persistent_buffers(module).items()}

    def _save_scheduler(self, folder: Path) -> None:
        if self.info.is_main:
            _torch_save_atomic(self.scheduler.state_dict(), folder / "scheduler.pt")

    def _load_scheduler(self, folder: Path) -> None:
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        self._apply_lr(self.optim_cfg.lr)

    def _apply_lr(self, lr: float) -> None:
        """Make ``optim.lr`` of this run the schedule's base rate after a resume (the saved optimiser and
        scheduler states carry the old run's): the rate at the current update follows the schedule."""
        scheduler = self.scheduler
        if all(base == lr for base in scheduler.base_lrs):
            return
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
        for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


# --------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------


class FSDPEngine(Engine):
    """FSDP2 over all processes (one included), built on the meta device and filled from safetensors."""

    def __init__(self, weights_folder: Path, engine_cfg, optim_cfg, total_updates: int, info: DistInfo,
                 mark=_no_mark, reference: bool = False, ema_cfg=None, lora_cfg=None, seed: int = 0):
        from g2rpo.models import SafetensorsFolder, transformer_family

        super().__init__(engine_cfg, optim_cfg, total_updates, info)
        ensure_process_group(info)
        weights = SafetensorsFolder(weights_folder)
        self.family = transformer_family(weights_folder)
        self.config = self.family.transformer_cls().load_config(weights_folder)
        self.autocast_dtype = torch.bfloat16 if engine_cfg.mixed_precision == "autocast" else None
        self.lora, self.seed = (lora_cfg if lora_cfg is not None and lora_cfg.rank else None), seed
        self.module, self.units = self._sharded_model(weights, weights_folder, trainable=True, mark=mark)
        self.module.train()
        self.optimizer = self._make_optimizer([p for p in self.module.parameters() if p.requires_grad])
        if reference and self.lora is None:  # with LoRA the reference is the base: the adapters disabled
            self.reference, self.reference_units = self._sharded_model(weights, weights_folder, trainable=False)
            mark("reference")
        if ema_cfg is not None and ema_cfg.decay:
            from g2rpo.ema import ShardedEMA

            self.ema = ShardedEMA(self.module, ema_cfg.decay, ema_cfg.update_every, ema_cfg.warmup, ema_cfg.device)
            mark("ema")
        # FSDP2 warns on every block that returns a view; the blocks and our code never modify a block's
        # output in place (the FSDP / one-process gradient equality tests would catch it), so it is noise.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

    def _sharded_model(self, weights, weights_folder: Path, trainable: bool, mark=_no_mark):
        """The transformer built on the meta device, ``fully_shard``-ed per block and at the root, then filled
        from the safetensors; returns ``(model, its FSDP units, root last)``. The frozen reference
        (``trainable=False``: no gradients, eval mode, no activation checkpointing) stores its shards in the
        compute dtype -- bf16 under ``mixed_precision: bf16``, the values the trained model's all-gathers cast
        its fp32 shards to -- so it costs half the trained shards' memory and computes what they computed."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        engine_cfg, info = self.cfg, self.info
        with torch.device("meta"):
            model = self.family.transformer_cls().from_config(self.config)
        param_dtype = torch.bfloat16 if engine_cfg.mixed_precision == "bf16" else None
        if trainable and engine_cfg.activation_checkpointing:
            model.enable_gradient_checkpointing()  # diffusers' own: keeps the parameter names unchanged
        if trainable and self.lora is not None:
            from g2rpo.lora import LoraSource, add_lora

            add_lora(model, self.lora)  # only the adapters require gradients
            weights = LoraSource(weights, {n: tuple(p.shape) for n, p in model.named_parameters()}, self.seed,
                                 self.lora.init)
        if not trainable:
            model.requires_grad_(False).eval()
        if param_dtype is not None:  # frozen weights (the LoRA base, the KL reference) in the compute dtype
            for param in model.parameters():
                if not param.requires_grad:
                    param.data = param.data.to(param_dtype)
        policy = dict(mesh=init_device_mesh(info.device.type, (info.world_size,)),
                      mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
                      offload_policy=CPUOffloadPolicy(pin_memory=info.device.type == "cuda") if engine_cfg.offload
                      else OffloadPolicy())
        reshard = engine_cfg.fsdp_sharding == "full_shard" or not trainable
        units = [m for m in model.modules() if isinstance(m, self.family.blocks())]
        for block in units:
            fully_shard(block, reshard_after_forward=reshard, **policy)
        fully_shard(model, **policy)  # the root: embedders, final norm and projection
        units.append(model)
        model.to_empty(device="cpu" if engine_cfg.offload else info.device)  # allocates this rank's shards only
        mark("wrap")
        buffers = persistent_buffers(model)
        weights.check_names([n for n, _ in model.named_parameters()] + list(buffers),
                            f"{self.family.title} transformer {weights_folder}")
        fill = _fill_from_slices if engine_cfg.load_strategy == "slices" else _fill_from_broadcast
        fill(model, weights, info)
        with torch.no_grad():
            for name, buffer in buffers.items():  # whole on every rank; a few KB
                _copy_checked(buffer, weights.read(name).to(buffer.dtype), name, weights)
        mark("load")
        return model, units

    @contextlib.contextmanager
    def reference_policy(self):
        """``with engine.reference_policy() as ref:`` -- the frozen initial transformer (``ppo.kl_beta > 0``),
        under the engine's autocast; its units are resharded on leaving. With LoRA it is the trained model with
        its adapters disabled (the base weights, untouched by training). Collective (sharded forwards)."""
        if self.lora is not None:
            from g2rpo.lora import adapters_disabled

            with adapters_disabled(self.module), self.autocast(), torch.no_grad():
                yield self.module
            return
        try:
            with self.autocast(), torch.no_grad():
                yield self.reference
        finally:
            for unit in self.reference_units:
                unit.reshard()

    @contextlib.contextmanager
    def _gathered(self):
        """Unshard every unit once (in the compute dtype) and keep them so; reshard on leaving."""
        gather = self.cfg.rollout_weights == "gathered"
        try:
            if gather:
                for unit in self.units:
                    unit.set_reshard_after_forward(False, recurse=False)
                for unit in self.units:
                    unit.unshard()
            yield
        finally:
            reshard = self.cfg.fsdp_sharding == "full_shard"
            for unit in self.units:  # also after sharded rollouts: a no-grad forward may leave units unsharded
                unit.reshard()
                if gather and unit is not self.module:
                    unit.set_reshard_after_forward(reshard, recurse=False)
            if gather:
                self.module.set_reshard_after_forward(False, recurse=False)  # FSDP2's default for the root

    def clip_grad_norm(self) -> torch.Tensor:
        """As ``torch.nn.utils.clip_grad_norm_`` over the whole model, computed on the local gradient shards: the
        squared norms are summed over ranks on the compute device (offloaded shards live on the CPU, where NCCL
        cannot reduce them), then every shard is scaled in place."""
        shards = [p.grad.to_local() for p in self.module.parameters() if p.grad is not None]
        squared = torch.zeros((), device=self.info.device)
        if shards:
            squared += torch.stack(torch._foreach_norm(shards)).to(self.info.device, torch.float32).pow(2).sum()
        if dist.get_world_size() > 1:
            dist.all_reduce(squared)
        norm = squared.sqrt()
        coefficient = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        for device, group in _by_device(shards).items():
            torch._foreach_mul_(group, coefficient.to(device))
        return norm.detach().cpu()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        self.mark_weights_changed()

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _state_options(self):
        """The trainable parameters only (LoRA: the adapters; the base is the pipeline's). Not strict on loading:
        the frozen ones are not in the state, and DCP has already failed for any trainable one missing."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=True, strict=False)

    def _dcp_state(self) -> dict:
        """The tree a DCP checkpoint holds: the model's and the optimiser's state dicts (under LoRA the adapters'
        only) and the EMA's shards."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer, options=self._state_options())
        state = {"model": model_state, "optim": optim_state}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save_state(self, folder: Path, group=None) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(), checkpoint_id=str(folder / "fsdp"), process_group=group)
        self._save_scheduler(folder)

    def load_state(self, folder: Path, group=None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._dcp_state()  # the EMA is loaded into the average's own shards
        dcp.load(state, checkpoint_id=str(folder / "fsdp"), process_group=group)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self._state_options())
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self._load_scheduler(folder)
        self.mark_weights_changed()

    def _full(self, param, dtype: torch.dtype) -> torch.Tensor:
        """The whole of a sharded parameter in ``dtype`` on the compute device. Collective."""
        from torch.distributed.tensor import DTensor

        local = param.to_local().detach().to(self.info.device, dtype)  # offloaded shards: NCCL gathers on the GPU
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                                  stride=param.stride()).full_tensor()

    def gather_params(self, dtype: torch.dtype, owners: dict[str, int], ema: bool = False) -> dict[str, torch.Tensor]:
        """With LoRA: the merged weights ``W + (alpha / rank) · B A`` under the base names."""
        from g2rpo.lora import base_name, is_lora, merged_weight, scale

        averaged = self.ema.shadow if ema else {}  # a frozen parameter has no average: its (constant) value
        adapters = self.lora_state(ema) if self.lora is not None else {}
        mine = {}
        for name, param in self.module.named_parameters():
            if is_lora(name):
                continue
            source = averaged.get(name, param)
            full = self._full(source, source.dtype if adapters else dtype)  # collective: on every rank
            if owners[base_name(name)] != self.info.rank:
                continue
            layer = name.removesuffix(".base_layer.weight")
            if layer != name:  # merged in fp32 on the rank that writes it
                full = merged_weight(full.float(), adapters[f"{layer}.lora_A.default.weight"],
                                     adapters[f"{layer}.lora_B.default.weight"], scale(self.lora))
            mine[base_name(name)] = full.to(dtype).cpu()
        return mine

    def lora_state(self, ema: bool = False) -> dict[str, torch.Tensor]:
        """Every adapter tensor, whole, fp32, on the compute device of every rank (``ema``: the averaged ones; peft
        names). Collective."""
        from g2rpo.lora import is_lora

        averaged = self.ema.shadow if ema else {}
        return {name: self._full(averaged.get(name, param), torch.float32)
                for name, param in self.module.named_parameters() if is_lora(name)}


def _by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.device, []).append(tensor)
    return groups


@torch.no_grad()
def _fill_from_slices(model, weights, info: DistInfo) -> None:
    """Every rank reads only the rows of each tensor its shard holds."""
    for name, param in model.named_parameters():
        local = param.to_local()
        rows = shard_rows(param.shape[0], info.world_size, info.rank) if param.dim() else None
        _copy_checked(local, weights.read(name, rows), name, weights)


@torch.no_grad()
def _fill_from_broadcast(model, weights, info: DistInfo) -> None:
    """Rank 0 reads each whole tensor and broadcasts it; every rank keeps its rows."""
    comm = info.device
    for name, param in model.named_parameters():
        if info.is_main:
            full = weights.read(name).to(comm, torch.float32)
        else:
            full = torch.empty(param.shape, dtype=torch.float32, device=comm)
        if info.world_size > 1:
            dist.broadcast(full, src=0)
        start, end = shard_rows(param.shape[0], info.world_size, info.rank) if param.dim() else (None, None)
        _copy_checked(param.to_local(), full[start:end] if param.dim() else full, name, weights)
        del full


def _copy_checked(local: torch.Tensor, value: torch.Tensor, name: str, weights) -> None:
    if tuple(local.shape) != tuple(value.shape):
        raise ValueError(f"{weights.files[name]}: tensor {name!r} has shape {weights.shapes[name]}, the model "
                         f"expects another (this rank's shard {tuple(local.shape)}, read {tuple(value.shape)}); "
                         f"is the transformer config.json the one these weights were saved with?")
    local.copy_(value)


# --------------------------------------------------------------------------------------------
# DeepSpeed
# --------------------------------------------------------------------------------------------


class RolloutWeights:
    """An unsharded, no-grad copy of a ZeRO-3 policy for rollouts, refreshed once per optimiser step.

    Its Linear weights and biases are stored in the autocast dtype (bf16) -- exactly what autocast
    would round them to on every call -- and everything else (the RMSNorm scales) in float32, so
    under the same autocast it gives the sharded module's outputs without re-gathering or re-casting
    the weights per forward. Costs one copy of the transformer per rank (FLUX.1-dev: 23.8 GB in bf16).
    """

    def __init__(self, model: torch.nn.Module, compute_dtype: torch.dtype | None, device: torch.device):
        with torch.device("meta"):
            replica = type(model).from_config(model.config)
        if compute_dtype is not None:  # cast before allocating: never hold the copy in fp32
            for layer in replica.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.to(compute_dtype)
        replica.to_empty(device=device)
        with torch.no_grad():  # the fixed buffers (SD3's position table): the policy's own, unsharded
            for name, buffer in persistent_buffers(replica).items():
                buffer.copy_(persistent_buffers(model)[name])
        # the policy's attention processors (any the user set), matched by position: wrappers add no attention layers
        sources = [m for m in model.modules() if hasattr(m, "set_processor")]
        targets = [m for m in replica.modules() if hasattr(m, "set_processor")]
        if len(sources) != len(targets):
            raise RuntimeError(f"rollout weights: the policy has {len(sources)} attention layers, "
                               f"its copy {len(targets)}")
        for source, target in zip(sources, targets):
            target.set_processor(source.processor)
        self.module = replica.eval().requires_grad_(False)
        self._params = dict(replica.named_parameters())
        self.nbytes = sum(p.numel() * p.element_size() for p in self._params.values())
        self.version = -1  # the engine's parameter version these weights hold

    @torch.no_grad()
    def load(self, full_params, version: int) -> None:
        """Copy ``(name, full tensor)`` pairs in; every parameter of the copy must be given exactly once."""
        missing = set(self._params)
        for name, tensor in full_params:
            if name not in missing:
                what = "twice" if name in self._params else "but the copy has no such parameter"
                raise RuntimeError(f"rollout weights: {name!r} was gathered {what}")
            self._params[name].copy_(tensor)
            missing.discard(name)
        if missing:
            raise RuntimeError(f"rollout weights: no value gathered for {sorted(missing)[:3]} ({len(missing)} in all)")
        self.version = version


def _zero3_full_params(model):
    """``(name, full parameter)`` of a DeepSpeed ZeRO-3 model, gathering one layer's parameters at a time."""
    import deepspeed

    for prefix, layer in model.named_modules():
        own = list(layer.named_parameters(recurse=False))
        if own:
            with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
                for name, p in own:
                    yield f"{prefix}.{name}" if prefix else name, p


def _skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed's CPU accelerator from JIT-compiling its shared-memory all-reduce op.

    On the CPU, DeepSpeed's comm backend g++-compiles ``deepspeed_shm_comm`` when it starts (1-2 min on a
    2-core machine, again for every new virtual environment). Only its tensor-parallel *inference*
    all-reduce (``deepspeed.comm.inference_all_reduce``) calls that op; ZeRO's gradient and parameter
    collectives go through torch.distributed (gloo) either way, so marking the op unavailable, as DeepSpeed
    itself does off Linux, changes no number. GPUs use NCCL and never build it.
    """
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__  # probed once per process, read by deepspeed.comm
    if "deepspeed_shm_comm" in compatible:
        compatible["deepspeed_shm_comm"] = False


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-2/3 around a torch AdamW (no fused-op compilation), bf16 by torch autocast."""

    def __init__(self, weights_folder: Path, engine_cfg, optim_cfg, total_updates: int, info: DistInfo,
                 mark=_no_mark):
        import os

        # DeepSpeed guesses its accelerator on import and warns when it falls back to the CPU: name it. Its ZeRO
        # collectives call torch names that torch has deprecated (all_gather_into_tensor, reduce_scatter_tensor),
        # a warning per call under ZeRO-3: DeepSpeed's to change, not ours.
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if info.device.type == "cuda" else "cpu")
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated\. Please use "
                                r"`torch\.distributed\.\w+` instead", category=FutureWarning)
        import deepspeed

        from g2rpo.models import load_transformer, transformer_family

        super().__init__(engine_cfg, optim_cfg, total_updates, info)
        ensure_process_group(info)
        self.family = transformer_family(weights_folder)
        model = load_transformer(weights_folder, "float32").to(info.device).train()  # the whole fp32 model per rank
        mark("load")
        self.config = model.config
        self.autocast_dtype = None if engine_cfg.mixed_precision == "fp32" else torch.bfloat16
        if engine_cfg.activation_checkpointing:
            model.enable_gradient_checkpointing()
        zero = {"stage": engine_cfg.zero_stage}
        if engine_cfg.offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            if engine_cfg.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        ds_config = {
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "gradient_clipping": optim_cfg.max_grad_norm, "zero_optimization": zero,
            "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
        }
        base = self._make_optimizer(model.parameters())  # a torch optimizer: no FusedAdam compilation
        if info.device.type == "cpu":
            _skip_cpu_shm_comm_op()
        self.module, _, _, _ = deepspeed.initialize(model=model, optimizer=base, config=ds_config,
                                                    dist_init_required=False)
        self.optimizer = base  # ZeRO steps it and shares its param_groups; the LR scheduler drives those
        mark("wrap")
        self.zero3 = engine_cfg.zero_stage == 3
        # allocated after wrapping, so that the full model ZeRO-3 partitioned is gone first
        self.replica = RolloutWeights(self.module.module, self.autocast_dtype, info.device) \
            if self.zero3 and engine_cfg.rollout_weights == "gathered" else None

    def _rollout_module(self) -> torch.nn.Module:
        if self.replica is None:
            return self.module.module if self.cfg.compile_rollout else self.module
        if self.replica.version != self.version:
            self.replica.load(_zero3_full_params(self.module.module), self.version)
        return self.replica.module

    accumulates_backward = False

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)

    def clip_grad_norm(self) -> torch.Tensor:
        return torch.zeros(())  # DeepSpeed clips inside its step (gradient_clipping); `step` returns the norm

    def step(self) -> torch.Tensor:
        self.module.step()  # clips, steps, zeroes
        value = self.module.get_global_grad_norm()
        self.scheduler.step()
        self.mark_weights_changed()
        return torch.tensor(float(value) if value is not None else float("nan"))

    def skip_step(self) -> None:
        self.module.zero_grad()

    def save_state(self, folder: Path, group=None) -> None:
        self.module.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False)
        self._save_scheduler(folder)

    def load_state(self, folder: Path, group=None) -> None:
        path, _ = self.module.load_checkpoint(str(folder / "deepspeed"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"{folder / 'deepspeed'}: DeepSpeed found no checkpoint to load")
        self._load_scheduler(folder)
        self.mark_weights_changed()

    def param_sizes(self) -> dict[str, int]:
        return {name: (p.ds_numel if hasattr(p, "ds_numel") else p.numel())
                for name, p in self.module.module.named_parameters()}

    def trainable_numel(self) -> int:
        return sum(self.param_sizes().values())  # no LoRA under DeepSpeed: everything trains

    def gather_params(self, dtype: torch.dtype, owners: dict[str, int], ema: bool = False) -> dict[str, torch.Tensor]:
        params = _zero3_full_params(self.module.module) if self.zero3 else self.module.module.named_parameters()
        return {name: p.detach().to("cpu", dtype).clone() for name, p in params if owners[name] == self.info.rank}


# --------------------------------------------------------------------------------------------


def build_engine(cfg, info: DistInfo, total_updates: int, mark=_no_mark) -> Engine:
    """The engine ``cfg.engine.kind`` names, holding the transformer of ``cfg.models.base.path``.

    ``mark(phase)`` is called as start-up phases end ("wrap", "load"), e.g. `g2rpo.memory.PhaseMeter.mark`.
    """
    folder = Path(cfg.models.base.path) / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"transformer: {folder} has no config.json; expected a diffusers pipeline "
                                f"folder at models.base.path={cfg.models.base.path}")
    if cfg.engine.kind == "fsdp":
        engine = FSDPEngine(folder, cfg.engine, cfg.optim, total_updates, info, mark, reference=cfg.ppo.kl_beta > 0,
                            ema_cfg=cfg.ema, lora_cfg=cfg.lora, seed=cfg.seed)
    else:
        engine = DeepSpeedEngine(folder, cfg.engine, cfg.optim, total_updates, info, mark)
    lora = f" (LoRA rank {cfg.lora.rank}: {engine.trainable_numel():,} trained)" if engine.lora is not None else ""
    print0(f"engine: {cfg.engine.kind} over {info.world_size} process(es), {sum(engine.param_sizes().values()):,} "
           f"parameters{lora}, mixed precision {cfg.engine.mixed_precision}, rollout weights {cfg.engine.rollout_weights}")
    return engine


def _torch_save_atomic(obj, path) -> None:
    import io

    from g2rpo.io import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
