"""An exponential moving average of the trained weights (``ema.decay > 0``), kept shard by shard.

After the s-th applied optimiser update (s = 1, 2, ...; skipped updates do not count) and when
``(s + 1) % update_every == 0``, every shadow weight moves towards the live one:

    d_s   = min((1 + s) / (10 + s), decay)      (with warmup; otherwise d_s = decay)
    ema  <- ema + (1 - d_s) · (θ - ema)

which is Flow-GRPO's ``EMAModuleWrapper`` rule with its ``global_step`` (decay 0.9, every 8 updates in its
FLUX/SD3 configs), the warm-up letting the average follow the first updates closely. Flow-GRPO calls it after
every micro-batch (several times per update under gradient accumulation); here it runs once per applied update.

Each rank averages the shards it owns (FSDP2 DTensors: same mesh and placements as the parameters), on the
training device or in host memory (``ema.device: cpu``), so the average costs 4 bytes per trained parameter
divided by the ranks. It is saved and resumed with the model (`state_dict` holds DTensors for
torch.distributed.checkpoint and the update count), exported beside the trained weights as ``transformer_ema/``
(LoRA: ``lora_ema/``) and, with ``ema.eval``, the held-out evaluation also samples with it (`swapped_in`).
"""

from __future__ import annotations

import contextlib

import torch


def ema_decay(step: int, decay: float, warmup: bool = True) -> float:
    """d_s after the ``step``-th applied update (1-based)."""
    return min((1 + step) / (10 + step), decay) if warmup else decay


class ShardedEMA:
    """The average of ``module``'s trainable parameters, in fp32, one shadow per parameter (its local shard)."""

    def __init__(self, module: torch.nn.Module, decay: float, update_every: int = 1, warmup: bool = True,
                 device: str = "device"):
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

        self.decay, self.update_every, self.warmup = decay, update_every, warmup
        self.updates = 0  # optimiser updates seen
        self.names, self.params, self.shadow = [], [], {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            local = param.to_local() if isinstance(param, DTensor) else param
            target = torch.device("cpu") if device == "cpu" else local.device
            copy = local.detach().to(target, torch.float32, copy=True)
            if isinstance(param, DTensor):  # built directly: from_local would move a CPU copy to the mesh's device
                spec = DTensorSpec(param.device_mesh, param.placements,
                                   tensor_meta=TensorMeta(param.shape, param.stride(), torch.float32))
                copy = DTensor(copy, spec, requires_grad=False)
            self.names.append(name)
            self.params.append(param)
            self.shadow[name] = copy

    @staticmethod
    def _local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    @torch.no_grad()
    def update(self) -> None:
        """Call once after every applied optimiser update."""
        self.updates += 1
        step = self.updates
        if (step + 1) % self.update_every:
            return
        weight = 1.0 - ema_decay(step, self.decay, self.warmup)
        shadows = [self._local(self.shadow[n]) for n in self.names]
        lives = [self._local(p).detach().to(s.device, torch.float32) for p, s in zip(self.params, shadows)]
        torch._foreach_lerp_(shadows, lives, weight)

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged weights in the live parameters while inside (each rank its shards); the live ones are
        kept in host memory meanwhile and put back bit for bit on leaving."""
        with torch.no_grad():
            kept = [self._local(p).detach().to("cpu", copy=True) for p in self.params]
            for param, name in zip(self.params, self.names):
                self._local(param).copy_(self._local(self.shadow[name]))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, kept):
                    self._local(param).copy_(saved)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """After torch.distributed.checkpoint loaded into `state_dict()`'s tensors in place."""
        self.updates = int(state["updates"])
