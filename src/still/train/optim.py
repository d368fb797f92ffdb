"""Optimizers and learning-rate schedules from a small config."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from still.config import check_fields
from still.errors import StillError, check, whole


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
    """After the warm-up: a constant rate, or a cosine decay towards `min_lr_ratio * lr` (`lr_factor`);
    or PyTorch's one-cycle policy (`OneCycleLR`: a cosine warm-up from lr / 25, a cosine decay to
    lr / 25e4, and momentum cycled between 0.95 and 0.85 in the opposite sense; `build_scheduler`)."""
    warmup_fraction: float = 0.0
    """Fraction of all steps spent warming up (how it rounds: `lr_factor`, `build_scheduler`)."""
    min_lr_ratio: float = 0.0
    """The cosine schedule's floor, as a fraction of `lr`."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value (None: no clipping)."""

    def __post_init__(self) -> None:
        check_fields(self)  # name and schedule among the allowed; betas two numbers, a list made a tuple
        check(0 < self.lr < math.inf, f"lr must be a finite number > 0, got {self.lr}")
        check(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        check(all(0 <= b < 1 for b in self.betas), f"betas must be in [0, 1), got {self.betas}")
        check(0 <= self.weight_decay < math.inf, f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        check(0 <= self.warmup_fraction < 1, f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.grad_clip is None or 0 < self.grad_clip < math.inf,
              f"grad_clip must be a finite number > 0 or None, got {self.grad_clip}")


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer of `config`, with PyTorch's fused implementation where the parameters' device
    has one (one kernel for all tensors: on the CPU, AdamW's step for 1.1M parameters took 3.3 ms
    against 8.8 for the default loop over tensors, and 6.3 against 24-33 ms for 6.7M; Nesterov SGD's
    for the MNIST teacher's 2.4M 1.2 against 1.9 ms; docs/performance.md). Its updates equal the
    loop's up to float rounding (the last bit of some elements), which training may amplify: a ReLU
    unit at the edge of zero switched on in one run and not in the other changes that step's gradient
    far more than the rounding did."""
    if not isinstance(config, OptimConfig):  # (a dict's AttributeError otherwise)
        raise StillError(f"the optimizer's config must be an OptimConfig, got a {type(config).__name__} "
                         "(OptimConfig(**settings) makes one)")
    given = list(params)
    params = [p for p in given if p.requires_grad]
    if not params:  # (PyTorch's "optimizer got an empty parameter list" said neither why nor which)
        why = f"all {len(given)} given are frozen (requires_grad=False)" if given else "none were given"
        raise StillError(f"there are no trainable parameters to optimize: {why}")
    fused = _fused_supported(params, config.name) or None
    if config.name == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                    nesterov=config.momentum > 0, weight_decay=config.weight_decay, fused=fused)
    elif config.name == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                     fused=fused)
    elif config.name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay,
                                      fused=fused)
    else:  # (OptimConfig refuses other names; a config changed behind its back must not become AdamW)
        raise StillError(f"unknown optimizer {config.name!r}; known: 'sgd', 'adam', 'adamw'")
    if fused:
        # the fused kernels write the parameters without bumping their version counters, which
        # inference caches key on (the Compressive Transformer's W_r R and memory keys/values): a
        # cache made before a step would otherwise be read after it
        optimizer.register_step_post_hook(_mark_parameters_written)
    return optimizer


def _mark_parameters_written(optimizer: torch.optim.Optimizer, args, kwargs) -> None:  # noqa: ARG001
    torch.autograd.graph.increment_version([p for group in optimizer.param_groups for p in group["params"]])


def _fused_supported(params: list[torch.Tensor], name: str) -> bool:
    """Whether PyTorch has a fused kernel for `params` that updates as its loop does. Not SGD's on
    the CPU for bf16 or fp16 parameters: in PyTorch 2.13 it leaves them unchanged (lr 0.1, a gradient
    of ones: not one element moved), where Adam's and AdamW's round as their loops do."""
    if name == "sgd" and any(p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16) for p in params):
        return False
    try:  # a private helper of PyTorch's, hence guarded
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except Exception:  # noqa: BLE001 - a PyTorch without it: the default implementation
        return False
    return bool(params) and all(p.device.type in devices and p.dtype.is_floating_point for p in params)


def lr_factor(step: int, total_steps: int, config: OptimConfig) -> float:
    """Multiplier of the peak rate at `step` (0-based) of `total_steps` (the schedules other than one-cycle).

    - Warm-up: the first `warmup = int(warmup_fraction * total_steps)` steps, rounded down (0.05 of
      fewer than 20 steps gives none), at `(step + 1) / warmup`: linear from 1 / warmup of the peak
      at step 0 (not from 0) to the peak at step `warmup - 1`.
    - Then 1 ("constant"), or ("cosine") `min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * p)) / 2`
      with `p = (step - warmup) / (total_steps - warmup)`: the peak again at step `warmup`, and
      `min_lr_ratio` reached at step `total_steps`, one past the last, so the last step's rate is
      still above it. With 4 steps and warmup_fraction 0.5 the factors are 0.5, 1, 1, 0.5.
    """
    warmup = int(config.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule of `config` over `total_steps` optimizer steps, stepped once after each.

    "constant" and "cosine" follow `lr_factor`. "onecycle" is PyTorch's `OneCycleLR`: its warm-up
    rises from lr / 25 at step 0 to the peak at (fractional) step `warmup_fraction * total_steps - 1`,
    so it spans `warmup_fraction * total_steps` steps, the peak's included; its decay reaches
    lr / 25e4 at the last step. A warm-up shorter than 2 steps is lengthened to 2 (lr / 25, then
    the peak): at exactly 1 step OneCycleLR divides by zero, and below 1 it starts past the peak.
    With fewer than 3 steps there is no room for one, and none is made. `warmup_fraction` 0 means
    no warm-up: the decay then counts from the peak one step before the first, so step 0 is already
    1 / total_steps of the way down it (0.976 lr of 10 steps). A single step runs at the peak: the
    decay would put its one step at its end, lr / 25e4, and the stage would learn nothing.
    """
    if not (whole(total_steps) and total_steps >= 1):
        # (0 was taken by the cosine schedule, and PyTorch's ValueError for one-cycle)
        raise StillError(f"a schedule's total_steps must be an int >= 1, got {total_steps!r}")
    total_steps = int(total_steps)
    if config.schedule == "onecycle" and total_steps == 1:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=total_steps,
                                                   pct_start=_one_cycle_warmup(config.warmup_fraction, total_steps),
                                                   cycle_momentum=config.name == "sgd" and config.momentum > 0)
    if config.schedule not in ("constant", "cosine"):  # (as for the optimizer's name)
        raise StillError(f"unknown schedule {config.schedule!r}; known: 'constant', 'cosine', 'onecycle'")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))


def _one_cycle_warmup(warmup_fraction: float, total_steps: int) -> float:
    """OneCycleLR's `pct_start`: `warmup_fraction`, lengthened to 2 steps where it spans fewer."""
    if warmup_fraction == 0 or total_steps < 3:
        return 0.0
    return max(float(warmup_fraction), 2 / total_steps)
