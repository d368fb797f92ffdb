"""still: knowledge distillation and the Compressive Transformer, in PyTorch.

Small models (Hinton, Vinyals and Dean 2015) and long memories (Rae et al. 2019).
The public API is imported lazily, so `still --help` starts without loading PyTorch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "distillation_loss": "still.distill.loss",
    "logit_matching_loss": "still.distill.loss",
    "soft_target_loss": "still.distill.loss",
    "CachedTeacher": "still.distill.teachers",
    "EnsembleTeacher": "still.distill.teachers",
    "Teacher": "still.distill.teachers",
    "combine_log_probs": "still.distill.teachers",
    "StillError": "still.errors",
    "Trainer": "still.train.loop",
    "seed_everything": "still.train.seed",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'still' has no attribute {name!r}")


def __dir__() -> list[str]:  # (the lazy names too: tab completion and dir(still) missed them)
    return sorted({name for name in globals() if name.startswith("__")} | set(__all__))
