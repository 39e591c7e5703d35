"""Everything about processes and ranks: init/teardown, collectives, and wrapping the policy.

This is the only module that reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK).
Engines (``EngineConfig.kind``):

* ``fsdp`` -- FSDP (FULL_SHARD by default) with each FLUX block its own unit, fp32 master weights,
  bf16 autocast on CUDA, optional activation checkpointing on the blocks; gloo on CPU, NCCL on GPU.
* ``deepspeed`` -- ZeRO stage 2 or 3 around a torch AdamW (no fused-op compilation).
* ``ddp`` -- DistributedDataParallel, or the plain module when there is one process.

Rollouts of a sharded engine (FSDP over several processes, ZeRO-3) run by default on a gathered
copy (`RolloutWeights`, ``engine.rollout_weights``) instead of the wrapper, which would all-gather
every block on every one of a step's ~140 forwards.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun job (if any). ``device``: "cpu", "cuda", or None for cuda when available."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but torch.cuda.is_available() is False")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", store=_rendezvous_store(rank, world_size),
                                rank=rank, world_size=world_size, device_id=dev if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, dev)


def _rendezvous_store(rank: int, world_size: int, timeout_minutes: int = 30):
    """The env:// store, with keys namespaced by torchrun's restart count.

    Under ``torchrun --max-restarts`` the agent's store outlives a failed attempt; without the
    prefix a restarted rank can read a dead peer's address from the previous attempt and fail to
    connect (seen with gloo).
    """
    from datetime import timedelta

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                          world_size, is_master=not agent_store and rank == 0,
                          timeout=timedelta(minutes=timeout_minutes), multi_tenant=not agent_store)
    return dist.PrefixStore(f"g2rpo/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """Reduce a tensor over ranks (returns a new tensor; identity for one process)."""
    out = tensor.detach().clone().float()
    if is_distributed():
        backend_device = out.device
        if dist.get_backend() == "nccl" and backend_device.type != "cuda":
            out = out.cuda()
        dist.all_reduce(out, op={"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        if op == "mean":
            out /= dist.get_world_size()
        out = out.to(backend_device)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (identity for one process)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank."""
    return bool(all_reduce(torch.tensor(float(flag)), "max").item() > 0)


def print0(*args, **kwargs) -> None:
    if not is_distributed() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def teardown(exit_code: int = 0) -> None:
    """End a CLI process cleanly. gloo can crash at interpreter exit, so leave with ``os._exit``."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


# --------------------------------------------------------------------------------------------
# Wrapping the trainable policy
# --------------------------------------------------------------------------------------------


def _flux_block_classes():
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    return (FluxTransformerBlock, FluxSingleTransformerBlock)


class RolloutWeights:
    """An unsharded, no-grad copy of the policy for rollouts, refreshed once per optimiser step.

    Its Linear weights and biases are stored in the autocast dtype (bf16 on CUDA) -- exactly what
    autocast would round them to on every call -- and everything else (the RMSNorm scales) in
    float32, so under the same autocast it gives the sharded module's outputs without re-gathering
    or re-casting the weights per forward. Costs one copy of the transformer per rank (FLUX.1-dev:
    23.8 GB in bf16, 47.6 GB without autocast). ``PolicyEngine.rollout_policy()`` refreshes and uses it.
    """

    def __init__(self, model: torch.nn.Module, compute_dtype: torch.dtype | None, device: torch.device):
        with torch.device("meta"):
            replica = type(model).from_config(model.config)
        if compute_dtype is not None:  # cast before allocating: never hold the copy in fp32
            for layer in replica.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.to(compute_dtype)
        replica.to_empty(device=device)
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


def _fsdp_full_params(root):
    """``(name, full parameter)`` of an FSDP model, gathering one FSDP unit at a time (peak: one block)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    names = {id(p): _clean_key(n) for n, p in root.named_parameters()}
    for unit in FSDP.fsdp_modules(root):
        nested = {id(p) for sub in FSDP.fsdp_modules(unit) if sub is not unit for p in sub.parameters()}
        own = [p for p in unit.parameters() if id(p) not in nested]
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for p in own:
                yield names[id(p)], p


def _zero3_full_params(model):
    """``(name, full parameter)`` of a DeepSpeed ZeRO-3 model, gathering one layer's parameters at a time."""
    import deepspeed

    for prefix, layer in model.named_modules():
        own = list(layer.named_parameters(recurse=False))
        if own:
            with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
                for name, p in own:
                    yield f"{prefix}.{name}" if prefix else name, p


class PolicyEngine:
    """The trainable transformer under an engine, with its optimiser and LR scheduler.

    ``module`` is what to call for forwards (the wrapper); ``backward``, ``step`` (clip + optimiser
    + scheduler + zero-grad) and ``full_state_dict`` hide the engine differences.
    """

    def __init__(self, model: torch.nn.Module, engine_cfg, optim_cfg, total_updates: int, info: DistInfo):
        from diffusers.optimization import get_scheduler

        self.kind = engine_cfg.kind
        self.info = info
        self.fsdp = self.kind == "fsdp" and info.world_size > 1  # one process runs the plain module
        self.max_grad_norm = optim_cfg.max_grad_norm
        self.autocast_dtype = torch.bfloat16 if (info.device.type == "cuda" and engine_cfg.mixed_precision == "bf16") \
            else None
        self.version = 0  # bumped whenever the parameters change (optimiser step, state load)
        self.raw = model
        model = model.to(info.device).float().train()  # fp32 master weights
        blocks = _flux_block_classes()
        if engine_cfg.activation_checkpointing and not self.fsdp:
            model.enable_gradient_checkpointing()  # FSDP wraps its blocks with checkpoint_wrapper below

        def adamw(params):
            return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                                     weight_decay=optim_cfg.weight_decay, eps=optim_cfg.eps)

        if self.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import ShardingStrategy
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            strategy = {"full_shard": ShardingStrategy.FULL_SHARD, "shard_grad_op": ShardingStrategy.SHARD_GRAD_OP,
                        "no_shard": ShardingStrategy.NO_SHARD}[engine_cfg.fsdp_sharding]
            self.module = FSDP(model, auto_wrap_policy=ModuleWrapPolicy(set(blocks)), sharding_strategy=strategy,
                               device_id=info.device, use_orig_params=True, limit_all_gathers=True)
            if engine_cfg.activation_checkpointing:
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
                    CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

                apply_activation_checkpointing(
                    self.module, checkpoint_wrapper_fn=functools.partial(
                        checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                    check_fn=lambda m: isinstance(m, blocks))
            self.optimizer = adamw(self.module.parameters())
        elif self.kind == "deepspeed":
            import deepspeed

            ds_config = {
                "train_micro_batch_size_per_gpu": 1,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": optim_cfg.max_grad_norm,
                "zero_optimization": {"stage": engine_cfg.zero_stage},
                "zero_force_ds_cpu_optimizer": False,
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 2**31 - 1,
                "wall_clock_breakdown": False,
            }
            if engine_cfg.offload:
                ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
                if engine_cfg.zero_stage == 3:
                    ds_config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
            base = adamw(model.parameters())  # a torch optimizer: no FusedAdam compilation
            self.module, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=base, config=ds_config, dist_init_required=False)
            self.optimizer = base  # ZeRO steps it and shares its param_groups; the LR scheduler drives those
        elif info.world_size > 1:  # ddp
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.module = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
            self.optimizer = adamw(self.module.parameters())
        else:
            self.module = model
            self.optimizer = adamw(self.module.parameters())
        self.scheduler = get_scheduler(optim_cfg.lr_scheduler, self.optimizer,
                                       num_warmup_steps=optim_cfg.warmup_steps, num_training_steps=total_updates)
        # after wrapping, so that the full model the wrapper sharded is gone before the copy is allocated
        zero3 = self.kind == "deepspeed" and engine_cfg.zero_stage == 3
        self.replica = RolloutWeights(self.raw, self.autocast_dtype, info.device) \
            if engine_cfg.rollout_weights == "gathered" and (self.fsdp or zero3) else None
        self.compile_rollout = engine_cfg.compile_rollout
        self._compiled = None
        if self.replica is not None and info.device.type == "cuda" and self.autocast_dtype is None:
            print0(f"warning: engine.rollout_weights=gathered with mixed_precision=no keeps an fp32 copy of the "
                   f"transformer on every GPU ({self.replica.nbytes / 1e9:.1f} GB); set engine.rollout_weights=sharded "
                   f"if memory is short")

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The transformer inside a DDP or DeepSpeed wrapper (not for sharded FSDP)."""
        return self.module.module if hasattr(self.module, "module") else self.module

    @contextlib.contextmanager
    def rollout_policy(self):
        """``with engine.rollout_policy() as policy:`` -- the module that rollouts and sampling call.

        That is the gathered copy (re-gathered first if the weights changed since), else ``module``;
        torch.compiled if ``engine.compile_rollout``. Inside, ``module`` is in eval mode and the
        engine's autocast is on; leaving restores train mode.

        Collective when a refresh is due: every rank must enter it at the same point.
        """
        if self.replica is None:
            module = self.unwrapped if self.compile_rollout else self.module
        else:
            if self.replica.version != self.version:
                params = _fsdp_full_params(self.module) if self.fsdp else _zero3_full_params(self.unwrapped)
                self.replica.load(params, self.version)
            module = self.replica.module
        if self.compile_rollout and (self._compiled is None or self._compiled._orig_mod is not module):
            self._compiled = torch.compile(module)  # parameters are graph inputs: in-place updates need no recompile
        self.module.eval()
        try:
            with self.autocast():
                yield self._compiled if self.compile_rollout else module
        finally:
            self.module.train()

    def mark_weights_changed(self) -> None:
        """Call after changing the parameters outside ``step`` / ``load_state``: the next rollout re-gathers."""
        self.version += 1

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if self.kind == "deepspeed":
            self.module.backward(loss)
        else:
            loss.backward()

    def clip_grad_norm(self) -> torch.Tensor:
        """Clip the gradients to ``max_grad_norm``; returns the total norm before clipping (same on every rank).

        DeepSpeed clips inside its own step, so there this returns NaN-free 0 and `step` clips.
        """
        if self.kind == "deepspeed":
            return torch.zeros(())
        if hasattr(self.module, "clip_grad_norm_"):  # FSDP: norm over all shards
            norm = self.module.clip_grad_norm_(self.max_grad_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        return norm.detach().float().cpu()

    def step(self) -> torch.Tensor | None:
        """Optimiser and scheduler step, then zero the gradients; returns DeepSpeed's grad norm (else None)."""
        norm = None
        if self.kind == "deepspeed":
            self.module.step()  # clips by gradient_clipping, steps, zeroes
            value = self.module.get_global_grad_norm()
            norm = torch.tensor(float(value) if value is not None else float("nan"))
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.mark_weights_changed()
        return norm

    def skip_step(self) -> None:
        """Drop the accumulated gradients without changing any parameter."""
        if self.kind == "deepspeed":
            self.module.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ resumable state

    def save_state(self, folder) -> None:
        """Model + optimiser + LR scheduler into ``folder``. Collective: every rank calls it."""
        from pathlib import Path

        folder = Path(folder)
        if self.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(self.module, self.optimizer)
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / "fsdp"))
        elif self.kind == "deepspeed":
            self.module.save_checkpoint(str(folder / "deepspeed"), tag="state", save_latest=False)
        elif self.info.is_main:
            from g2rpo.io import save_safetensors

            module = self.unwrapped
            save_safetensors(module.state_dict(), folder / "model.safetensors")
            _torch_save_atomic(self.optimizer.state_dict(), folder / "optimizer.pt")
        if self.info.is_main:
            _torch_save_atomic(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load_state(self, folder) -> None:
        from pathlib import Path

        from g2rpo.io import load_state_dict_file

        folder = Path(folder)
        if self.fsdp:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optim_state = get_state_dict(self.module, self.optimizer)
            state = {"model": model_state, "optim": optim_state}
            dcp.load(state, checkpoint_id=str(folder / "fsdp"))
            set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
        elif self.kind == "deepspeed":
            path, _ = self.module.load_checkpoint(str(folder / "deepspeed"), tag="state", load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
            if path is None:
                raise ValueError(f"{folder / 'deepspeed'}: DeepSpeed found no checkpoint to load")
        else:
            module = self.unwrapped
            module.load_state_dict(load_state_dict_file(folder / "model.safetensors", "model state"), strict=True)
            self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.info.device,
                                                      weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        self.mark_weights_changed()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The unsharded fp32 weights on rank 0 (None on other ranks). Collective: call on every rank."""
        if self.fsdp:
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            # offload_to_cpu=True segfaults with gloo on CPU; on CUDA it keeps GPU memory flat
            config = FullStateDictConfig(offload_to_cpu=self.info.device.type == "cuda", rank0_only=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # FSDP1's state_dict_type deprecation notice
                with FSDP.state_dict_type(self.module, StateDictType.FULL_STATE_DICT, config):
                    state = self.module.state_dict()
        elif self.kind == "deepspeed" and self.module.zero_optimization_stage() == 3:
            import deepspeed

            state = {}
            for name, param in self.unwrapped.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if self.info.is_main:
                        state[name] = param.detach().cpu().clone()
            for name, buf in self.unwrapped.named_buffers():
                state[name] = buf.detach().cpu().clone()
        else:
            module = self.unwrapped
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if self.info.is_main else {}
        if not self.info.is_main:
            return None
        return {_clean_key(k): v.detach().cpu() for k, v in state.items()}


def _torch_save_atomic(obj, path) -> None:
    import io

    from g2rpo.io import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _clean_key(key: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        key = key.replace(wrapper, "")
    return key.removeprefix("module.")
