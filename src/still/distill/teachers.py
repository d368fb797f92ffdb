"""Teachers: one frozen model, an ensemble, or logits computed once for a fixed transfer set.

A teacher is always in eval mode (dropout off, batch norm on its running statistics), runs under
`torch.no_grad`, and its parameters are frozen (`requires_grad=False`): `train()` on a teacher
does not switch it back to training mode.

A teacher's model may keep its parameters in any floating precision (bf16 or float64, say): a
floating input is passed to it in the dtype of its first floating parameter, and its logits come
back as float32. Its output may be the logits (B, C) themselves, or hold them the way Hugging Face
models and others do: an object's `.logits`, a mapping's "logits", or the first element of a tuple
or list. Anything else is refused with a `StillError` naming what the model returned, as are
logits that are not floating point (integer, bool or complex scores).

A model that ends in `log_softmax` (as PyTorch's MNIST example does) gives the same soft targets as
its logits: log-probabilities differ from them by a constant per example, which the softmax at any
temperature removes (and logit matching's mean). Probabilities (a final `softmax`) do not: their
soft targets would be nearly uniform. A model's first output is checked for them (every row
non-negative and summing to 1), and such a model is refused, once, with a `StillError` saying so.

Ensembles (Hinton et al. 2015, sections 1 and 4): the soft targets of M members at temperature T
are either the arithmetic mean of their distributions,

    p = (1/M) sum_m softmax(v_m / T)           log p = logsumexp_m log softmax(v_m / T) - log M

or the normalised geometric mean,

    p = softmax((1/M) sum_m log softmax(v_m / T)) = softmax(mean_m(v_m) / T).

An image model can also be an ensemble of itself over translations of its input
(`ShiftEnsembleTeacher`): its members are the model applied to the image shifted by every (dy, dx)
with |dy|, |dx| <= s. A teacher trained on jittered images then puts what it learnt about
translations into its soft targets for untranslated images, which the student still sees as they
are (docs/results/mnist.md).

When the transfer set is fixed (no augmentation), `CachedTeacher` runs the teacher once over it
and keeps the logits (in memory, and optionally on disk under a key made from the SHA-256 of the
teacher's weights, of its modules as `repr` shows them, and of the inputs; each file holds the
SHA-256 of its logits, and one that does not match is computed again), so each distillation epoch
costs about what a plain student epoch costs. The key cannot see a change to a module's code that
leaves its weights and its `repr` as they were: give such a teacher another cache_dir.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from still.data.augment import shift
from still.distill.loss import check_temperature, check_tensor, soft_dtype
from still.errors import StillError, whole
from still.train.io import atomic_write
from still.train.progress import progress

Combine = Literal["arithmetic", "geometric"]


def combine_log_probs(member_logits: torch.Tensor, temperature: float, how: Combine = "arithmetic") -> torch.Tensor:
    """Soft targets (as log-probabilities) of an ensemble. member_logits: (M, B, C) -> (B, C), in
    `soft_dtype(temperature)`: float32, or float64 above T = 20 (still.distill.loss)."""
    temperature = check_temperature(temperature)
    check_tensor("member_logits", member_logits)
    if member_logits.ndim != 3 or member_logits.shape[0] == 0:
        raise StillError(f"member logits must be (members, batch, classes) of one member or more, got "
                         f"{tuple(member_logits.shape)}")
    log_probs = F.log_softmax(member_logits.to(soft_dtype(temperature)) / temperature, dim=-1)  # (M, B, C)
    if member_logits.shape[0] == 1 and how in ("arithmetic", "geometric"):  # one member: both means are itself
        return log_probs[0]
    if how == "arithmetic":
        return torch.logsumexp(log_probs, dim=0) - math.log(member_logits.shape[0])  # (B, C)
    if how == "geometric":
        return F.log_softmax(log_probs.mean(dim=0), dim=-1)  # (B, C)
    raise StillError(f"ensemble combination must be 'arithmetic' or 'geometric', got {how!r}")


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model(x)` as float32 logits (B, C): a floating `x` goes in as the dtype of the model's first
    floating parameter (where it has one), and the logits are taken out of `.logits`, a mapping's
    "logits" or a tuple's or list's first element where the model returns one of those. Every
    module runs in eval mode, whatever mode it was put in since it became a teacher's (its own
    `train()`, or a student's that shares it), and is put back in that mode after: a teacher's
    outputs never draw dropout masks, and the caller's modes are left as they were."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
        x = x.to(dtype)
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False  # (the flag alone: `train(False)` would recurse, and may be overridden)
    try:
        out = model(x)
    finally:
        for m in training:
            m.training = True
    logits = out
    if not isinstance(logits, torch.Tensor):
        if hasattr(logits, "logits"):  # a Hugging Face ModelOutput, a named tuple
            logits = logits.logits
        elif isinstance(logits, Mapping) and "logits" in logits:
            logits = logits["logits"]
        elif isinstance(logits, (tuple, list)) and len(logits) > 0:
            logits = logits[0]
    if not isinstance(logits, torch.Tensor):
        inner = "" if logits is out else f" holding a {type(logits).__name__} where the logits should be"
        raise StillError(f"the teacher's model returned a {type(out).__name__}{inner}; expected its logits "
                         "(batch, classes) as a tensor, or as the .logits, the 'logits' entry or the first "
                         "element of what it returns")
    if not logits.is_floating_point():  # (integers failed in the probability check; complex lost its
        # imaginary part to `.float()` with a warning only)
        raise StillError(f"the teacher's model returned {logits.dtype} logits; logits must be floating point "
                         "(convert whole-number scores with .float() in the model)")
    if logits.ndim != 2:
        raise StillError(f"the teacher's model returned logits of shape {tuple(logits.shape)}; "
                         "expected (batch, classes)")
    if logits.shape[0] != len(x):  # (a reshape or a reduction over the batch: rows not the inputs')
        raise StillError(f"the teacher's model returned {logits.shape[0]} rows of logits for a batch of {len(x)} "
                         "inputs; expected one row an input")
    if logits.shape[1] < 2:
        raise StillError(f"the teacher's model returned logits of {logits.shape[1]} class: a softmax over one "
                         "class is constant, its soft targets teach nothing (a binary model's single logit z "
                         "is the two classes' [0, z])")
    precision, logits = logits.dtype, logits.float()
    if model not in _CHECKED and logits.numel():  # (its first output of some rows only: a look at the values
        # waits for a GPU)
        if _probabilities(logits, precision):
            raise StillError("the teacher's model returns probabilities (every row is non-negative and sums to 1), "
                             "not logits: its soft targets would be nearly uniform; give its logits or "
                             "log-probabilities (leave out its final softmax, or wrap it to return the log)")
        _CHECKED.add(model)
    return logits


_CHECKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the models whose first output was looked at


def _probabilities(logits: torch.Tensor, precision: torch.dtype = torch.float32) -> bool:
    """Whether every row of `logits` (B, C), C >= 2, as float32, looks like a distribution: in [0, 1],
    summing to 1 within the rounding of `precision`, the dtype the model returned them in: 1e-3, or
    twice its epsilon where that is more (float16: 0.002; bf16, whose softmax sums to 1 within about
    0.002: 0.016)."""
    if logits.ndim != 2 or logits.shape[1] < 2 or logits.numel() == 0:
        return False
    tolerance = max(1e-3, 2 * torch.finfo(precision).eps)  # each probability rounded: within eps / 2 of its own
    sums = logits.sum(-1)
    return bool(((logits >= 0) & (logits <= 1)).all() and ((sums - 1).abs() < tolerance).all())


def _freeze(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise StillError(f"a teacher's model must be a torch.nn.Module, got {type(model).__name__}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Teacher(nn.Module):
    """A frozen model whose outputs are logits (B, C), in eval mode from the start (`training` is
    False, and stays so). The model may be in any floating precision and may return its logits
    inside a structure (`.logits`, a mapping's "logits", a tuple's first element): see the module
    docstring; the logits come back as float32. Subclasses with several members override
    `member_logits` (and set `combine`)."""

    combine: Combine = "arithmetic"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = _freeze(model)
        self.train(False)  # nn.Module starts in training mode; a teacher never is

    def train(self, mode: bool = True) -> Teacher:  # a teacher never trains
        return super().train(False)

    @torch.no_grad()
    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(M, B, C): the logits of each member (one here)."""
        return _logits(self.model, x).unsqueeze(0)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The members' mean logits (B, C); for soft targets use `log_probs`."""
        return self.member_logits(x).mean(0)

    @torch.no_grad()
    def log_probs(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        """Soft targets at `temperature`, as log-probabilities (B, C)."""
        return combine_log_probs(self.member_logits(x), temperature, self.combine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


class EnsembleTeacher(Teacher):
    """M frozen models; soft targets are the arithmetic or geometric mean of their distributions.
    Each member may have its own precision and output structure (see `Teacher`)."""

    def __init__(self, models: Iterable[nn.Module], combine: Combine = "arithmetic") -> None:
        nn.Module.__init__(self)
        if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
            raise StillError(f"give an ensemble's members as a list of models, not one {type(models).__name__} "
                             "(whose layers would be taken for members)")
        models = list(models)  # (a generator, say)
        if len(models) == 0:
            raise StillError("an ensemble needs at least one member")
        if combine not in ("arithmetic", "geometric"):
            raise StillError(f"ensemble combination must be 'arithmetic' or 'geometric', got {combine!r}")
        self.members = nn.ModuleList(_freeze(m) for m in models)
        self.combine = combine
        self.train(False)

    @torch.no_grad()
    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        outs = [_logits(m, x) for m in self.members]
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) != 1:
            raise StillError(f"ensemble members disagree on the output shape: {sorted(shapes)}")
        return torch.stack(outs)  # (M, B, C)


class ShiftEnsembleTeacher(Teacher):
    """One frozen model on square images (B, size*size) or (B, size, size), as an ensemble of
    (2 max_shift + 1)^2 members: the model on the image translated by (dy, dx), |dy|, |dx| <=
    max_shift, zeros filling in. Soft targets: the arithmetic or geometric mean of their distributions."""

    def __init__(self, model: nn.Module, max_shift: int, size: int = 28, combine: Combine = "geometric") -> None:
        super().__init__(model)
        # (whole numbers, not bools, checked here: a float was taken, then failed in `range` at first use)
        if not whole(size) or size < 1:
            raise StillError(f"size (the images' side in pixels) must be an integer >= 1, got {size!r}")
        if not whole(max_shift) or not 0 <= max_shift < size:
            raise StillError(f"max_shift must be an integer in [0, {size}), got {max_shift!r}")
        if combine not in ("arithmetic", "geometric"):
            raise StillError(f"ensemble combination must be 'arithmetic' or 'geometric', got {combine!r}")
        self.max_shift, self.size, self.combine = int(max_shift), int(size), combine

    @torch.no_grad()
    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        s = self.max_shift
        return torch.stack([_logits(self.model, shift(x, dy, dx, self.size))
                            for dy in range(-s, s + 1) for dx in range(-s, s + 1)])  # (M, B, C)


def _hash_value(digest, value: Any) -> None:
    """Feed `value` (a state dict's entry: a tensor, or a module's extra state or packed parameters,
    nested tuples and dicts of them) into `digest`."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_quantized:  # (a dynamically quantized teacher's packed weights)
            value = value.dequantize()
        elif value.layout != torch.strided:
            value = value.to_dense()
        digest.update(str(tuple(value.shape)).encode() + str(value.dtype).encode())  # (as keys were before)
        digest.update(value.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (tuple, list)):
        digest.update(f"{type(value).__name__} {len(value)}".encode())
        for item in value:
            _hash_value(digest, item)
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)}".encode())
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _hash_value(digest, value[key])
    else:  # (whatever else: by how it prints; one that prints its address is simply never found again)
        digest.update(f"{type(value).__qualname__} {value!r}".encode())


def _fingerprint(teacher: Teacher, inputs: torch.Tensor) -> str:
    digest = hashlib.sha256()
    # the state dict, and the buffers it leaves out (a probe: two teachers differing only in a
    # non-persistent buffer, an input mean, shared one key and the first one's logits)
    state = teacher.state_dict()
    extra = {f"(buffer) {name}": buffer for name, buffer in teacher.named_buffers() if name not in state}
    for name, value in sorted((state | extra).items()):
        digest.update(name.encode())
        _hash_value(digest, value)
    _hash_value(digest, inputs)
    digest.update(getattr(teacher, "combine", "single").encode())
    digest.update(f"{type(teacher).__name__} {getattr(teacher, 'max_shift', 0)}".encode())
    # the modules as they print (a probe: a ReLU swapped for a Tanh, the same weights, read the old logits)
    digest.update(repr(teacher).encode())
    return digest.hexdigest()


def _logits_digest(member_logits: torch.Tensor) -> str:
    return hashlib.sha256(member_logits.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


class CachedTeacher:
    """A teacher's logits over a fixed transfer set, computed once; looked up by example index.

    Use `CachedTeacher.build(teacher, inputs)`; then `log_probs(indices, T)` gives the same soft
    targets as `teacher.log_probs(inputs[indices], T)` without running the teacher.
    """

    def __init__(self, member_logits: torch.Tensor, combine: Combine = "arithmetic") -> None:
        if not isinstance(member_logits, torch.Tensor):  # (a probe: a list's AttributeError)
            raise StillError(f"cached logits must be a tensor (members, examples, classes), got a "
                             f"{type(member_logits).__name__}")
        if member_logits.ndim != 3 or member_logits.shape[0] == 0:
            raise StillError(f"cached logits must be (members, examples, classes) of one member or more, got "
                             f"{tuple(member_logits.shape)}")
        if combine not in ("arithmetic", "geometric"):
            raise StillError(f"ensemble combination must be 'arithmetic' or 'geometric', got {combine!r}")
        self.member_logits_all = member_logits.float()  # (M, N, C)
        self.combine = combine

    @property
    def num_examples(self) -> int:
        return self.member_logits_all.shape[1]

    @property
    def num_classes(self) -> int:
        return self.member_logits_all.shape[2]

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: Teacher, inputs: torch.Tensor, batch_size: int = 1000,
              cache_dir: str | Path | None = None, desc: str = "teacher logits") -> CachedTeacher:
        """Run `teacher` over `inputs` once (or load its logits from `cache_dir`, keyed by a hash of
        the teacher's weights, its modules and the inputs: the module docstring). The inputs go to
        the teacher's device, and in its models' precision; the logits are kept as float32 (see
        `Teacher`)."""
        if not isinstance(teacher, Teacher):
            raise StillError("CachedTeacher.build needs a Teacher or EnsembleTeacher")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise StillError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(inputs, torch.Tensor):  # (a probe: a NumPy array's AttributeError, no 'to')
            raise StillError(f"inputs must be a tensor (torch.as_tensor makes one), got a {type(inputs).__name__}")
        if len(inputs) == 0:
            raise StillError("the transfer set is empty: there is nothing to cache the teacher's logits of")
        combine = getattr(teacher, "combine", "arithmetic")
        path = None
        if cache_dir is not None:
            if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
                raise StillError(f"cache_dir {cache_dir} is a file, not a folder")
            key = _fingerprint(teacher, inputs)[:24]  # (before the folder is made: nothing left if it fails)
            try:  # (before the teacher's pass, not after it: a probe's NotADirectoryError came at the end)
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StillError(f"cannot make cache_dir {cache_dir}: {e.strerror or e}") from None
            path = Path(cache_dir) / f"teacher-logits-{key}.safetensors"
            if path.is_file():
                try:
                    with safe_open(str(path), "pt") as file:
                        digest, logits = (file.metadata() or {}).get("sha256"), file.get_tensor("member_logits")
                    if digest == _logits_digest(logits):  # (a flipped byte was read as a logit of 1e37)
                        cached = cls(logits, combine)
                        if cached.num_examples == len(inputs):
                            return cached
                except Exception:  # a damaged cache entry is recomputed
                    pass
                path.unlink(missing_ok=True)  # (damaged, unchecked, or of another number of examples: recomputed)
        device = next(iter(teacher.parameters()), torch.empty(0)).device
        chunks = [teacher.member_logits(inputs[i : i + batch_size].to(device)).cpu()
                  for i in progress(range(0, len(inputs), batch_size), desc=desc, unit="batch")]
        member_logits = torch.cat(chunks, dim=1)  # (M, N, C)
        if path is not None:
            member_logits = member_logits.float().contiguous()  # (as `cls` keeps them: the digest is of these)
            atomic_write(path, lambda tmp: save_file({"member_logits": member_logits}, str(tmp),
                                                     metadata={"sha256": _logits_digest(member_logits)}))
        return cls(member_logits, combine)

    @property
    def device(self) -> torch.device:
        return self.member_logits_all.device

    def to(self, device: torch.device | str) -> CachedTeacher:
        """Keep the logits on `device` (the student's: a GPU, say), where the soft targets are then
        computed; in place, like `nn.Module.to`. `build` keeps them on the CPU."""
        self.member_logits_all = self.member_logits_all.to(device)
        return self

    def _indices(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """`indices` (B,) of examples in [0, num_examples), on `self.device`. (Checked against the
        range where they are on the CPU, as batches' indices are: on a GPU a check would wait for it.)"""
        if isinstance(indices, Sequence) and len(indices) == 0:  # (no examples, not a float32 tensor)
            indices = torch.empty(0, dtype=torch.int64)
        indices = torch.as_tensor(indices)
        # (uint8 and bool would index as masks; other integers are example numbers, as int64)
        if (indices.ndim != 1 or indices.dtype in (torch.bool, torch.uint8) or indices.is_floating_point()
                or indices.is_complex()):
            raise StillError(f"indices must be a 1-D tensor of example numbers, got {indices.dtype} of shape "
                             f"{tuple(indices.shape)}")
        if indices.dtype not in (torch.int32, torch.int64):
            indices = indices.long()
        if indices.device.type == "cpu" and len(indices):
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.num_examples:
                raise StillError(f"index {low if low < 0 else high} is outside the cached transfer set "
                                 f"(examples 0 to {self.num_examples - 1})")
        return indices.to(self.device)

    def logits(self, indices: torch.Tensor) -> torch.Tensor:
        """The members' mean logits (B, C) of the examples at `indices` (on any device), on `self.device`."""
        return self.member_logits_all[:, self._indices(indices)].mean(0)  # (B, C)

    def log_probs(self, indices: torch.Tensor, temperature: float) -> torch.Tensor:
        """Soft targets (B, C) at `temperature` of the examples at `indices` (on any device), on `self.device`."""
        return combine_log_probs(self.member_logits_all[:, self._indices(indices)], temperature, self.combine)
