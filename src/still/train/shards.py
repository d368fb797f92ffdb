"""Data parallelism across the threads of one process, for training on a CPU.

A training step of a small model is many small operators. PyTorch splits each one across its
intra-op threads, and under `OMP_WAIT_POLICY=PASSIVE` every split wakes the sleeping threads: about
100 µs a wake-up on the machine of `docs/performance.md` (session 12), and a bf16 step of the peer
benchmark's model wakes them about 600 times, for operators too small to gain much from a second
core. Sharding splits the batch instead: each of `count` worker threads runs the forward and the
backward of its own contiguous rows with its share of the intra-op threads (one each, on two cores),
and the shards' gradients add up in the parameters' `.grad`. Two shards accumulate straight into
`.grad` (PyTorch's accumulation is thread-safe), and a + b is b + a, so they give the same numbers
on every run whichever finishes first. Three or more would not: floating-point addition does not
associate, so (a + b) + c and (a + c) + b differ in the last bits. Their gradients are kept apart
(one buffer of gradients a shard) and added in shard order (`Trainer`), the same sum on every run.

The loss function of a sharded step returns its rows' share of the batch's loss (their mean times
`Shard.fraction`), so that the shards' gradients sum to the batch's. PyTorch releases the GIL inside
its operators, so the threads overlap; the Python between operators does not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from still.errors import StillError

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`, of one step's batch."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise StillError(f"shard index {self.index} is not in [0, {self.count})")

    def rows(self, total: int, what: str = "the batch") -> slice:
        """This shard's contiguous share of `total` rows (which must divide evenly)."""
        if total % self.count:
            raise StillError(f"{what} ({total} rows) must be a multiple of the number of shards ({self.count})")
        share = total // self.count
        return slice(self.index * share, (self.index + 1) * share)

    @property
    def fraction(self) -> float:
        """The share of the batch's rows: a mean loss over the shard's rows, times this, summed over
        the shards, is the mean over the batch."""
        return 1.0 / self.count


def default_shards(device: torch.device | str, batch: int, threads: int | None = None) -> int:
    """The shard count a recipe uses when not told: 2 on a CPU with at least two intra-op threads
    and a batch that splits in two, else 1 (GPUs: one stream of kernels, nothing to gain)."""
    threads = torch.get_num_threads() if threads is None else threads
    return 2 if torch.device(device).type == "cpu" and threads >= 2 and batch % 2 == 0 else 1


class ShardPool:
    """`count` persistent worker threads, each with `threads` intra-op threads (default: this
    thread's count divided among them, at least one)."""

    def __init__(self, count: int, threads: int | None = None) -> None:
        if count < 2:
            raise StillError(f"a shard pool needs at least 2 shards, got {count}")
        # every thread takes its intra-op thread count from a process-wide default at its first
        # parallel operator, then keeps it; asking forces that here, before the workers change the default
        main = torch.get_num_threads()
        self.count = count
        self.threads = threads if threads is not None else max(1, main // count)
        self._pool = ThreadPoolExecutor(count, thread_name_prefix="still-shard")
        barrier = threading.Barrier(count)

        def start(_: int) -> None:  # every worker waits for the others: one task per thread
            torch.get_num_threads()  # this thread's first ask (above) ...
            torch.set_num_threads(self.threads)  # ... then its own count
            barrier.wait(timeout=60)

        list(self._pool.map(start, range(count)))
        torch.set_num_threads(main)  # the default for threads started later, which the workers changed

    def map(self, fn: Callable[..., T], *iterables: Iterable[Any]) -> list[T]:
        """`fn` over the items, on the workers; the results in order; a worker's exception is raised here."""
        return list(self._pool.map(fn, *iterables))

    def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on one worker (its intra-op threads); its result, or its exception raised here."""
        return self._pool.submit(fn).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
