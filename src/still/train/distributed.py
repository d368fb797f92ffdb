"""Data parallelism across processes, started by `torchrun`.

    torchrun --standalone --nproc-per-node 2 -m still lm train ...      # one node, two processes
    torchrun --nnodes 2 --node-rank 0 --master-addr HOST --master-port 29500 --nproc-per-node 8 \\
        -m still lm train ...                                           # two nodes of 8 GPUs

`setup()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins the process group:
NCCL when each process has a GPU, gloo on CPUs. Without torchrun it returns a single-process
`Dist` and nothing else changes. The recipes keep the *global* batch of their config and give each
rank its own contiguous share of the rows, so a config means the same experiment on any number of
ranks, and a checkpoint written on N ranks resumes on M (any M dividing the batch).
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from still.errors import StillError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: writes checkpoints and results, prints."""
        return self.rank == 0

    def rows(self, total: int, what: str = "the batch") -> slice:
        """This rank's contiguous share of `total` rows (which must divide evenly)."""
        if total % self.world:
            raise StillError(f"{what} ({total} rows) must be a multiple of the number of processes ({self.world})")
        share = total // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def _all_reduce(self, value: torch.Tensor, op) -> torch.Tensor:
        if not self.enabled:
            return value
        value = value.clone()
        torch_dist.all_reduce(value, op=op)
        return value

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(value, torch_dist.ReduceOp.SUM)

    def all_min(self, value: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(value, torch_dist.ReduceOp.MIN)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `tensor` along dim 0, in rank order (every rank gets the result)."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        torch_dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    def gather_list(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape on all), on the CPU, indexed by rank (every rank gets them);
        separate tensors, not views of one (safetensors refuses to save tensors that share memory)."""
        rows = self.gather_rows(tensor.to(self.device)[None])  # (world, ...); NCCL gathers GPU tensors
        return [row.cpu().clone() for row in rows]

    def barrier(self) -> None:
        """Wait for every rank, however long rank 0's work alone takes (a checkpoint, the results):
        on a group of its own without the process group's time limit (`PATIENT`)."""
        if self.enabled:
            torch_dist.barrier(group=_patient[0] if _patient else None)

    def check_same(self, value: int, what: str, advice: str, show: bool = True) -> None:
        """A `StillError` on every rank (rank 0 says it) where the ranks do not all hold `value` (an
        integer of 63 bits at most; `show`: the values in the message): a run whose ranks read other
        folders or other data trained on together unsaid, each its own (a probe: one rank resumed,
        the other started afresh)."""
        if not self.enabled:
            return
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        low, high = int(self.all_min(mine)), -int(self.all_min(-mine))
        if low != high:
            values = f" ({low} on one, {high} on another)" if show else ""
            raise StillError(f"the processes disagree on {what}{values}: {advice}")

    def on_main(self, fn: Callable[[], None]) -> None:
        """Run `fn` on rank 0 alone (checks of the run folder, its first files), every rank waiting
        for it; where it raises a `StillError` or an `OSError` (a folder that cannot be written),
        every rank raises: rank 0 its own, which it prints, and the others a `StillError` that says
        rank 0 refused the run. (After a barrier, rank 0's refusal left the others to fail in gloo's
        'connection closed by peer', a traceback each.)"""
        error: Exception | None = None
        if self.main:
            try:
                fn()
            except (StillError, OSError) as e:
                error = e
        if self.enabled and self.all_sum(torch.tensor([float(error is not None)], device=self.device)).item():
            error = error or StillError("rank 0 refused the run (its message says why)")
        if error is not None:
            raise error


_current = Dist()
# a barrier's wait: the process group's own limit (30 minutes on gloo, 10 on NCCL) ended a probe's run
# under torchrun where rank 0 alone evaluated the whole splits for longer, every rerun the same way;
# a rank that dies still ends the others' wait at once ("connection closed")
PATIENT = datetime.timedelta(days=7)
_patient: list = []  # the gloo group of `Dist.barrier`, with PATIENT for its limit (where started by torchrun)


def current() -> Dist:
    return _current


def default_device(local_rank: int = 0) -> torch.device:
    """The GPU of this process when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def process_device() -> torch.device:
    """Where this process computes: under torchrun its own device (its GPU, or the CPU), else the
    first GPU where there is one, else the CPU. Joins the process group first (`setup`)."""
    dist = setup()
    return dist.device if dist.enabled else default_device()


def setup() -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): this process's GPU and NCCL
    where there are GPUs, else the CPU and gloo. Idempotent."""
    global _current
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _current.enabled:
        return _current
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = default_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    _patient[:] = [torch_dist.new_group(backend="gloo", timeout=PATIENT)]  # (gloo also beside NCCL: CPU tensors)
    _current = Dist(rank, world, local_rank, device)
    atexit.register(teardown)
    return _current


def finish() -> None:
    """The end of a command that succeeded: wait for every rank, then leave the process group.
    A rank that tears down while another is still at work (rank 0 writing the results) can abort
    at exit in the backend's threads ("terminate called without an active exception")."""
    _current.barrier()
    teardown()


def teardown() -> None:
    """Leave the process group. Garbage is collected first: a DistributedDataParallel wrapper left
    in a reference cycle keeps the group's backend alive past `destroy_process_group`, to be torn
    down during the interpreter's own exit, where gloo's threads sometimes abort the process
    ("terminate called without an active exception": about 1 run in 30 of two CPU ranks here,
    none in 60 with the collection)."""
    global _current
    if torch_dist.is_initialized():
        gc.collect()
        torch_dist.destroy_process_group()  # (every group: `_patient`'s too)
    _patient.clear()
    _current = Dist()
