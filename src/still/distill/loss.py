"""Distillation losses.

Paper: Geoffrey Hinton, Oriol Vinyals, Jeff Dean. "Distilling the Knowledge in a Neural Network".
NIPS 2014 Deep Learning Workshop, arXiv:1503.02531 (2015).

Notation: B batch size, C classes; z student logits (B, C), v teacher logits (B, C), T > 0 the
temperature, y hard labels (B,).

Soft targets at temperature T:

    p_i = exp(v_i / T) / sum_j exp(v_j / T)        (teacher)
    q_i = exp(z_i / T) / sum_j exp(z_j / T)        (student)

The distillation objective (section 2), with alpha the weight of the SOFT-target term:

    L = alpha * T^2 * KL(p || q)  +  (1 - alpha) * CE(z, y)

    KL(p || q) = (1/B) sum_b sum_i p_bi (log p_bi - log q_bi)      ("batchmean": the sum over
                                                                   classes, the mean over the batch)

Some libraries put alpha on the hard-label term instead; here alpha = 1 is pure distillation and
alpha = 0 is plain cross entropy. KL differs from the paper's cross entropy with soft targets only
by the teacher's entropy, a constant for the student, so gradients are the same:

    dL_soft / dz_i = T * (q_i - p_i)                     (per example, before the batch mean)

The T^2 factor keeps the soft term's gradient scale about constant as T changes, since the
gradient of the un-scaled term shrinks as 1/T^2 (section 2).

High-temperature limit (section 2.1): with zero-mean logits per example and T large,

    T^2 * KL(p || q)  ->  (1 / (2C)) * sum_i (z_i - v_i)^2

which is `logit_matching_loss` (Caruana et al.'s logit matching, up to the 1/C factor).

Precision: above T = 20 (`PRECISE_ABOVE`) the soft targets and the soft term are computed in
float64. Both distributions are then nearly uniform, and float32's rounding of log-probabilities,
multiplied by T^2, swamps the KL: about 1e-8 T^2 absolute, so 5e-4 relative at T = 1000 and 2% at
1e4 for MNIST-sized logits, and a negative loss at 1e5. In float64 the loss stays within 1e-6 of
40-digit arithmetic up to T = 1e5 (`MAX_TEMPERATURE`; tested), and temperatures above it are
refused: the loss there is logit matching to within its rounding. At T <= 20 float32 does, and
the paper's T = 20 runs in it: the gradient T (q - p) within 1e-5 relative; the value carries the
rounding of the two log-normalisers (log C and more, to 1e-7 of itself), times T^2: an absolute
error of about 1e-7 T^2 (log C + the logits' range / T), up to 1e-4 at T = 20 over 2 to 32,000
classes (tested): negligible beside a far student's soft term, but a few percent of a near one's,
whose value is then read better in float64: float64 logits (student and teacher) are computed in
float64 at every T. (A value from log-ratios centred under p, free of the normalisers, was tried
in session 52: exact for near students, it cancelled for far ones, 1.5% off, at 2.4-3.4x the cost.)

Deviations from the paper: none in the loss. The paper averages the two objectives with "a
considerably lower weight on the second"; the MNIST recipe's alpha is documented with its preset.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import torch
import torch.nn.functional as F

from still.errors import StillError


def _number(value: object) -> float | None:
    """`value` as a Python float where it is a real number (NumPy's and one-element tensors too), else None."""
    if isinstance(value, torch.Tensor):  # (an integer one too: torch.tensor(2) was "not a finite number > 0")
        usable = value.numel() == 1 and not (value.dtype == torch.bool or value.is_complex())
        return float(value) if usable else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # (an int beyond float's range: 2**2000)
            return math.inf if value > 0 else -math.inf
    return None


PRECISE_ABOVE = 20.0
"""Temperatures above this have their soft targets and soft term computed in float64 (module docstring)."""
MAX_TEMPERATURE = 1e5
"""The highest temperature accepted: above it even float64 loses the soft term to rounding."""
MIN_TEMPERATURE = 1e-2
"""The lowest temperature accepted. The soft term's gradient in a student logit is T (q - p) (the
T^2 factor times the softened softmax's 1 / T): below this it is at most 2T, and the student learns
next to nothing from the soft targets (at T = 1e-30 its weights did not move); below about 1e-37
the logits over T overflow float32 and the loss is NaN."""


def check_temperature(temperature: float) -> float:
    """`temperature` as a float, or a `StillError` where it is not in [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    t = _number(temperature)
    if t is None or not 0 < t < math.inf:
        raise StillError(f"temperature must be a finite number > 0, got {temperature!r}")
    if t < MIN_TEMPERATURE * (1 - 1e-6):  # (0.01 given in float32 reads 0.009999999776)
        raise StillError(f"temperature {t!r} is below {MIN_TEMPERATURE:g}, where the soft-target term (scaled by "
                         "T^2) gives the student a gradient of at most 2T: it would learn next to nothing from "
                         "the teacher")
    if t > MAX_TEMPERATURE:
        raise StillError(f"temperature {t!r} is above {MAX_TEMPERATURE:g}, where rounding swamps the soft-target "
                         "loss even in float64; at such temperatures the loss is logit matching "
                         "(distillation_loss(..., soft_loss='logit_matching') in Python)")
    return t


def soft_dtype(temperature: float, logits: torch.Tensor | None = None) -> torch.dtype:
    """The dtype soft targets and the soft term are computed in at `temperature`: float32, or float64
    above `PRECISE_ABOVE` or where `logits` are float64 (they were computed in float32, a probe)."""
    wide = temperature > PRECISE_ABOVE or (logits is not None and logits.dtype == torch.float64)
    return torch.float64 if wide else torch.float32


def check_tensor(name: str, value: object) -> None:
    """A `StillError` naming `name` where `value` is not a tensor (a list or a NumPy array: Python's
    AttributeError, deep in the loss, otherwise)."""
    if not isinstance(value, torch.Tensor):
        raise StillError(f"{name} must be a tensor, got a {type(value).__name__} (torch.as_tensor makes one)")


def _check_pair(student_logits: torch.Tensor, teacher: torch.Tensor, what: str, name: str) -> None:
    check_tensor("student_logits", student_logits)
    check_tensor(name, teacher)
    if student_logits.ndim != 2:
        raise StillError(f"student logits must be (batch, classes), got shape {tuple(student_logits.shape)}")
    if student_logits.shape[1] < 2:  # (a probe: the loss was 0, its gradient 0, a student that never learnt)
        raise StillError(f"student logits of {student_logits.shape[1]} class: a softmax over one class is "
                         "constant, and its soft targets teach nothing (a binary model's single logit z is "
                         "the two classes' [0, z])")
    if teacher.shape != student_logits.shape:
        if teacher.ndim == 2 and teacher.shape[0] == student_logits.shape[0]:
            raise StillError(f"the teacher has {teacher.shape[1]} classes but the student has "
                             f"{student_logits.shape[1]}: they must match")
        raise StillError(f"teacher {what} have shape {tuple(teacher.shape)}, the student's logits "
                         f"{tuple(student_logits.shape)}: they must match")


def soft_target_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p || softmax(z / T)), batchmean.

    Args:
        student_logits: z, (B, C).
        teacher_log_probs: log p, the teacher's soft targets at the same temperature, (B, C)
            (for one teacher `log_softmax(v / T)`; for an ensemble see `combine_log_probs`). Above
            T = 20 give them in float64 (`soft_dtype`), as `combine_log_probs` does: float32 ones
            have already lost what the soft term measures.
        temperature: MIN_TEMPERATURE <= T <= MAX_TEMPERATURE.
    Returns a float32 scalar, computed in `soft_dtype(T, student_logits)`.
    """
    temperature = check_temperature(temperature)
    _check_pair(student_logits, teacher_log_probs, "log-probabilities", "teacher_log_probs")
    dtype = soft_dtype(temperature, student_logits)
    student_log_probs = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # (B, C)
    target = teacher_log_probs.to(dtype).detach()  # (B, C), log p: the teacher is held fixed
    p = target.exp()
    if p.device.type == "cpu" and p.numel():  # (on a GPU a look would wait for it, as for the labels)
        # log-probabilities: each row's p sums to 1 (raw logits gave a loss of 64 unsaid); a row that is
        # not finite stays for the finite-loss check (a NaN teacher makes the loss NaN)
        sums = p.sum(-1)
        tolerance = 1e-3 if teacher_log_probs.dtype in (torch.float32, torch.float64) else 0.05
        off = sums.isfinite() & ((sums - 1).abs() > tolerance)
        if bool(off.any()):
            row = int(off.nonzero()[0, 0])
            raise StillError(f"teacher_log_probs must be log-probabilities (each row's exp sums to 1); row {row}'s "
                             f"sums to {float(sums[row]):.4g}: give logits as teacher_logits, or log_softmax them")
    # sum p (log p - log q), batchmean: F.kl_div's terms, but a class the teacher rules out (p = 0: log p
    # = -inf, a masked logit) adds 0, not 0 x -inf = nan; a NaN or infinite teacher output stays NaN
    # or infinite, so the finite-loss check sees it (an empty batch: 0, as the hard term's, not 0/0)
    kl = torch.where(p == 0, 0.0, p * (target - student_log_probs)).sum() / max(student_logits.shape[0], 1)
    return (kl * temperature**2).float()


def logit_matching_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """(1 / (2C)) * sum_i (z_i - v_i)^2 on per-example zero-mean logits, batchmean: the
    high-temperature limit of `soft_target_loss`."""
    _check_pair(student_logits, teacher_logits, "logits", "teacher_logits")
    z = student_logits.float()
    v = teacher_logits.float().detach()  # the teacher is held fixed
    diff = (z - z.mean(-1, keepdim=True)) - (v - v.mean(-1, keepdim=True))  # (B, C)
    return diff.pow(2).sum() / (max(z.shape[0], 1) * 2 * z.shape[-1])  # (an empty batch: 0)


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor | None,
    teacher_logits: torch.Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    teacher_log_probs: torch.Tensor | None = None,
    soft_loss: Literal["kl", "logit_matching"] = "kl",
) -> torch.Tensor:
    """alpha * T^2 * KL(p || q) + (1 - alpha) * CE(z, y). `alpha` weights the SOFT targets.

    Give the teacher either as logits (`teacher_logits`, v) or as soft targets already at
    temperature T (`teacher_log_probs`, e.g. an ensemble's). Either model's log-probabilities at
    T = 1 (a model ending in `log_softmax`) may stand for its logits, with the same loss and
    gradients: they differ by a constant per example, which the softmax removes; but not as
    `teacher_log_probs` where T != 1, and never probabilities. With `soft_loss="logit_matching"`
    the soft term is `logit_matching_loss` (needs `teacher_logits`).
    `labels` (B,) are class numbers of any integer dtype, and may be None only when alpha == 1; a
    label of -100 drops its example from the hard term (PyTorch's `ignore_index`), not from the soft
    one; where the hard term is computed (alpha < 1), any other label outside 0..C-1 is a
    `StillError` (on a GPU, PyTorch's device-side assert).
    The teacher's outputs are constants: no gradient reaches them; a NaN or infinite one makes the
    loss NaN or infinite (never a quiet 0).
    """
    temperature = check_temperature(temperature)
    a = _number(alpha)
    if a is None or not 0 <= a <= 1:
        raise StillError(f"alpha (the weight of the soft-target term) must be in [0, 1], got {alpha!r}")
    alpha = a
    for name, value in (("student_logits", student_logits), ("labels", labels), ("teacher_logits", teacher_logits),
                        ("teacher_log_probs", teacher_log_probs)):
        if value is not None or name == "student_logits":
            check_tensor(name, value)
    if (teacher_logits is None) == (teacher_log_probs is None):
        raise StillError("give exactly one of teacher_logits and teacher_log_probs")
    if soft_loss not in ("kl", "logit_matching"):
        raise StillError(f"soft_loss must be 'kl' or 'logit_matching', got {soft_loss!r}")
    if soft_loss == "logit_matching":
        if teacher_logits is None:
            raise StillError("logit matching needs teacher_logits, not soft targets")
        soft = logit_matching_loss(student_logits, teacher_logits)
    else:
        if teacher_log_probs is None:
            _check_pair(student_logits, teacher_logits, "logits", "teacher_logits")
            teacher_log_probs = F.log_softmax(teacher_logits.to(soft_dtype(temperature, teacher_logits)) / temperature,
                                              dim=-1)
        soft = soft_target_loss(student_logits, teacher_log_probs, temperature)
    if alpha == 1:
        return soft
    if labels is None:
        raise StillError(f"labels are needed when alpha < 1 (alpha = {alpha})")
    if labels.shape != student_logits.shape[:1]:
        raise StillError(f"labels have shape {tuple(labels.shape)}, expected ({student_logits.shape[0]},)")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise StillError(f"labels must be class numbers (integers), got {labels.dtype}")
    if labels.dtype != torch.int64:
        labels = labels.long()  # F.cross_entropy takes int64 class numbers only
    if labels.device.type == "cpu":  # (on a GPU, PyTorch's own check: looking would wait for the device)
        classes = student_logits.shape[-1]
        bad = labels[(labels != -100) & ((labels < 0) | (labels >= classes))]
        if bad.numel():
            raise StillError(f"label {int(bad[0])} is not a class number: the logits have {classes} classes "
                             f"(0 to {classes - 1}; -100 leaves an example out)")
    # the mean over the labelled examples; 0 where a batch has none (F.cross_entropy's mean would
    # be 0/0 = nan), with no device sync
    labelled = (labels != -100).sum().clamp(min=1)
    hard = F.cross_entropy(student_logits.float(), labels, reduction="sum") / labelled
    return alpha * soft + (1 - alpha) * hard
