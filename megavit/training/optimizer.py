"""AdamW over this rank's parameters: fp32 master weights, loss-scale unscaling, one global
gradient norm, and optionally the sharded (ZeRO-1) form.

    fp32 parameters, not sharded   AdamW updates the parameters in place; their gradients
                                   are the `main_grad` views of the DP gradient buffer
    16-bit parameters              fp32 master copies are updated and copied back
    --use-distributed-optimizer    each DP rank holds master weights and Adam moments for
                                   its 1/d of every gradient bucket only (the segments of
                                   parameters inside its shard); after the step the
                                   updated shards are all-gathered into every replica

A step: gradients (reduced over DP by `DataParallelBuffers`) -> divide by the loss scale ->
inf/NaN anywhere? (one all-reduce over all ranks; if so every rank skips the step) -> clip
by the global norm (TP once for replicated parameters, PP, and DP shards when sharded) ->
AdamW -> copy back / all-gather. No weight decay on norms, biases, position embeddings,
the class token or the MAP probe. Each parameter may train at its own multiple of the lr
(`lr_scale`, e.g. layer-wise decay): one AdamW group per (weight decay, lr scale).

Bytes per parameter on a rank (bf16 parameters, fp32 gradients): 2 + 4 + 12 (master and two
moments) = 18 unsharded, 2 + 4 + 12/d sharded; fp32 parameters need no separate master (the
sharded form steps this rank's shard of the parameter buffer in place): 4 + 4 + 8 = 16,
and 4 + 4 + 8/d. `bytes_per_parameter` reports the measured figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from megavit.config import TrainingConfig
from megavit.parallel.data_parallel import DataParallelBuffers
from megavit.parallel.sharding import is_replicated
from megavit.parallel.state import ParallelState


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to weight matrices only (2-D and up), never to parameters
    marked `no_weight_decay` (position embeddings)."""
    return param.dim() >= 2 and not getattr(param, "no_weight_decay", False)


def _adamw(groups: list[dict], cfg: TrainingConfig) -> tuple[torch.optim.Optimizer, str]:
    """The AdamW kernel --adam-impl asks for, and what was used (apex falls back to torch's
    fused kernel, with the same update, where apex is not importable)."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    impl = cfg.adam_impl
    if impl == "apex":
        try:
            from apex.optimizers import FusedAdam
        except ImportError:
            impl = "fused"
        else:
            return FusedAdam(groups, adam_w_mode=True, **kwargs), "apex FusedAdam"
    if impl == "fused":
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs), "torch fused AdamW" + (
                " (apex not importable)" if cfg.adam_impl == "apex" else "")
        except (RuntimeError, TypeError):  # no fused kernel for this device / dtype / torch
            impl = "foreach"
    return torch.optim.AdamW(groups, foreach=impl == "foreach", **kwargs), f"torch {impl} AdamW"


def formula_bytes_per_parameter(param_bytes: int, grad_bytes: int, master_weights: bool,
                                shards: int) -> float:
    """Bytes per parameter on a rank by the formula: parameter + gradient + (fp32 master when
    separate + two fp32 moments) / shards. bf16 with fp32 gradients: 18 unsharded, 6 + 12/d
    sharded over d DP ranks (Megatron's table); fp32: 16, and 8 + 8/d."""
    return param_bytes + grad_bytes + (12 if master_weights else 8) / shards


@dataclass
class StepOutcome:
    grad_norm: torch.Tensor   # 0-d, before clipping (nan when the step was skipped)
    skipped: bool             # an inf/NaN gradient somewhere: no update this step


class _NothingToTrain:
    """The AdamW of a rank without trainable parameters: no groups, no state."""

    def __init__(self) -> None:
        self.param_groups: list = []
        self.state: dict = {}

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"state": {}, "param_groups": []}


class MixedPrecisionOptimizer:
    """AdamW for this rank's parameters, reading gradients from `buffers`."""

    def __init__(self, buffers: DataParallelBuffers, cfg: TrainingConfig, pstate: ParallelState,
                 master_weights: bool, lr_scale: Callable[[str], float] | None = None) -> None:
        """`lr_scale(parameter name)`: the multiple of the scheduled lr it trains at
        (default 1 for every parameter)."""
        self.buffers, self.cfg, self.pstate = buffers, cfg, pstate
        self.segments = buffers.segments()
        self.own_params = not master_weights and not buffers.shard
        # fp32 and sharded: the masters are this rank's shard of the parameter buffer itself
        self.masters_are_views = not master_weights and buffers.shard
        self.masters: list[nn.Parameter] = []
        if self.own_params:
            self.masters = [s.param for s in self.segments]
        elif self.masters_are_views:
            self.masters = [nn.Parameter(buffers.param_view(s)) for s in self.segments]
        else:
            for s in self.segments:
                a, b = s.param_range
                self.masters.append(nn.Parameter(s.param.detach().reshape(-1)[a:b].float().clone()))
        by_group: dict[tuple[bool, float], list[nn.Parameter]] = {}
        for m, s in zip(self.masters, self.segments):
            key = (decays(s.name, s.param), lr_scale(s.name) if lr_scale else 1.0)
            by_group.setdefault(key, []).append(m)
        groups = [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0,
                   "lr_scale": scale}
                  for (decay, scale), params in sorted(by_group.items(), reverse=True)]
        # a rank may train nothing (a locked image tower's pipeline stage under LiT); it still
        # joins the step's collectives (found-inf, gradient norm)
        self.adamw, self.implementation = (_adamw(groups, cfg) if groups else
                                           (_NothingToTrain(), "none (nothing to train here)"))

    def _grads(self) -> list[torch.Tensor]:
        """Each master's gradient: a view of the (reduced) gradient buffer, in fp32."""
        out = []
        for s in self.segments:
            if self.own_params:
                out.append(s.param.main_grad)
            else:
                g = self.buffers.grad_view(s)
                out.append(g if g.dtype == torch.float32 else g.float())
        return out

    def step(self, lr: float, clip_grad: float, loss_scale: float | None) -> StepOutcome:
        grads = self._grads()
        if loss_scale is not None:
            inv = 1.0 / loss_scale
            for g in grads:
                g.mul_(inv)
            finite = (torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads
                      else torch.ones((), dtype=torch.bool, device=self.pstate.device))
            local = (~finite).float().reshape(1)       # no host sync until the all-reduce
            if self.pstate.world.all_reduce(local, op=torch.distributed.ReduceOp.MAX).item():
                return StepOutcome(torch.tensor(float("nan")), skipped=True)
        norm = self.grad_norm(grads)
        if clip_grad > 0:
            coef = torch.clamp(clip_grad / (norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        for m, g in zip(self.masters, grads):
            m.grad = g.view_as(m)
        for group in self.adamw.param_groups:
            group["lr"] = lr * group["lr_scale"]
        self.adamw.step()
        for m in self.masters:
            m.grad = None
        if not self.own_params:
            self.copy_masters_to_params()
        return StepOutcome(norm, skipped=False)

    def grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """sqrt(sum of squares of the serial model's gradient): TP-replicated parameters
        counted on TP rank 0 only; summed over TP, PP and, when sharded, DP."""
        tp = self.pstate.tp
        squares = [g.pow(2).sum() for s, g in zip(self.segments, grads)
                   if not (is_replicated(s.param) and tp.rank != 0)]
        total = (torch.stack(squares).sum() if squares else
                 torch.zeros((), device=self.pstate.device)).reshape(1).double()
        tp.all_reduce(total)
        self.pstate.pp.all_reduce(total)
        if self.buffers.shard:
            self.pstate.dp.all_reduce(total)
        return total.sqrt()[0].float()

    @property
    def separate_masters(self) -> bool:
        """fp32 master copies apart from the parameters (16-bit parameters)."""
        return not (self.own_params or self.masters_are_views)

    @torch.no_grad()
    def copy_params_to_masters(self) -> None:
        """After the parameters were loaded (fine-tuning from weights only): the fp32
        masters follow them (with fp32 parameters the masters are the parameters or views
        of their buffer already)."""
        for s, m in zip(self.segments, self.masters if self.separate_masters else []):
            a, b = s.param_range
            m.detach().copy_(s.param.detach().reshape(-1)[a:b].float())

    @torch.no_grad()
    def copy_masters_to_params(self) -> None:
        """The masters into the (16-bit) parameters, and with the sharded optimizer every
        rank's updated shard into every replica."""
        for s, m in zip(self.segments, self.masters if self.separate_masters else []):
            a, b = s.param_range
            s.param.detach().view(-1)[a:b].copy_(m.detach())
        if self.buffers.shard:
            self.buffers.all_gather_params()

    def bytes_per_parameter(self) -> dict[str, float]:
        """Measured bytes per trained parameter on this rank: parameters, gradient buffer,
        and optimizer state (masters when separate, Adam moments)."""
        n = sum(s.param.numel() for s in self.buffers.segments()) if not self.buffers.shard \
            else sum(p.numel() for b in self.buffers.buckets for p in b.params
                     if p.requires_grad)
        n = max(n, 1)
        state = 0
        for m in self.masters:
            if self.separate_masters:
                state += m.numel() * m.element_size()
            for v in self.adamw.state.get(m, {}).values():
                if torch.is_tensor(v) and v.dim() > 0:
                    state += v.numel() * v.element_size()
        return {**self.buffers.bytes_per_parameter(), "optimizer": state / n}

    def state_dict(self) -> dict:
        return self.adamw.state_dict()
