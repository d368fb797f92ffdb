"""Our Compressive Transformer against two public ones, measured in one run on one machine.

    bash bench/setup_peers.sh                               # once: .venv-bench with the peers
    .venv-bench/bin/python bench/compressive_peers.py       # [--repeats 5] [--steps 20] [--out DIR]
    .venv-bench/bin/python bench/compressive_peers.py --quick   # a smoke test: tiny batch, few steps

Implementations (the peers live only in .venv-bench, never in the project's dependencies):
    ours        still.compressive.CompressiveTransformer
    labml       labml-nn 0.5.1, labml_nn.transformers.compressive (model, memory update and attention
                reconstruction loss from its experiment.py, called unmodified)
    lucidrains  compressive-transformer-pytorch 0.4.0

One configuration for all: vocabulary 65, d_model 128, 4 layers, 4 heads, d_ff 512, segment 128,
mem_len 128, c_mem_len 128, compression rate 4 (1D convolution), attention reconstruction loss,
dropout 0, fp32, CPU, batch 16, 2 threads.

Measurements, each in a fresh subprocess (so one model's allocations and thread pools never affect
another's), interleaved: repeat r runs train, eval and generate for every implementation, in an
order rotated by r, so drifts in machine load hit all alike. Tables quote medians over repeats.
    train     tokens/s of a step: forward with the memories carried from the previous segment,
              cross entropy + compression (reconstruction) loss, backward, AdamW (PyTorch's fused
              implementation for everyone, as still's trainer uses since session 7). Warm-up segments
              first, until memory and compressed memory are full (checked); then every timed step
              must compute the compression loss (checked). No gradient clipping for anyone.
    eval      tokens/s of forward + cross entropy, eval mode, no grad, memories carried (warm-up as
              for train).
    generate  batch 1: a 512-token prompt, then 256 new tokens, each implementation with its own
              sampler (or the loop of its own training code); tokens/s = new tokens / the whole time,
              prompt included. After an untimed generation, --gen-runs (3) timed ones in the same
              process; their median counts (one timed generation until session 10).
    peak MiB  growth of the resident set: the kernel's high-water mark (VmHWM) is reset by writing
              5 to /proc/self/clear_refs once the model, optimizer and data exist, and read after the
              measurement, minus the resident set at the reset. So it counts activations, gradients,
              optimizer state, memories and the allocator's cache, not the Python interpreter,
              torch's libraries or the weights. (ru_maxrss cannot be reset and, in a child, may carry
              the parent's pre-exec peak.) For generate this includes the untimed warm-up
              generation; `gen steady MiB` is the timed generations' own (the high-water mark reset
              again after the warm-up).
    compile   ours+compile's decoding steps are built once per run, before the repeats, into an
              empty cache made for the run: on the CPU the hand-written step (still.compressive.native,
              one build serves both compiled rows), elsewhere compiled ahead of time (still.train.aot):
              the time of that first generation and the child processes' largest peak resident set
              (ru_maxrss: a forked child's may be its parent's size before exec) are printed apart.
              Every measurement then loads the built steps from that cache, as a user's later runs do.
    GFLOP/s   matmul and convolution FLOPs counted from shapes by torch.utils.flop_counter on one
              extra step (or one extra generation) of the first repeat, times the median rate;
              elementwise ops, softmax and norms are not counted. A sharded row's FLOPs are its
              unsharded twin's (the same products; a dispatch mode sees one thread's). Our counted
              training step runs with the attention kernels off (`attention.kernels_off`): they
              make the same products where the counter cannot see them (less the terms the causal
              mask zeroes, which they skip; fp32 kernels since session 30). (Before session 29 the
              bf16 rows' counts left out the products the kernel made: two a layer since session 23.)
              The counter is `still.bench.flops.flop_counter`: it also counts PyTorch's CPU
              attention (QK^T and AV of `scaled_dot_product_attention`, which ours runs in eval and
              generation), which torch's counter alone counts as 0; before 2026-12-07 our eval and
              generate counts left them out (eval 2.18 MFLOP/token where 2.97, docs/benchmarks.md).
    allocator every measuring process, whichever implementation it runs, starts with glibc's malloc
              keeping the memory it frees (the MALLOC_* variables for `still.allocator`'s settings,
              which the `still` command's process sets), so that no one's calls fault in fresh pages
              again; and, where the `still` command starts so (since session 41: glibc 2.35 or
              later, transparent huge pages in madvise mode), with its memory advised for huge pages
              (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, `still.allocator.huge_pages_environment`);
              --glibc-default leaves glibc's default for both, as every run before session 26 did.
    MFU       train GFLOP/s over the machine's matmul peak (`still bench peak`'s measurement, in a
              subprocess of its own once a repeat, before the repeat's measurements; medians), the
              bf16 rows over the bf16 peak, each row's at the threads it runs on (the -2shards rows:
              two shards of max(1, threads // 2) each, so 2 at --threads 3); not with --no-flops. At
              --threads 1 the -2shards rows (two threads) are left out.
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch is imported, here and in every worker

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from still import allocator  # noqa: E402  (no torch: the C library only)
from still.bench import at_least_one, out_folder, run_script  # noqa: E402

# The parent process never imports torch: workers import it, so the parent stays small and each
# worker starts from the same clean state.

IMPLEMENTATIONS = ("ours", "ours+compile", "ours-bf16", "ours-bf16+compile", "ours-2shards", "ours-bf16-2shards",
                   "labml", "lucidrains")
COMPILED = ("ours+compile", "ours-bf16+compile")  # compiled once per run, before the repeats
PEERS = ("labml", "lucidrains")
MEASURES = ("train", "eval", "generate")
RESULT_MARKER = "BENCH-RESULT "

# glibc's settings for keeping freed memory as environment variables (read when a process starts):
# those still.allocator gives the `still` command's process through mallopt
ALLOCATOR_ENVIRONMENT = allocator.environment()


@dataclass(frozen=True)
class BenchConfig:
    vocab_size: int = 65
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    segment_len: int = 128
    mem_len: int = 128
    c_mem_len: int = 128
    compression_rate: int = 4
    batch_size: int = 16
    """Training and evaluation batch; generation uses batch 1."""
    threads: int = 2
    warmup_segments: int = 6
    """Segments before timing; enough to fill memory and compressed memory (checked)."""
    timed_steps: int = 20
    prompt_len: int = 512
    new_tokens: int = 256
    gen_runs: int = 3
    """Timed generations per process (after the warm-up one); their median is the repeat's time."""
    learning_rate: float = 3e-4
    lucidrains_gru: bool = False
    """lucidrains' default GRU-gated residuals (True) instead of plain residuals like the others."""

    @property
    def segments_to_fill(self) -> int:
        """Segments until the memory (mem_len) and the compressed memory (c_mem_len) are full."""
        segment = self.segment_len
        return -(-self.mem_len // segment) + -(-self.c_mem_len * self.compression_rate // segment)  # ceil divisions


# ----------------------------------------------------------------------------------------------
# Worker side: one implementation, one measurement, in a fresh process.
# Shapes: B batch, L segment length, V vocabulary, d model dim, T time (labml is time-first).
# ----------------------------------------------------------------------------------------------


class Ours:
    name = "ours"

    def __init__(self, cfg: BenchConfig) -> None:
        from still.compressive import CompressiveConfig, CompressiveTransformer

        self.cfg = cfg
        self.model = CompressiveTransformer(CompressiveConfig(
            vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            d_ff=cfg.d_ff, mem_len=cfg.mem_len, c_mem_len=cfg.c_mem_len, compression_rate=cfg.compression_rate,
            compression="conv", compression_loss="attention", dropout=0.0))
        self.state = None
        self.notes: list[str] = []

    def step_loss(self, inputs, targets):
        """inputs, targets (B, L) -> (loss, whether a compression loss was computed)."""
        import torch.nn.functional as F

        out = self.model(inputs, self.state)
        self.state = out.state  # already detached
        loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())  # (B*L, V) vs (B*L,)
        if out.compression_loss is None:
            return loss, False
        return loss + out.compression_loss, True

    def memory_lengths(self) -> tuple[int, int]:
        return self.state.memory_len, self.state.compressed_len

    compile = False

    def generate(self, prompt, new_tokens: int, seed: int) -> int:
        """prompt (1, P) -> the number of tokens generated after it."""
        import torch

        from still.compressive.generate import generate

        generator = torch.Generator().manual_seed(seed)
        tokens = generate(self.model, prompt, new_tokens, segment_len=self.cfg.segment_len, generator=generator,
                          compile=self.compile)
        return len(list(tokens))  # each (B,)

    def after_training(self) -> None:
        pass


class OursCompiled(Ours):
    """Generation only: the decoding steps compiled ahead of time (built once per run before the
    repeats, loaded from the cache in every measurement)."""

    name = "ours+compile"
    compile = True


class OursBf16(Ours):
    """bf16 autocast (fp32 weights, optimizer state and loss)."""

    name = "ours-bf16"

    def step_loss(self, inputs, targets):
        from still.train.precision import autocast

        with autocast("bf16"):
            loss, compressed = super().step_loss(inputs, targets)
        return loss.float(), compressed

    def generate(self, prompt, new_tokens: int, seed: int) -> int:
        from still.train.precision import autocast

        with autocast("bf16"):
            return super().generate(prompt, new_tokens, seed)


class OursBf16Compiled(OursBf16):
    """Generation only: bf16 autocast over the prompt, and the decoding steps compiled, reading
    bf16 matrices and keys (`still.compressive.decode.Decoder`'s dtype)."""

    name = "ours-bf16+compile"
    compile = True


class OursSharded(Ours):
    """Each step split across two threads with one intra-op thread each, as `still lm train` runs it
    by default on a CPU (`still.train.shards`): each thread runs the forward and the backward of its
    8 rows and keeps their memories; the gradients add up in `.grad`, then the same optimizer step
    as everyone's. Eval: the rows split likewise (`still.compressive.generate.StreamScorer`, as
    `still lm eval` splits a batch of 16)."""

    name = "ours-2shards"
    precision = "fp32"
    shards = 2

    def __init__(self, cfg: BenchConfig) -> None:
        super().__init__(cfg)
        self.states = [None] * self.shards
        self.pool = None
        self.scorer = None  # eval's

    def step_loss(self, inputs, targets):
        """Eval only (training goes through `train_step`): the mean loss of inputs, targets (B, L)."""
        from still.compressive.generate import StreamScorer
        from still.train.precision import autocast

        if self.scorer is None:
            self.scorer = StreamScorer(self.model, inputs.shape[0], self.shards)
        with autocast(self.precision):
            return self.scorer(inputs, targets).mean(), False

    def train_step(self, inputs, targets) -> bool:
        """Forward and backward (into .grad) of inputs, targets (B, L); whether there was a compression loss."""
        import torch.nn.functional as F

        from still.train.precision import autocast
        from still.train.shards import Shard, ShardPool

        if self.pool is None:
            self.pool = ShardPool(self.shards)

        def forward_backward(index: int) -> bool:
            shard = Shard(index, self.shards)
            rows = shard.rows(inputs.shape[0])
            with autocast(self.precision):
                out = self.model(inputs[rows], self.states[index])
                self.states[index] = out.state
                loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets[rows].flatten())
                if out.compression_loss is not None:
                    loss = loss + out.compression_loss.float()
            (loss * shard.fraction).backward()
            return out.compression_loss is not None

        return all(self.pool.map(forward_backward, range(self.shards)))

    def memory_lengths(self) -> tuple[int, int]:
        state = (self.scorer.states if self.scorer is not None else self.states)[0]
        return state.memory_len, state.compressed_len

    def after_training(self) -> None:
        self.pool.close()


class OursShardedBf16(OursSharded):
    """`ours-2shards` under bf16 autocast (fp32 weights, optimizer state and loss)."""

    name = "ours-bf16-2shards"
    precision = "bf16"


class _SimpleStateModuleStub:
    """Stands in for labml_nn.helpers.metrics.SimpleStateModule, which labml-nn 0.5.1's experiment.py
    imports but no longer ships; only used there as a class attribute of its Configs."""

    def __init__(self) -> None:
        self.data = None

    def set(self, data) -> None:
        self.data = data

    def get(self):
        return self.data


class _EmptyModuleStub(types.ModuleType):
    """A module whose every attribute is an empty class: enough for annotations and base classes."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})


def import_labml_experiment() -> tuple[types.ModuleType, list[str]]:
    """labml_nn.transformers.compressive.experiment, with the three stubs labml-nn 0.5.1 needs here."""
    notes = []
    if importlib.util.find_spec("torchvision") is None:
        for name in ("torchvision", "torchvision.datasets", "torchvision.transforms"):
            sys.modules[name] = _EmptyModuleStub(name)
        sys.modules["torchvision"].datasets = sys.modules["torchvision.datasets"]
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        notes.append("labml: stubbed `torchvision` (not installed: there is no CPU build here) with an empty "
                     "module; labml_nn.helpers.datasets imports it at module level for image datasets the "
                     "benchmark never uses")
    import labml_nn.helpers.metrics as metrics

    if not hasattr(metrics, "SimpleStateModule"):
        metrics.SimpleStateModule = _SimpleStateModuleStub
        notes.append("labml: stubbed `labml_nn.helpers.metrics.SimpleStateModule` (imported by its "
                     "experiment.py, absent from labml-nn 0.5.1) with a get/set holder the benchmark never uses")
    from labml import tracker

    if not hasattr(tracker, "debug"):
        tracker.debug = lambda *args, **kwargs: None
        notes.append("labml: stubbed `labml.tracker.debug` (called in every MultiHeadAttention.forward, "
                     "removed from labml) with a no-op; in labml it only logged the attention when debugging")
    from labml_nn.transformers.compressive import experiment

    return experiment, notes


class Labml:
    """labml-nn: its AutoregressiveModel, built by its `autoregressive_model` option; the step mirrors
    its Configs.step (forward, merge_compress_memory, cross entropy, attention reconstruction loss
    when memories were compressed), without tracker, accuracy and gradient clipping."""

    name = "labml"

    def __init__(self, cfg: BenchConfig) -> None:
        experiment, self.notes = import_labml_experiment()
        from labml_nn.transformers.compressive import AttentionReconstructionLoss

        self.cfg = cfg
        self.model = experiment.autoregressive_model(types.SimpleNamespace(
            n_tokens=cfg.vocab_size, d_model=cfg.d_model, heads=cfg.n_heads, dropout=0.0, d_ff=cfg.d_ff,
            n_layers=cfg.n_layers, compression_rate=cfg.compression_rate, device="cpu"))
        # Configs.merge_compress_memory reads only these four attributes of its Configs.
        self._configs = types.SimpleNamespace(model=self.model, mem_len=cfg.mem_len, c_mem_len=cfg.c_mem_len,
                                              compression_rate=cfg.compression_rate)
        self._merge = experiment.Configs.merge_compress_memory  # @torch.no_grad, unmodified
        self.reconstruction_loss = AttentionReconstructionLoss(self.model.transformer.layers)
        self.memory = None

    def _forward(self, inputs_time_first):
        """inputs (T, B) -> logits (T, B, V); carries the memories as labml's step does."""
        logits, new_mem = self.model(inputs_time_first, self.memory)
        self.memory, mem_to_compress = self._merge(self._configs, self.memory, new_mem)
        return logits, new_mem, mem_to_compress

    def step_loss(self, inputs, targets):
        import torch.nn.functional as F

        logits, new_mem, mem_to_compress = self._forward(inputs.T)  # (L, B) in, (L, B, V) out
        loss = F.cross_entropy(logits.flatten(0, 1), targets.T.flatten())  # (L*B, V) vs (L*B,)
        # labml's step adds this loss in validation too; in eval we leave it out, like the others.
        if not (self.model.training and mem_to_compress):
            return loss, False
        return loss + self.reconstruction_loss(new_mem, mem_to_compress), True

    def memory_lengths(self) -> tuple[int, int]:
        mem, c_mem = self.memory.mem, self.memory.c_mem
        return (len(mem[0]) if mem else 0), (len(c_mem[0]) if c_mem else 0)

    def generate(self, prompt, new_tokens: int, seed: int) -> int:
        """The loop of labml's Configs.sample: greedy, one token in per step, memories merged (and
        compressed) after every step; the prompt goes in segments of L, as the others take it."""
        import torch

        self.model.eval()
        self.memory = None
        tokens = []
        with torch.no_grad():
            for start in range(0, prompt.shape[1], self.cfg.segment_len):
                logits, _, _ = self._forward(prompt[:, start:start + self.cfg.segment_len].T)  # (T, 1, V)
            for _ in range(new_tokens):
                token = logits[-1].argmax(-1)  # (B,)
                tokens.append(token)
                logits, _, _ = self._forward(token[None, :])  # (1, B) in
        return len(tokens)

    def after_training(self) -> None:
        pass


class Lucidrains:
    """compressive-transformer-pytorch: the net called directly (its AutoregressiveWrapper's training
    path keeps memories only within one call); loss = cross entropy + its aux (reconstruction) loss."""

    name = "lucidrains"

    def __init__(self, cfg: BenchConfig) -> None:
        from compressive_transformer_pytorch import CompressiveTransformer

        self.cfg = cfg
        self.model = CompressiveTransformer(
            num_tokens=cfg.vocab_size, dim=cfg.d_model, seq_len=cfg.segment_len, depth=cfg.n_layers,
            mem_len=cfg.mem_len, cmem_len=cfg.c_mem_len, cmem_ratio=cfg.compression_rate, heads=cfg.n_heads,
            gru_gated_residual=cfg.lucidrains_gru, attn_dropout=0.0, ff_dropout=0.0, attn_layer_dropout=0.0,
            reconstruction_attn_dropout=0.0)
        self.memory = None
        self.notes: list[str] = []

    def step_loss(self, inputs, targets):
        import torch.nn.functional as F

        compressing = self.model.training and self.memory is not None and self.memory.mem.shape[2] >= self.cfg.mem_len
        logits, self.memory, aux_loss = self.model(inputs, memories=self.memory)  # (B, L, V); memories detached
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # (B*L, V) vs (B*L,)
        return loss + aux_loss, compressing  # aux_loss is a zero tensor when nothing was compressed

    def memory_lengths(self) -> tuple[int, int]:
        return self.memory.mem.shape[2], self.memory.compressed_mem.shape[2]  # (layers, B, T, d)

    def generate(self, prompt, new_tokens: int, seed: int) -> int:
        """Its own sampler. It keeps memories only at segment boundaries: every new token re-feeds the
        whole current partial segment (1 to L tokens), and the first one re-feeds the prompt's last
        segment; nothing in its API avoids that. Default filter: top-k keeping 10% of the vocabulary.

        Its return value cannot be checked: after priming it keeps only the prompt's last segment but
        still drops the whole prompt length from the front, so for prompts longer than seq_len it
        returns fewer tokens than it generated (none for these lengths). We count its forward calls instead.
        """
        import torch
        from compressive_transformer_pytorch import AutoregressiveWrapper

        torch.manual_seed(seed)
        calls = []
        hook = self.model.register_forward_hook(lambda *_: calls.append(1))
        try:
            AutoregressiveWrapper(self.model).generate(prompt, new_tokens)
        finally:
            hook.remove()
        prime_segments = -(-prompt.shape[1] // self.cfg.segment_len) - 1  # all but the last, fed once each
        return len(calls) - prime_segments

    def after_training(self) -> None:
        weights = [m.to_kv.weight for m in self.model.modules() if hasattr(m, "to_kv")]
        frozen = sum(not w.requires_grad for w in weights)
        self.notes.append(f"lucidrains: after training, to_kv.weight has requires_grad=False in "
                          f"{frozen}/{len(weights)} "
                          "layers (its SelfAttention calls `self.to_kv.weight.detach_()` when computing the "
                          "reconstruction loss, so the key/value projection stops learning; measured as is)")


ADAPTERS = {"ours": Ours, "ours+compile": OursCompiled, "ours-bf16": OursBf16, "ours-bf16+compile": OursBf16Compiled,
            "ours-2shards": OursSharded,
            "ours-bf16-2shards": OursShardedBf16, "labml": Labml, "lucidrains": Lucidrains}
FLOPS_OF = {"ours-2shards": "ours", "ours-bf16-2shards": "ours-bf16"}  # whose counted FLOPs a row's are
ONLY_MEASURES = {"ours+compile": ("generate",), "ours-bf16+compile": ("generate",),
                 "ours-2shards": ("train", "eval"), "ours-bf16-2shards": ("train", "eval")}  # the others: every measure


def threads_of(impl: str, threads: int) -> int:
    """The threads `impl`'s measurement runs on, given `threads`: a sharded one's `ShardPool` gives each
    shard max(1, threads // shards) intra-op threads (2 in all at --threads 1 or 3); the others, `threads`."""
    shards = getattr(ADAPTERS[impl], "shards", 1)
    return threads if shards == 1 else shards * max(1, threads // shards)


def _proc_status_kib() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", f.read(), re.MULTILINE)}


def reset_peak_rss() -> int:
    """Reset the kernel's resident-set high-water mark; return the resident set (KiB) at the reset."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kib()["VmRSS"]


def _decoding_engine() -> str | None:
    """What ran the compiled decoding steps in this process: the hand-written step
    (`still.compressive.native`), packages compiled ahead of time (`still.train.aot`), or None
    (nothing: the steps fell back to eager)."""
    from still.compressive import native
    from still.train import aot

    if native._LIBRARY and native._LIBRARY[0] is not None:
        return "hand-written"
    return "ahead of time" if any(package is not None for package in aot._LOADED.values()) else None


def run_worker(spec: dict) -> dict:
    import torch

    from still.bench.flops import flop_counter  # (PyTorch's CPU attention counted too)

    cfg = BenchConfig(**spec["config"])
    measure, seed, count_flops = spec["measure"], spec["seed"], spec["count_flops"]
    torch.set_num_threads(spec.get("threads", cfg.threads))  # (a peak's: the threads of the rows it is for)
    if measure == "peak":  # the machine's matmul peak (`still bench peak`), the denominator of MFU
        from still.bench.peak import peak

        return {"impl": spec["impl"], "measure": measure, "seed": seed, **peak()}
    torch.manual_seed(seed)
    adapter = ADAPTERS[spec["impl"]](cfg)
    model = adapter.model
    params = sum(p.numel() for p in model.parameters())
    data_gen = torch.Generator().manual_seed(1000 + seed)
    result = {"impl": spec["impl"], "measure": measure, "seed": seed, "params": params, "flops": None}

    if measure == "compile":  # ours+compile's one-time build into the run's empty cache
        import resource

        prompt = torch.randint(cfg.vocab_size, (1, cfg.prompt_len), generator=data_gen)  # (1, P)
        baseline = reset_peak_rss()
        start = time.perf_counter()
        generated = adapter.generate(prompt, cfg.new_tokens, seed)
        seconds = time.perf_counter() - start
        peak, tokens = _proc_status_kib()["VmHWM"], generated
        result["compiler_peak_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        result["engine"] = _decoding_engine()
    elif measure == "generate":
        prompt = torch.randint(cfg.vocab_size, (1, cfg.prompt_len), generator=data_gen)  # (1, P)
        baseline = reset_peak_rss()
        adapter.generate(prompt, cfg.new_tokens, seed)  # warm-up: the same generation, untimed
        peak = _proc_status_kib()["VmHWM"]  # the table's peak: with the warm-up's one-time work
        steady_baseline = reset_peak_rss()  # and the timed generations' own
        times = []
        for _ in range(cfg.gen_runs):  # the median, as train and eval take the median of their steps
            start = time.perf_counter()
            generated = adapter.generate(prompt, cfg.new_tokens, seed)
            times.append(time.perf_counter() - start)
            if generated != cfg.new_tokens:
                raise RuntimeError(f"{adapter.name} generated {generated} tokens, expected {cfg.new_tokens}")
        seconds = statistics.median(times)
        result["steady_peak_growth_mib"] = (_proc_status_kib()["VmHWM"] - steady_baseline) / 1024
        peak = max(peak, steady_baseline + result["steady_peak_growth_mib"] * 1024)
        tokens = cfg.new_tokens
        if count_flops:
            with flop_counter() as counter:
                adapter.generate(prompt, cfg.new_tokens, seed)
            result["flops"] = counter.get_total_flops()
    else:
        n_segments = cfg.warmup_segments + cfg.timed_steps + 1  # + 1 for the FLOP count
        stream = torch.randint(cfg.vocab_size, (cfg.batch_size, n_segments * cfg.segment_len + 1), generator=data_gen)

        def segment(i):  # inputs and targets (B, L)
            start = i * cfg.segment_len
            return stream[:, start:start + cfg.segment_len], stream[:, start + 1:start + cfg.segment_len + 1]

        training = measure == "train"
        model.train(training)
        # the same optimizer for everyone: PyTorch's fused AdamW, which still's trainer builds
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, fused=True) if training else None

        def step(i) -> bool:
            if not training:
                with torch.no_grad():
                    return adapter.step_loss(*segment(i))[1]
            optimizer.zero_grad(set_to_none=True)
            if hasattr(adapter, "train_step"):  # its own forward and backward (ours, sharded)
                compressed = adapter.train_step(*segment(i))
            else:
                loss, compressed = adapter.step_loss(*segment(i))
                loss.backward()
            optimizer.step()
            return compressed

        baseline = reset_peak_rss()
        for i in range(cfg.warmup_segments):
            step(i)
        lengths = adapter.memory_lengths()
        if lengths != (cfg.mem_len, cfg.c_mem_len):
            raise RuntimeError(f"{adapter.name}: after {cfg.warmup_segments} warm-up segments the memories hold "
                               f"{lengths}, not (mem_len, c_mem_len) = {(cfg.mem_len, cfg.c_mem_len)}: raise --warmup")
        start = time.perf_counter()
        compressed = [step(cfg.warmup_segments + i) for i in range(cfg.timed_steps)]
        seconds = time.perf_counter() - start
        peak = _proc_status_kib()["VmHWM"]
        if training and not all(compressed):
            raise RuntimeError(f"{adapter.name}: no compression loss in {compressed.count(False)} timed steps")
        tokens = cfg.timed_steps * cfg.batch_size * cfg.segment_len
        if count_flops:  # still's attention kernels off: the counter sees only PyTorch's products
            try:
                from still.compressive.attention import kernels_off
            except ImportError:  # a still from before session 29 (an A/B through PYTHONPATH)
                kernels_off = contextlib.nullcontext

            with kernels_off(), flop_counter() as counter:
                step(n_segments - 1)
            result["flops"] = counter.get_total_flops()
        if training:
            adapter.after_training()
        result["memory_after_warmup"] = list(lengths)

    result.update(seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds,
                  peak_growth_mib=(peak - baseline) / 1024, peak_rss_mib=peak / 1024,
                  notes=adapter.notes, torch=torch.__version__, threads=torch.get_num_threads())
    return result


# ----------------------------------------------------------------------------------------------
# Parent side: schedule the workers, collect medians, print the tables.
# ----------------------------------------------------------------------------------------------


def run_subprocess(spec: dict) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"impl": spec["impl"], "measure": spec["measure"], "error": f"exit code {proc.returncode}: {tail}",
                "stderr": proc.stderr[-4000:]}
    return json.loads(lines[-1][len(RESULT_MARKER):])


def machine_description(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE).group(1).strip()
    except (OSError, AttributeError):
        pass

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "torch": version("torch"),
            "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "versions": {name: version(name)
                         for name in ("still", "labml-nn", "labml", "compressive-transformer-pytorch")},
            "load_average": os.getloadavg(), "OMP_WAIT_POLICY": "PASSIVE",
            "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT")}


def median_of(results: list[dict], impl: str, measure: str, key: str) -> float | None:
    values = [r[key] for r in results if r["impl"] == impl and r["measure"] == measure and r.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(ours: float | None, peers: list[float | None], higher_is_better: bool) -> str | None:
    peers = [p for p in peers if p]
    if ours is None or not peers:
        return None
    best = max(peers) if higher_is_better else min(peers)
    return f"{ours / best:.2f}x"


def report(results: list[dict], impls: list[str], measures: list[str], cfg: BenchConfig, machine: dict,
           repeats: int) -> tuple[list[dict], list[dict], str]:
    from still.train.results import format_table  # no torch import

    labels = {"train": "train tok/s", "eval": "eval tok/s", "generate": "gen tok/s"}
    rows, flop_rows = [], []
    for impl in impls:
        params = next((r["params"] for r in results if r["impl"] == impl and "params" in r), None)
        row = {"implementation": impl, "params": params}
        flop_row = {"implementation": impl}
        for m in measures:
            rate = median_of(results, impl, m, "tokens_per_s")
            row[labels[m]] = round(rate, 1) if rate is not None else None
        for m in measures:
            peak = median_of(results, impl, m, "peak_growth_mib")
            row[f"{m} peak MiB"] = round(peak, 1) if peak is not None else None
        if "generate" in measures:
            steady = median_of(results, impl, "generate", "steady_peak_growth_mib")
            row["gen steady MiB"] = round(steady, 1) if steady is not None else None
        for m in measures:
            # a sharded implementation runs its unsharded twin's products (a dispatch mode counts one thread's)
            rate, flops = median_of(results, impl, m, "tokens_per_s"), median_of(results, FLOPS_OF.get(impl, impl), m,
                                                                                  "flops")
            tokens_per_unit = cfg.new_tokens if m == "generate" else cfg.batch_size * cfg.segment_len
            flop_row[f"{m} MFLOP/token"] = round(flops / tokens_per_unit / 1e6, 2) if flops else None
            flop_row[f"{m} GFLOP/s"] = round(flops / tokens_per_unit * rate / 1e9, 2) if flops and rate else None
            if m == "train" and machine.get("peaks"):  # against the peak of the precision its products run in,
                # at the threads it runs on (a probe: the 2-shard rows' two threads against one thread's peak)
                peak = machine["peaks"][threads_of(impl, cfg.threads)]["bf16" if "bf16" in impl else "fp32"]
                flop_row["train MFU"] = f"{flops / tokens_per_unit * rate / peak:.1%}" if flops and rate else None
        rows.append(row)
        flop_rows.append(flop_row)
    peer_rows = [r for r in rows if r["implementation"] in PEERS]
    for name in [i for i in impls if i not in PEERS] if peer_rows else []:
        ratios = {"implementation": f"{name} / best peer", "params": None}
        ours_row = next(r for r in rows if r["implementation"] == name)
        for column in rows[0]:
            if column not in ratios:
                ratios[column] = ratio(ours_row[column], [r[column] for r in peer_rows],
                                       higher_is_better="tok/s" in column)
        rows.append(ratios)
    title = (f"Compressive Transformers, CPU fp32 (ours-bf16: bf16 autocast{sharded_label(cfg, impls)}), "
             f"{machine['threads']} threads: d_model {cfg.d_model}, "
             f"{cfg.n_layers} layers, {cfg.n_heads} heads, d_ff {cfg.d_ff}, segment {cfg.segment_len}, mem "
             f"{cfg.mem_len}, compressed {cfg.c_mem_len}, rate {cfg.compression_rate}, batch {cfg.batch_size} "
             f"(generation: batch 1, {cfg.new_tokens} new tokens after a {cfg.prompt_len}-token prompt, the median "
             f"of {cfg.gen_runs} in each repeat); medians of {repeats} repeat(s)")
    table = format_table(rows, title=title)
    if any(v is not None for r in flop_rows for k, v in r.items() if k != "implementation"):
        peaks = machine.get("peaks")
        said = "; ".join(f"{threads} thread{'s' if threads > 1 else ''}: fp32 {peak['fp32'] / 1e9:.1f}, bf16 "
                         f"{peak['bf16'] / 1e9:.1f}" for threads, peak in sorted((peaks or {}).items()))
        table += "\n" + format_table(flop_rows, title="Matmul, convolution and attention FLOPs counted "
                                                      "from shapes (torch.utils.flop_counter, with PyTorch's "
                                                      "CPU attention: still.bench.flops), at the median rates"
                                                      + ("; generate: per new token, the prompt included"
                                                         if "generate" in measures else "")
                                                      + (f"; train MFU: against the matmul peak measured once a "
                                                         f"repeat at the threads each row runs on (medians, GFLOP/s: "
                                                         f"{said}), bf16 rows against bf16's" if peaks else ""))
    return rows, flop_rows, table


def _shard_words(cfg: BenchConfig, impl: str) -> tuple[int, str, str]:
    """A sharded row's shards, and each shard's rows and intra-op threads in words ("8 rows", "1 thread")."""
    shards = ADAPTERS[impl].shards
    rows, threads = cfg.batch_size // shards, threads_of(impl, cfg.threads) // shards
    return shards, f"{rows} row{'s' if rows != 1 else ''}", f"{threads} thread{'s' if threads != 1 else ''}"


def sharded_label(cfg: BenchConfig, impls: list[str]) -> str:
    """The title's word on the -2shards rows, where there are any: their shards' rows and threads."""
    sharded = [i for i in impls if getattr(ADAPTERS[i], "shards", 1) > 1]
    if not sharded:
        return ""
    shards, rows, threads = _shard_words(cfg, sharded[0])
    return f"; -2shards: {shards} shards of {rows}, {threads} each"


def sharded_note(cfg: BenchConfig) -> str:
    """The note on the -2shards rows, with this run's rows and threads."""
    shards, rows, threads = _shard_words(cfg, "ours-2shards")
    return (f"ours-2shards: training and eval; each step split across {shards} threads, each with {threads} "
            "(intra-op), as `still lm train` runs it by default on a CPU with two or more threads "
            f"(still.train.shards): each thread runs the forward and backward of {rows} and keeps their memories, "
            f"the gradients add up, then the same AdamW step; in eval each thread runs the forward of its {rows} "
            f"(still.compressive.generate.StreamScorer, as `still lm eval` splits a batch of {cfg.batch_size}); its "
            "FLOPs are those of ours (not counted: the counter sees one thread); ours-bf16-2shards: the same in bf16")


STATIC_NOTES = [
    "ratios: ours / the best peer in each column (the fastest for tok/s, the smallest for MiB); > 1x is "
    "better for tok/s, < 1x better for MiB",
    "labml: the training step mirrors its experiment.py Configs.step (its model, merge_compress_memory and "
    "AttentionReconstructionLoss, unmodified) without tracker, accuracy and gradient clipping; in eval we skip "
    "the reconstruction loss that its step also computes in validation",
    "labml: RelativeMultiHeadAttention holds relative position embeddings for 2 x 4096 positions per layer "
    "(its P = 2**12), all of them parameters updated by AdamW: hence its parameter count",
    "labml: generation mirrors its Configs.sample (greedy; one token per forward; memories merged and compressed "
    "after each); ours samples from the softmax, lucidrains from the top 10% of the vocabulary: the sampling "
    "costs microseconds next to a forward pass",
    "ours: at batch 1 under OMP_WAIT_POLICY=PASSIVE without GOMP_SPINCOUNT, a small model's prompt and decoding "
    "run on one thread whatever the thread setting (still.compressive.decode.threads_for: faster there); where "
    "OpenMP's idle threads spin (GOMP_SPINCOUNT set), on all of them; the peers use the threads they are given, and at "
    "--threads 1 labml generates about twice as fast as at 2 (session 3: 536 against 282-290 tok/s), so "
    "compare generation at --threads 1 too",
    "lucidrains: its generate() re-feeds the current partial segment for every new token (memories advance "
    "only at full segments), so a token costs a forward over 1 to 128 tokens, and its first step re-feeds the "
    "prompt's last segment; its API has no way around this, so we measure what it does",
    "lucidrains: its generate() returns an empty tensor for prompts longer than seq_len (it keeps only the "
    "prompt's last segment, then slices off the whole prompt length); we count its forward calls instead",
    "lucidrains: memories carried by calling the net directly (its AutoregressiveWrapper keeps them only "
    "within one call); with to_kv frozen by its bug, its backward and AdamW skip those weights: slightly less work",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: batch 2, 2 timed steps, 8 new tokens, 1 repeat")
    parser.add_argument("--repeats", type=at_least_one, default=None, help="fresh-process repeats per measurement (5)")
    parser.add_argument("--steps", type=at_least_one, default=None, help="timed steps or segments per repeat (20)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up segments (6)")
    parser.add_argument("--batch-size", type=at_least_one, default=None, help="rows a training or evaluation step (16)")
    parser.add_argument("--gen-runs", type=at_least_one, default=None,
                        help="timed generations per repeat, after an untimed one; their median counts (3)")
    parser.add_argument("--threads", type=at_least_one, default=2, help="CPU threads every implementation gets")
    parser.add_argument("--only", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
                        help="the implementations measured (default: all)")
    parser.add_argument("--measures", nargs="+", choices=MEASURES, default=list(MEASURES),
                        help="what is measured (default: all)")
    parser.add_argument("--lucidrains-gru", action="store_true",
                        help="lucidrains with its default GRU-gated residuals (off: plain residuals, like the others)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra step per measurement)")
    parser.add_argument("--out", type=out_folder,
                        help="also write compressive_peers.json (config, machine, every result) and .md here")
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's malloc as it is (by default every measuring process keeps the memory "
                             "it frees and, where the `still` command's process does, advises it for huge "
                             "pages: still.allocator)")
    args = parser.parse_args()

    if args.worker:
        result = run_worker(json.loads(args.worker))
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return

    quick = dict(batch_size=2, timed_steps=2, new_tokens=8, gen_runs=1) if args.quick else {}
    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("timed_steps", args.steps),
                                   ("warmup_segments", args.warmup), ("gen_runs", args.gen_runs)) if v is not None}
    cfg = BenchConfig(threads=args.threads, lucidrains_gru=args.lucidrains_gru, **{**quick, **overrides})
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 5)
    for name, value in (("--repeats", repeats), ("--steps", cfg.timed_steps), ("--batch-size", cfg.batch_size),
                        ("--threads", cfg.threads), ("--gen-runs", cfg.gen_runs)):
        if value < 1:
            parser.error(f"{name} must be >= 1, got {value}")
    if cfg.warmup_segments < cfg.segments_to_fill:
        parser.error(f"--warmup must be >= {cfg.segments_to_fill} (segments until memory and compressed memory "
                     f"are full), got {cfg.warmup_segments}")
    missing = [m for m, i in (("labml_nn", "labml"), ("compressive_transformer_pytorch", "lucidrains"))
               if i in args.only and importlib.util.find_spec(m) is None]
    if missing:
        parser.error(f"{', '.join(missing)} not importable with {sys.executable}: run bash bench/setup_peers.sh "
                     "and use .venv-bench/bin/python")

    kept = not args.glibc_default and not any(name in os.environ for name in allocator.ENVIRONMENT)
    huge = allocator.huge_pages_environment() if not args.glibc_default else None  # (as the command decides)
    if kept:  # every worker, whichever implementation it measures, starts with glibc keeping freed memory
        os.environ.update(ALLOCATOR_ENVIRONMENT)
    if huge is not None:  # and, where the `still` command starts so, with malloc's memory on huge pages
        os.environ["GLIBC_TUNABLES"] = huge["GLIBC_TUNABLES"]
    machine = machine_description(cfg.threads)
    impls = [i for i in IMPLEMENTATIONS if i in args.only  # and with something to measure in this run
             and any(m in ONLY_MEASURES.get(i, MEASURES) for m in args.measures)]
    if not impls:  # (a probe: a ZeroDivisionError rotating an empty order)
        only = list(dict.fromkeys(args.only))
        parser.error(f"--measures {' '.join(dict.fromkeys(args.measures))}: nothing for --only {' '.join(only)} to "
                     "measure (" + "; ".join(f"{i} measures {', '.join(ONLY_MEASURES.get(i, MEASURES))}"
                                             for i in only) + ")")
    if cfg.threads < 2:  # (as bench/reference_speed.py: two shards would run on two threads, read against one's peak)
        left_out = [i for i in impls if threads_of(i, cfg.threads) > cfg.threads]
        impls = [i for i in impls if i not in left_out]
        if left_out:
            print(f"--threads {cfg.threads}: {', '.join(left_out)} (two threads) left out", file=sys.stderr, flush=True)
        if not impls:
            parser.error(f"--threads {cfg.threads}: {', '.join(left_out)} run on two threads: give --threads 2 or more")
    measures = [m for m in MEASURES if m in args.measures]
    results = []
    builds = {}
    compiled = [i for i in impls if i in COMPILED] if "generate" in measures else []
    if compiled:  # compiled once, into a cache of this run's own
        import shutil
        import tempfile

        aot_cache = tempfile.mkdtemp(prefix="still-bench-aot-")
        os.environ["STILL_CACHE"] = aot_cache  # the workers inherit it
    for impl in compiled:
        build = run_subprocess({"impl": impl, "measure": "compile", "seed": 0, "count_flops": False,
                                "config": dataclasses.asdict(cfg)})
        if "error" in build:
            sys.exit(f"{impl}: compiling failed: {build['error']}\n{build['stderr']}")
        if build["engine"] is None:
            sys.exit(f"{impl}: nothing was compiled (the worker fell back to eager decoding): see "
                     "still lm generate --compile's message")
        builds[impl] = build
        print(f"[compile] {impl}: first generation, compiling included, {build['seconds']:.1f} s "
              f"(steps: {build['engine']})", file=sys.stderr, flush=True)
    total = repeats * sum(m in ONLY_MEASURES.get(i, MEASURES) for m in measures for i in impls)
    done = 0
    # the matmul peak once a repeat, for the MFU of the training rows: at the threads each of them runs on
    peak_threads = sorted({threads_of(i, cfg.threads) for i in impls if "train" in ONLY_MEASURES.get(i, MEASURES)}
                          if "train" in measures and not args.no_flops else set())
    peaks: dict[int, list[dict]] = {threads: [] for threads in peak_threads}
    for repeat in range(repeats):
        for threads in peak_threads:
            peaks[threads].append(run_subprocess({"impl": "peak", "measure": "peak", "seed": repeat, "threads": threads,
                                                  "count_flops": False, "config": dataclasses.asdict(cfg)}))
            if "error" in peaks[threads][-1]:
                sys.exit(f"measuring the peak failed: {peaks[threads][-1]['error']}\n{peaks[threads][-1]['stderr']}")
        for measure in measures:
            shift = repeat % len(impls)
            for impl in impls[shift:] + impls[:shift]:  # a rotated order, so no one always goes first
                if measure not in ONLY_MEASURES.get(impl, MEASURES):
                    continue
                spec = {"impl": impl, "measure": measure, "seed": repeat,
                        "count_flops": repeat == 0 and not args.no_flops
                        and not hasattr(ADAPTERS[impl], "train_step"),  # a dispatch mode sees one thread's operators
                        "config": dataclasses.asdict(cfg)}
                result = run_subprocess(spec)
                results.append(result)
                done += 1
                shown = f"{result['tokens_per_s']:.1f} tok/s" if "error" not in result else result["error"]
                print(f"[{done}/{total}] repeat {repeat} {measure:8s} {impl:10s} {shown}", file=sys.stderr, flush=True)
    machine["load_average_end"] = os.getloadavg()
    if builds:
        shutil.rmtree(aot_cache, ignore_errors=True)

    machine["peaks"] = {threads: {precision: statistics.median(p[precision] for p in measured)
                                  for precision in ("fp32", "bf16")} for threads, measured in peaks.items()}
    machine["peak"] = machine["peaks"].get(cfg.threads)  # (at --threads, as before the rows' own)
    rows, flop_rows, table = report(results, impls, measures, cfg, machine, repeats)
    notes = list(dict.fromkeys(n for r in results for n in r.get("notes", [])))  # in order, once each
    with_ratios = "ours" in impls and any(p in impls for p in PEERS)
    noted = impls + (["ratios"] if with_ratios else [])
    notes += [n for n in [sharded_note(cfg), *STATIC_NOTES] if n.split(":")[0] in noted]
    tunables = os.environ.get("GLIBC_TUNABLES")
    notes.append("allocator: " + (
        "every measuring process, of every implementation, ran with glibc's malloc keeping the memory it frees "
        f"({' '.join(f'{k}={v}' for k, v in ALLOCATOR_ENVIRONMENT.items())}), as the `still` command's process "
        "does (still.allocator)" if kept else
        "glibc's malloc keeping or giving back freed memory as the environment left it (--glibc-default, or "
        "MALLOC_* set by the caller)")
        + (f"; GLIBC_TUNABLES={tunables} for every process" + (" (set here as the `still` command sets it: malloc's "
           "memory on huge pages)" if huge else "") if tunables else "; no GLIBC_TUNABLES")
        + ("; --glibc-default leaves glibc's default" if not args.glibc_default else ""))
    if "lucidrains" in impls:
        notes.append("lucidrains: built with its default GRU-gated residuals (--lucidrains-gru): two GRUCells per "
                     "layer that the others do not have" if cfg.lucidrains_gru else
                     "lucidrains: built with gru_gated_residual=False (plain residuals, like the others); its default "
                     "GRU gating adds two GRUCells per layer (--lucidrains-gru measures that)")
    warmup = {r["impl"]: r["memory_after_warmup"] for r in results if "memory_after_warmup" in r}
    errors = [r for r in results if "error" in r]

    # GOMP_SPINCOUNT, when set, reaches every worker (they inherit the environment): OpenMP's threads
    # then spin that many times before they sleep, instead of none (docs/benchmarks.md, session 11)
    spin = f", GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}" if os.environ.get("GOMP_SPINCOUNT") else ""
    print(f"machine: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), {cfg.threads} threads, "
          f"OMP_WAIT_POLICY=PASSIVE{spin}; torch {machine['torch']}; Python {machine['python']}; {machine['date']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    print("load average (1, 5, 15 min) at start {} and end {}".format(
        *(", ".join(f"{x:.2f}" for x in machine[k]) for k in ("load_average", "load_average_end"))))
    print(f"timing: {cfg.warmup_segments} warm-up segments, then {cfg.timed_steps} timed steps; each measurement "
          f"in a fresh subprocess, implementations interleaved; memories (mem, compressed) after warm-up: "
          + ", ".join(f"{k} {tuple(v)}" for k, v in warmup.items()))
    print("peak MiB: growth of the resident set (VmHWM reset via /proc/self/clear_refs after building the model, "
          "optimizer and data), warm-up included; gen steady MiB: the timed generations' own, reset again after "
          "its warm-up")
    for impl, build in builds.items():
        if build["engine"] == "hand-written":
            how = (f"the hand-written decoding step (still.compressive.native), built once before the repeats into "
                   f"an empty cache by the first such row, then loaded (this row's first generation took "
                   f"{build['seconds']:.1f} s; its child processes' largest peak resident set "
                   f"{build['compiler_peak_mib']:.0f} MiB)")
        else:
            how = (f"its decoding steps compiled ahead of time once, before the repeats, into an empty cache: the "
                   f"first generation took {build['seconds']:.1f} s with the compiling; the largest compiling "
                   f"process's peak resident set {build['compiler_peak_mib']:.0f} MiB (once per shape, two child "
                   "processes side by side)")
        print(f"{impl}: {how}; the generating process's growth {build['peak_growth_mib']:.1f} MiB; every measurement "
              "below loads the built steps from that cache")
    print()
    print(table)
    print("Notes:")
    for note in notes:
        print(f"- {note}")
    if args.out:
        from still.train.results import write_results

        write_results(args.out, "compressive_peers", rows, title=table.splitlines()[0],
                      meta={"config": dataclasses.asdict(cfg), "machine": machine, "repeats": repeats,
                            "flops": flop_rows, "notes": notes, "results": results, "compile": builds})
        print(f"\nwrote {os.path.join(args.out, 'compressive_peers.json')} and .md")
    if errors:
        for r in errors:
            print(f"\nFAILED {r['impl']} {r['measure']}: {r['error']}\n{r['stderr']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_script(main)
