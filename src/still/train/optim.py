"""Optimizers and learning-rate schedules from a small config."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from still.errors import check


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    """Optimizer: SGD with (Nesterov) momentum, Adam or AdamW."""
    lr: float = 0.1
    """Peak learning rate."""
    momentum: float = 0.9
    """SGD momentum (Nesterov when > 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine", "onecycle"] = "cosine"
    """After the warm-up: a constant rate, or a cosine decay to `min_lr_ratio * lr`; or PyTorch's
    one-cycle policy (`OneCycleLR`: warm-up from lr / 25 over `warmup_fraction` of the steps, cosine
    decay to lr / 25e4, and momentum cycled between 0.95 and 0.85 in the opposite sense)."""
    warmup_fraction: float = 0.0
    """Fraction of all steps spent in a linear warm-up from 0."""
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    """Clip the global gradient norm to this value (None: no clipping)."""

    def __post_init__(self) -> None:
        check(0 < self.lr < math.inf, f"lr must be a finite number > 0, got {self.lr}")
        check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        check(all(0 <= b < 1 for b in self.betas), f"betas must be in [0, 1), got {self.betas}")
        check(0 <= self.weight_decay < math.inf, f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        check(0 <= self.warmup_fraction < 1, f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.grad_clip is None or 0 < self.grad_clip < math.inf,
              f"grad_clip must be a finite number > 0 or None, got {self.grad_clip}")


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of `config`. Adam and AdamW use PyTorch's fused implementation where the
    parameters' device has one (one kernel for all tensors: on the CPU, AdamW's step for 1.1M
    parameters took 3.3 ms against 8.8 for the default loop over tensors, and 6.3 against 24-33 ms
    for 6.7M; docs/performance.md); its updates equal the loop's up to float rounding. SGD keeps the
    loop: with the fused kernel, a one-process distillation run drifted 5e-5 (relative) from the
    loop's weights in 60 steps while a two-process run stayed within 1e-7 of it, which we do not
    understand, and its step is a small part of a distillation step."""
    params = [p for p in params if p.requires_grad]
    fused = (config.name != "sgd" and _fused_supported(params)) or None
    if config.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                    nesterov=config.momentum > 0, weight_decay=config.weight_decay, fused=fused)
    elif config.name == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                     fused=fused)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                      fused=fused)
    if fused:
        # the fused kernels write the parameters without bumping their version counters, which
        # inference caches key on (the Compressive Transformer's W_r R and memory keys/values): a
        # cache made before a step would otherwise be read after it
        optimizer.register_step_post_hook(_mark_parameters_written)
    return optimizer


def _mark_parameters_written(optimizer: torch.optim.Optimizer, args, kwargs) -> None:  # noqa: ARG001
    torch.autograd.graph.increment_version([p for group in optimizer.param_groups for p in group["params"]])


def _fused_supported(params: list[torch.Tensor]) -> bool:
    try:  # a private helper of PyTorch's, hence guarded
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except Exception:  # noqa: BLE001 - a PyTorch without it: the default implementation
        return False
    return bool(params) and all(p.device.type in devices and p.dtype.is_floating_point for p in params)


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of the peak rate at `step` (0-based): linear warm-up, then constant or cosine."""
    warmup = int(config.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=total_steps,
                                                   pct_start=config.warmup_fraction or 0.3,
                                                   cycle_momentum=config.name == "sgd" and config.momentum > 0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
