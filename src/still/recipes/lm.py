"""Character-level language modelling with the Compressive Transformer: train, evaluate, generate.

Training streams B contiguous rows of whole documents (`TokenStreams`), carrying each row's
memories from one segment to the next and resetting them where a new document starts. The loss is
the language-model cross entropy plus the compression loss; they train disjoint parameters
(model.py), and, as in DeepMind's reference code, their gradients are clipped separately. Adam
with a linear warm-up and cosine decay; the paper clips at norm 0.1.

The Trainer's "epochs" are evaluation intervals of `eval_every` steps; the stream position is a
pure function of the step, so a run resumes exactly (memories included: they are saved in every
checkpoint). Train and evaluation memories are kept apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from still.compressive import attention, native as native_step
from still.compressive.generate import eval_shards, evaluate_streams, generate
from still.compressive.memory import MemoryState
from still.compressive.model import CompressiveConfig, CompressiveTransformer
from still.config import (
    changed_paths,
    changed_settings,
    check_fields,
    from_dict,
    load_config,
    replace,
    save_config,
    to_dict,
)
from still.data.encoded import EncodedCorpus, load_encoded
from still.data.text import CORPUS_KINDS, NotInVocabulary, Segment, TokenStreams, Vocab, absolute_corpus
from still.errors import StillError, check
from still.recipes.common import (
    STAGE_FILES,
    check_run_kind,
    check_stage_config,
    hold_run_folder,
    plot_curves,
    report_whole,
    run_kind,
)
from still.train import checkpoint as ckpt, distributed
from still.train.aot import compile_failures_run_eagerly, torch_compile_problem
from still.train.io import atomic_write, atomic_write_text, printable
from still.train.loop import Trainer
from still.train.optim import OptimConfig, build_optimizer, build_scheduler
from still.train.precision import autocast, bf16_slower, check_precision
from still.train.progress import log, progress
from still.train.results import format_table, write_results
from still.train.seed import check_seed, seed_everything
from still.train.shards import Shard, default_shards


@dataclass(frozen=True)
class LMConfig:
    preset: str = "quick"
    model: CompressiveConfig = CompressiveConfig(d_model=128, n_layers=2, n_heads=4, d_ff=512, mem_len=64,
                                                 c_mem_len=64, compression_rate=4, dropout=0.1)
    """The model; its vocab_size is set from the corpus."""
    optim: OptimConfig = OptimConfig(name="adam", lr=1e-3, schedule="cosine", warmup_fraction=0.05,
                                     min_lr_ratio=0.1, grad_clip=0.1)
    corpus: str = "shakespeare"
    """shakespeare, enwik8:PATH (byte-level), pg19:DIR, wikitext103:DIR, or a UTF-8 text file or folder."""
    byte_level: bool = False
    batch_size: int = 16
    segment_len: int = 64
    steps: int = 1000
    eval_every: int = 250
    eval_segments: int | None = 40
    """Validation segments at each interval (None: the whole split); the final evaluation is whole."""
    eval_fill_rows: bool = False
    """Evaluation (validation and the final passes) of a split with fewer documents than rows: cut
    them into contiguous pieces, one a row (`TokenStreams`' fill_rows; training always does). Much
    faster for enwik8's one document; each piece is read without the text before it, so the loss is
    a little higher than over whole documents."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast; float32 weights, optimizer state and losses)."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)  # values of the annotated types; lists given for tuples stored as tuples
        check_precision(self.precision)
        kind = next((k for k in CORPUS_KINDS if self.corpus.startswith(k)), "")  # ("" names the working folder)
        check(self.corpus[len(kind):].strip() != "",
              f"corpus must name a corpus (shakespeare, a file or folder, enwik8:PATH ...), got {self.corpus!r}")
        for name in ("batch_size", "segment_len", "steps", "eval_every"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        check_seed(self.seed)
        check(self.eval_segments is None or self.eval_segments > 0,
              f"eval_segments must be > 0, got {self.eval_segments}")
        check(self.steps % self.eval_every == 0,
              f"steps ({self.steps}) must be a multiple of eval_every ({self.eval_every}, the preset's unless "
              "given: --eval-every)")
        check(self.byte_level or not self.corpus.startswith("enwik8:"),
              "enwik8 is read as bytes: it needs byte_level=True (--byte-level)")
        rate = self.model.compression_rate
        check(self.model.c_mem_len == 0 or self.segment_len % rate == 0,
              f"segment_len ({self.segment_len}) must be a multiple of compression_rate ({rate})")


REFERENCE_MODEL = CompressiveConfig(d_model=256, n_layers=6, n_heads=4, d_ff=1024, mem_len=128, c_mem_len=128,
                                    compression_rate=4, dropout=0.1)
PRESETS: dict[str, LMConfig] = {
    "quick": LMConfig(),
    # the smaller preset of the compression-function and loss ablations (docs/results/shakespeare.md);
    # budgets: what fits in one working session on two CPU cores with bf16 (1.5M and 4.1M characters)
    "ablation": LMConfig(preset="ablation",
                         model=CompressiveConfig(d_model=128, n_layers=4, n_heads=4, d_ff=512, mem_len=64, c_mem_len=64,
                                                 compression_rate=4, dropout=0.1),
                         segment_len=64, steps=1500, eval_every=250, eval_segments=60),
    "reference": LMConfig(preset="reference", model=REFERENCE_MODEL,
                          optim=OptimConfig(name="adam", lr=5e-4, schedule="cosine", warmup_fraction=0.02,
                                            min_lr_ratio=0.1, grad_clip=0.1),
                          segment_len=128, steps=2000, eval_every=250, eval_segments=60),
}


def with_overrides(config: LMConfig, model: dict[str, Any] | None = None, **overrides: Any) -> LMConfig:
    changes = {k: v for k, v in overrides.items() if v is not None}
    if model:
        changes["model"] = replace(config.model, **{k: v for k, v in model.items() if v is not None})
    return replace(config, **changes)


def eval_streams(docs: list[torch.Tensor], names: list[str], rows: int, config: LMConfig, fill_rows: bool,
                 split: str, hint: str, say: bool = True) -> TokenStreams:
    """The streams to evaluate a split on; says so (where `say`) when the split is one document (enwik8,
    a single file), read as one row, and `fill_rows` would fill the batch (`hint`: how to ask for it).
    (Not for a few documents, as Shakespeare's two: the bundled default's output stays quiet.)"""
    streams = TokenStreams(docs, rows, config.segment_len, names, fill_rows=fill_rows)
    if say and not fill_rows and len(docs) == 1 and rows > 1:
        log(f"the {split} split is one document: evaluating it as one row (of a batch of {rows}); {hint} "
            "cuts it into a piece a row (faster; each piece is read without the text before it)")
    return streams


class TrainStream:
    """Step s of training: a position in pass p over the training documents, dealt to rows anew
    (shuffled with seed p) for every pass. A pure function of s, so a resumed run sees the same data."""

    def __init__(self, documents: list[torch.Tensor], config: LMConfig) -> None:
        # (an empty document has no targets: a probe's two empty files made steps of none, each an update
        # spent on nothing, counted as 0 bits in the interval's mean)
        self.documents, self.config = [doc for doc in documents if len(doc)], config
        self._streams: dict[int, TokenStreams] = {}
        self._starts = [0]  # first step of each pass seen so far
        self._lock = threading.Lock()  # the shards of a step ask for it from their own threads
        self._last: tuple[int, Segment] | None = None  # and get the one segment, made once

    def _pass(self, index: int) -> TokenStreams:
        if index not in self._streams:
            self._streams = {index: TokenStreams(self.documents, self.config.batch_size, self.config.segment_len,
                                                 shuffle_seed=self.config.seed * 1_000_003 + index, fill_rows=True)}
        return self._streams[index]

    @property
    def rows(self) -> int:
        """Rows of every batch: the batch size, unless the documents have fewer segments in all."""
        return self._pass(0).batch_size

    def segment(self, step: int) -> Segment:
        with self._lock:
            if self._last is None or self._last[0] != step:
                self._last = step, self._segment(step)
            return self._last[1]

    def _segment(self, step: int) -> Segment:
        while self._starts[-1] <= step:  # extend the pass boundaries up to `step`
            self._starts.append(self._starts[-1] + len(self._pass(len(self._starts) - 1)))
        index = max(i for i, start in enumerate(self._starts) if start <= step)
        return self._pass(index).segment(step - self._starts[index])


def _load_data(config: LMConfig, cache) -> EncodedCorpus:
    """The corpus's splits as ids and its vocabulary (`load_encoded`: mapped from its cache entry
    where there is a current one; under torchrun one process of each machine makes a missing entry
    while the others wait for it, on the entry's lock)."""
    corpus = load_encoded(config.corpus, cache=cache, byte_level=config.byte_level)
    n_train = corpus.train_tokens
    check(n_train >= config.segment_len, f"the training split of {config.corpus} has {n_train} "
                                         f"{corpus.vocab.unit}s, fewer than one segment ({config.segment_len})")
    return corpus


def train_lm(config: LMConfig, out: str | Path, cache=None, overwrite: bool = False, print_table: bool = True,
             on_nonfinite: str = "stop", keep: int = 2, shards: int | None = None, compile: bool = False) -> dict:
    """Train, evaluate and write the results table. `shards`: split each step across this many CPU
    threads (`still.train.shards`; default: 2 on a CPU with two or more threads, 1 under torchrun
    or on a GPU). `compile`: `torch.compile` each layer's feed-forward block
    (`CompressiveTransformer.compile_feed_forward`; where compiling cannot work, says why and trains
    without it; where it can, a function that fails to compile later runs eagerly while the run
    lasts: `compile_failures_run_eagerly`). Not part of the run's configuration: a run resumes with
    or without it."""
    out = Path(out)
    check_run_kind(out, "language-model", STAGE_FILES)
    with hold_run_folder(out), compile_failures_run_eagerly() if compile else contextlib.nullcontext():
        return _train_lm(config, out, cache, overwrite, print_table, on_nonfinite, keep, shards, compile)


def _kind_and_path(corpus: str) -> tuple[str, str]:
    """A corpus name's kind (of `CORPUS_KINDS`; "" for a file or folder, and for shakespeare) and path."""
    kind = next((k for k in CORPUS_KINDS if corpus.startswith(k)), "")
    return kind, corpus[len(kind):]


def _other_path(stored: str, given: str) -> tuple[str, str] | None:
    """The paths of a run's stored corpus (absolute) and of `given`, where `given` names another path
    of the same kind; else None."""
    (kind, path), (given_kind, given_path) = _kind_and_path(stored), _kind_and_path(given)
    return (path, given_path) if stored != given and kind == given_kind and os.path.isabs(path) else None


def _same_corpus(stored: str, given: str) -> bool:
    """Whether a run's stored corpus (absolute) is the file or folder `given` names under another
    path (a symbolic link, a hard link, a bind mount), of the same kind."""
    paths = _other_path(stored, given)
    try:
        return paths is not None and os.path.samefile(*paths)
    except OSError:
        return False


def _moved_corpus(recorded: dict, given: str, corpus: EncodedCorpus) -> bool:
    """Whether `corpus`, read from `given`, another path than the run's stored corpus (absolute) of
    the same kind, is the run's text moved or copied there: it has the digests the run `recorded`
    (its stage.json: `corpus_sha256`, `split_sha256`; a run made before they were recorded cannot be told)."""
    return (_other_path(recorded["corpus"], given) is not None
            and recorded.get("corpus_sha256") == corpus.digest
            and recorded.get("split_sha256") == dict(corpus.split_digests))


def _older_relative_corpus(stage: Path, corpus: str) -> None:
    """A run made before its corpus's path was stored absolute (`absolute_corpus`) names it as
    given: where that is `corpus` seen from here, it is written absolute, so the same command resumes it."""
    try:
        existing = json.loads(stage.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    stored = existing.get("corpus") if isinstance(existing, dict) else None
    if isinstance(stored, str) and stored != corpus and absolute_corpus(stored) == corpus:
        atomic_write_text(stage, json.dumps({**existing, "corpus": corpus}, indent=2,
                                            sort_keys=True) + "\n")


def _train_lm(config: LMConfig, out: Path, cache, overwrite: bool, print_table: bool, on_nonfinite: str,
              keep: int, shards: int | None, compile: bool) -> dict:
    config = replace(config, corpus=absolute_corpus(config.corpus))  # the same corpus for `lm eval` from anywhere
    device = distributed.process_device()  # joins the process group where started by torchrun
    dist = distributed.current()
    recorded = _stage_record(out)  # (read once: the corpus and its digests)
    stored = recorded.get("corpus")
    if isinstance(stored, str) and _same_corpus(stored, config.corpus):  # (a probe: through a symbolic link, the
        # run's own corpus was "different settings (corpus)", and the refusal offered --overwrite)
        if dist.main:
            log(f"--corpus {printable(config.corpus)} is {printable(str(out))}'s corpus {printable(stored)}: the run "
                "reads it as that")
        config = replace(config, corpus=stored)
    corpus = _load_data(config, cache)
    moved_from = other_corpus = None  # the run's stored corpus, where --corpus is its text elsewhere, or other text
    if isinstance(stored, str) and stored != config.corpus:
        if _moved_corpus(recorded, config.corpus, corpus):  # (a probe: a project folder moved, its run's
            # corpus was "different settings (corpus)" for good, though byte-identical)
            moved_from = stored
            if dist.main:
                log(f"--corpus {printable(config.corpus)} has the text of {printable(str(out))}'s corpus "
                    f"{printable(stored)} (the digests the run recorded): the run reads it from there from now on")
        else:
            other_corpus = stored
    dist.check_same(int(corpus.digest[:15], 16), "the corpus's text (its digest)",
                    "every process must read the same corpus (on several machines, the same files)", show=False)
    vocab = corpus.vocab
    config = replace(config, model=replace(config.model, vocab_size=len(vocab)))
    train_docs, _ = corpus.split("train")
    stream = TrainStream(train_docs, config)
    # fails early if the batch size does not split (a corpus of fewer segments than --batch-size gives fewer
    # rows: named as such, not as the batch size asked)
    rank_rows = dist.rows(stream.rows, "the batch size" if stream.rows == config.batch_size else
                          f"the rows the training text fills (fewer than the batch size {config.batch_size}: it "
                          "has fewer segments)")
    fewer = (f"the training text has only {stream.rows} segments of {config.segment_len} tokens, fewer than the "
             f"batch size {config.batch_size}")
    if stream.rows < config.batch_size and dist.main:  # (a probe: a batch of 2**63 trained fewer rows unsaid)
        log(f"--batch-size {config.batch_size}: a step trains {stream.rows} rows ({fewer})")
    n_rows = rank_rows.stop - rank_rows.start  # this rank's rows of every batch
    if shards is None:
        shards = default_shards(device, n_rows) if not dist.enabled else 1
    check(shards == 1 or not dist.enabled, f"shards ({shards}) split a step across the threads of one process: "
                                            "not with torchrun, whose processes each train their own rows already")
    check(shards >= 1 and n_rows % shards == 0,
          f"shards ({shards}) must be >= 1 and divide the rows of a batch ({n_rows}"
          + (" per process" if dist.enabled else "") + (f": {fewer})" if stream.rows < config.batch_size else ")"))

    def check_and_mark() -> None:
        _older_relative_corpus(out / "stage.json", config.corpus)
        # the corpus's text, by its ids' digest, beside the settings: a run never resumes (or reports a
        # finished run) on text other than it trained on; a run made before it was recorded takes this one
        digest = {"corpus_sha256": corpus.digest, "split_sha256": dict(corpus.split_digests),
                  "vocab_sha256": _vocab_digest(vocab.to_json())}
        settings = to_dict(config) | digest
        try:  # a moved corpus is checked as the run's, its text being the run's, then recorded where it is now
            check_stage_config(out, settings | ({"corpus": moved_from} if moved_from else {}), overwrite,
                               defaults=to_dict(LMConfig()) | digest)
        except StillError as e:
            if other_corpus is None:
                raise
            how = ("its text at another path is taken as it" if recorded.get("corpus_sha256") is not None else
                   "it recorded no digest of its text, an older still's run: put the corpus back there")
            raise StillError(f"{e} (its corpus: {other_corpus}; {how})") from None
        if moved_from:
            atomic_write_text(out / "stage.json", json.dumps(settings, indent=2, sort_keys=True) + "\n")
        save_config(config, out / "config.json")
        atomic_write_text(out / "vocab.json", vocab.to_json())

    dist.on_main(check_and_mark)

    valid_docs, valid_names = corpus.split("valid")
    valid = eval_streams(valid_docs, valid_names, config.batch_size, config, config.eval_fill_rows, "valid",
                         "--eval-fill-rows", say=dist.main)

    seed_everything(config.seed)
    model = CompressiveTransformer(config.model).to(device)
    if compile:
        problem = torch_compile_problem(device)
        if problem is None:
            model.compile_feed_forward()
        else:
            log(f"--compile: cannot compile ({problem[:300]}); training without compiling")
    if dist.enabled:  # the same weights everywhere (DDP checks), a different dropout stream per rank
        torch.manual_seed(config.seed + 1_000_003 * dist.rank)
    # data parallel: each rank reads its own contiguous rows of every global batch and keeps their memories
    # (device_ids None, also on a GPU: DDP moves no inputs, so the resets stay on the CPU, as the memories'
    # validity flags do, and are read there without waiting for the GPU; the rest is moved below)
    net = (torch.nn.parallel.DistributedDataParallel(model, device_ids=None, find_unused_parameters=True)
           if dist.enabled else model)
    optimizer = build_optimizer(model.parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, config.steps)
    # each shard's memories (shard i: rows i * n / shards ... of this rank's), kept apart between steps
    memory: list[MemoryState | None] = [None] * shards
    lm_losses: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (step, shard): (nll sum, count)
    carried: list[torch.Tensor] = []  # this interval's steps before a resume, from the checkpoint: `interval_losses`

    def loss_fn(_, step: int, shard: Shard | None = None) -> torch.Tensor:
        segment = stream.segment(step)
        rows = dist.rows(segment.inputs.shape[0], "the batch size")
        # the mean over the global batch's targets once DDP averages the ranks' gradients (or the
        # shards' gradients add up): every shard divides by the count of all of this rank's targets
        count = dist.all_sum((segment.targets[rows] != -100).sum().to(device)).clamp_min(1)
        index = 0
        if shard is not None:
            index, within = shard.index, shard.rows(rows.stop - rows.start, "the batch size")
            rows = slice(rows.start + within.start, rows.start + within.stop)
        inputs, targets = (t[rows].to(device) for t in (segment.inputs, segment.targets))
        result = net(inputs, memory[index], reset=segment.reset[rows])  # (the resets read on the CPU)
        memory[index] = result.state.detach()
        nll = F.cross_entropy(result.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                              reduction="sum")
        lm_losses[step, index] = nll.detach(), (targets != -100).sum()
        lm = nll * dist.world / count
        if result.compression_loss is None:
            return lm
        return lm + (result.compression_loss if shard is None else result.compression_loss * shard.fraction)

    def interval_losses() -> torch.Tensor:
        """(k, 2) float64 on the CPU: each step of this interval so far, [nll sum, target count] over
        every shard and rank; the steps before a resume first (then the training bits of an
        interrupted interval are those of an uninterrupted one)."""
        steps: dict[int, torch.Tensor] = {}
        for (step, _), (nll, count) in sorted(lm_losses.items()):
            total = steps.setdefault(step, torch.zeros(2, dtype=torch.float64, device=device))
            total += torch.stack([nll.double(), count.double()])
        # (every rank has the same steps)
        mine = [dist.all_sum(torch.stack(list(steps.values()))).cpu()] if steps else []
        return torch.cat([*carried, *mine]) if carried or mine else torch.zeros(0, 2, dtype=torch.float64)

    def memory_tensors() -> dict[str, torch.Tensor]:  # for the checkpoint: every rank's rows (all of its shards')
        losses = {"train_losses": interval_losses()}
        if memory[0] is None:
            return losses
        parts = [state.to_tensors() for state in memory]
        local = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        return {**{k: dist.gather_rows(v) for k, v in local.items()}, **losses}

    def load_memory(tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        carried[:] = [tensors.pop("train_losses")] if "train_losses" in tensors else []
        mine = {k: v[dist.rows(v.shape[0], "the checkpoint's memories")].to(device) for k, v in tensors.items()}
        for i in range(shards):
            part = {k: v[Shard(i, shards).rows(v.shape[0], "the checkpoint's memories")] for k, v in mine.items()}
            memory[i] = MemoryState.from_tensors(part) if part else None

    def eval_split(streams: TokenStreams) -> int:  # evaluation's own shards, where training's are split
        if shards <= 1:
            return 1
        return eval_shards(model, streams.batch_size, config.segment_len, precision=config.precision)

    def evaluate(net) -> dict[str, Any]:
        result = evaluate_streams(net, valid, max_segments=config.eval_segments, shards=eval_split(valid))
        losses = interval_losses()  # (k, 2)
        # the steps taken (--on-nonfinite skip drops the others) that had targets (a step of none is no 0)
        losses = losses[losses[:, 0].isfinite() & (losses[:, 1] > 0)]
        means = losses[:, 0] / losses[:, 1]  # each step's mean over its targets
        train_bits = means.mean().item() / math.log(2) if len(means) else None
        lm_losses.clear()
        carried.clear()
        return {"step": (len(trainer.state.history) + 1) * config.eval_every, "train_bits": train_bits,
                "valid_bits": result["bits_per_token"]}

    def batches(interval: int) -> range:
        return range(interval * config.eval_every, (interval + 1) * config.eval_every)

    groups = [model.model_parameters()] + ([model.compressor_parameters()] if model.compressor_parameters() else [])
    trainer = Trainer(model, loss_fn, optimizer, scheduler, grad_clip=config.optim.grad_clip, clip_groups=groups,
                      evaluate=evaluate, checkpoint_dir=out / "checkpoints", config=to_dict(config), desc="lm",
                      on_nonfinite=on_nonfinite, keep=keep, precision=config.precision, dist=dist, shards=shards,
                      state_tensors=memory_tensors, load_state_tensors=load_memory)
    if device.type == "cpu" and attention.NATIVE_SCORES:  # the kernels the steps take, built (once per machine)
        # before the progress bar, as they say, and the timing (a probe's first run counted 15 s of compiling
        # as training: 4 tokens a second)
        (native_step.attention_library if config.precision == "bf16" else native_step.attention_fp32_library)()
        if config.model.dropout > 0 or config.model.dropout_attn > 0:
            native_step.dropout_library()
    if (slower := bf16_slower(config.precision, device)) and dist.main:
        log(f"--precision bf16: {slower}")
    if config.eval_segments is not None and dist.main:
        log(f"valid_bits at each interval: the first {config.eval_segments} segments of the validation split's "
            "rows (documents' openings, higher than the whole's); valid_bpc at the end: the whole split")
    m = config.model
    if m.has_compression and not m.trains_compressor and m.compression_loss != "none" and dist.main:
        log(f"--compression {m.compression} has no weights to learn: the {m.compression_loss} loss is not computed")
    attention.NATIVE_USED.clear()  # this run's attention, for its results
    attention.ROUNDED_USED.clear()
    state = trainer.fit(batches, config.steps // config.eval_every)
    if not dist.main:  # rank 0 evaluates and writes the results
        dist.barrier()
        return {}
    if trainer.loaded_finished and (out / "results.json").is_file() and (out / "results.md").is_file():
        # finished before, with these settings: nothing to redo but a plot a killed report did not draw
        # (a probe: killed between results.* and curves.png, the plot was lost for good), from the history
        finished = json.loads((out / "results.json").read_text(encoding="utf-8"))
        try:
            history, whole = finished["meta"]["history"], finished["rows"][0]["valid_bpc"]
        except (KeyError, IndexError, TypeError):
            history = whole = None
        if history is not None or (out / "curves.png").is_file():
            if not (out / "curves.png").is_file():
                with report_whole():
                    _plot_run(out / "curves.png", history, whole, config, corpus.name, vocab.unit)
                log(f"{out}/curves.png was missing: drawn again from results.json's history")
            table = (out / "results.md").read_text(encoding="utf-8")
            if print_table:
                print(table)
            dist.barrier()
            return {**finished, "table": table}

    test_docs, test_names = corpus.split("test")
    with autocast(config.precision, device):
        final = {}
        test = TokenStreams(test_docs, config.batch_size, config.segment_len, test_names,
                            fill_rows=config.eval_fill_rows)
        for split, streams in (("valid", valid), ("test", test)):  # `valid`: the validation's (pure), now whole
            final[split] = evaluate_streams(model, streams, shards=eval_split(streams),
                                            progress=lambda r, s=split: progress(r, desc=f"eval {s}", unit="segment"))
    rows = [{"model": _describe(m), "params": sum(p.numel() for p in model.parameters()), "steps": config.steps,
             "valid_bpc": round(final["valid"]["bits_per_token"], 4),
             "test_bpc": round(final["test"]["bits_per_token"], 4),
             "test_ppl": round(final["test"]["perplexity"], 3)}]
    # training time from the history (the batch loops only, summed over every resumed piece of the run; with
    # --compile, a piece's first step compiles), over the rows a step trains (fewer than the batch size where the
    # text has fewer segments: a probe's 2**63 rows a step)
    train_seconds = sum(h["seconds"] for h in state.history)
    meta = {"config": to_dict(config), "precision": config.precision, "processes": dist.world, "shards": shards,
            "train_seconds": round(train_seconds, 1),
            "tokens_per_second": round(config.steps * stream.rows * config.segment_len / max(train_seconds, 1e-9)),
            "history": state.history, "corpus": corpus.name,
            # bf16 on a CPU with AVX-512 bf16: the training attention's scores in fp32 (`attention.NATIVE_SCORES`)
            "attention_scores": attention.scores_used(config.precision),
            # under autocast: the position table in fp32, its gradient centred (`attention.EXACT_POSITION_GRADIENT`)
            "position_gradient": attention.position_gradient_used(config.precision)}
    title = f"{corpus.name}: bits per {vocab.unit}, preset {config.preset}"
    with report_whole():  # (an interrupt between them left results.* without curves.png)
        table = write_results(out, "results", rows, title=title, meta=meta)
        _plot_run(out / "curves.png", state.history, final["valid"]["bits_per_token"], config, corpus.name,
                  vocab.unit)
    if print_table:
        print(table)
        print(f"written to {out}/results.json, results.md and curves.png")
    dist.barrier()
    return {"rows": rows, "meta": meta, "table": table}


def _plot_run(path: Path, history: list[dict], whole: float, config: LMConfig, corpus_name: str, unit: str) -> None:
    """A run's curves.png: training and validation bits at each interval (`history`), and the whole
    validation split's at the end (`whole`)."""
    # validation during training reads the first eval_segments segments of each row (documents' openings,
    # without memories yet): higher than the whole split's, which the table and a last point show
    subset = f", first {config.eval_segments} segments" if config.eval_segments is not None else ""
    plot_curves(path, [("train (the interval's steps)", [h["step"] for h in history],
                        [h["train_bits"] for h in history]),
                       (f"valid{subset}", [h["step"] for h in history], [h["valid_bits"] for h in history]),
                       ("valid, whole split", [config.steps], [whole])],
                xlabel="step", ylabel=f"bits per {unit}", title=f"{corpus_name}, preset {config.preset}")


def _describe(m: CompressiveConfig) -> str:
    if m.mem_len == 0 and m.c_mem_len == 0:
        kind = "transformer"
    elif m.c_mem_len == 0:
        kind = f"XL mem {m.mem_len}"
    else:
        loss = f" {m.compression_loss}" if m.compression in ("conv", "dilated") else ""  # the others learn nothing
        kind = f"compressive {m.mem_len}+{m.c_mem_len}/{m.compression_rate} {m.compression}{loss}"
    return f"{kind}, d{m.d_model} x{m.n_layers}"


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None
             ) -> tuple[LMConfig, Vocab, CompressiveTransformer, ckpt.Checkpoint]:
    """The config, vocabulary and trained model of a `still lm train` run directory: its newest
    valid checkpoint, or the `checkpoint` directory named (refused with a reason if damaged)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StillError(f"{run_dir} " + ("is a file, not a run directory" if run_dir.exists() else "does not exist"))
    if not (run_dir / "config.json").is_file():
        raise StillError(f"{run_dir} is not a language-model run directory (no config.json)")
    check_run_kind(run_dir, "language-model")
    config = load_config(LMConfig, run_dir / "config.json")
    try:
        vocab = Vocab.from_json((run_dir / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as e:
        raise StillError(f"cannot read {run_dir}/vocab.json: {e}") from None
    # (a probe: an edited vocab.json decoded generated ids as other characters, exit 0)
    recorded = _recorded(run_dir, "vocab_sha256")
    if isinstance(recorded, str) and recorded != _vocab_digest(vocab.to_json()):  # (its symbols: a probe's
        # vocab.json reformatted, the same symbols, was "changed")
        raise StillError(f"{run_dir}/vocab.json has changed since the run was trained (its SHA-256 is not the one "
                         "stage.json records): its ids would read as other characters; put back the run's own")
    if checkpoint is not None:
        loaded = ckpt.load_checkpoint(checkpoint)
        _check_same_run(config, loaded, run_dir)
    else:
        loaded = ckpt.latest_checkpoint(run_dir / "checkpoints", log=log)
        if loaded is None:
            raise StillError(f"{run_dir} has no valid checkpoint")
        _check_same_run(config, loaded, run_dir, newest=True)
    model = CompressiveTransformer(config.model)
    ckpt.load_model_weights(model, loaded.model, source=str(loaded.path))
    return config, vocab, model.to(distributed.default_device()).eval(), loaded


def _check_same_run(config: LMConfig, loaded: ckpt.Checkpoint, run_dir: Path, newest: bool = False) -> None:
    """Refuse a checkpoint trained with other settings than `run_dir`'s: what is written there
    (`eval-*.json`, read by `lm compare` beside the run's results) would describe another model.
    `newest`: the run's own newest checkpoint, whose settings differ only where the run's
    config.json was changed since (a model read with other memory lengths, say, scores otherwise)."""
    if not loaded.config:  # (a checkpoint without its config: nothing to compare)
        return
    try:
        theirs = to_dict(from_dict(LMConfig, loaded.config, where=f"{loaded.path}/config.json"))
    except StillError as e:
        raise StillError(f"{loaded.path} is not a language-model checkpoint ({e})") from None
    ours = to_dict(config)
    theirs["corpus"], ours["corpus"] = absolute_corpus(theirs["corpus"]), absolute_corpus(ours["corpus"])
    recorded = _recorded(run_dir, "corpus")
    own = newest or loaded.path.resolve().parent == (run_dir / "checkpoints").resolve()
    if own and isinstance(recorded, str) and absolute_corpus(recorded) == ours["corpus"]:
        # the run's own checkpoints name its corpus where it lay when they were saved: `lm train` records
        # where its text (by its digests) lies now in config.json and stage.json both (config.json alone
        # edited stays a change)
        theirs["corpus"] = ours["corpus"]
    changed = changed_paths(ours, theirs)  # (a probe: "(model)" left the user to find which of its keys)
    if changed and newest:
        raise StillError(f"{run_dir}/config.json differs from the settings its newest checkpoint was trained with "
                         f"({', '.join(changed)}): it was changed since; put back the checkpoint's own "
                         f"({loaded.path}/config.json)")
    if changed:
        raise StillError(f"{loaded.path} was trained with other settings than {run_dir} ({', '.join(changed)}): "
                         "name a checkpoint of this run, or the checkpoint's own run directory")


def _vocab_digest(vocab_json: str) -> str:
    return hashlib.sha256(vocab_json.encode()).hexdigest()


def _recorded(run_dir: Path, key: str) -> Any:
    """What training recorded as `key` in the run's stage.json, or None (a run made before it was
    recorded, or stage.json unreadable: `load_run` has the run's settings)."""
    return _stage_record(run_dir).get(key)


def _stage_record(run_dir: Path) -> dict:
    """The run's stage.json's data ({} where none is readable as a JSON object)."""
    try:
        data = json.loads((run_dir / "stage.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_files(folder: Path) -> dict[str, bytes | None]:
    """The bytes of a run folder's settings, config.json and stage.json (None: missing or unreadable),
    to tell later whether they changed."""
    found = {}
    for name in ("config.json", "stage.json"):
        try:
            found[name] = (folder / name).read_bytes()
        except OSError:
            found[name] = None
    return found


def _recorded_split_digest(run_dir: Path, split: str) -> str | None:
    """The digest of `split` that training recorded in the run's stage.json (`split_sha256`), or None."""
    recorded = _recorded(run_dir, "split_sha256")
    digest = recorded.get(split) if isinstance(recorded, dict) else None
    return digest if isinstance(digest, str) else None


def eval_lm(run_dir: str | Path, split: str = "test", batch_size: int | None = None, cache=None,
            print_table: bool = True, checkpoint: str | Path | None = None, precision: str | None = None,
            shards: int | None = None, fill_rows: bool | None = None, corpus: str | None = None) -> dict:
    """Bits per character (per byte for a byte-level run) over a whole split, streaming with memory,
    and the loss by position.
    `precision`: fp32 or bf16 (default: the run's). `shards`: split each segment's rows across this
    many CPU threads (`StreamScorer`; default: `eval_shards`). `fill_rows`: cut a split of fewer
    documents than rows into pieces, one a row (`LMConfig.eval_fill_rows`; default: the run's).
    `corpus`: the run's corpus where it lies now (moved since training; as `LMConfig.corpus` names
    it), refused unless its split has the digest the run recorded (default: the run's stored corpus)."""
    run_dir = Path(run_dir)
    settings = _run_files(run_dir)  # (read before the run is: a run started again meanwhile differs after)
    config, vocab, model, checkpoint = load_run(run_dir, checkpoint)
    precision = precision or config.precision
    check_precision(precision)
    stored, given = config.corpus, None if corpus is None else absolute_corpus(corpus)
    if given is not None and given != absolute_corpus(stored) and not _same_corpus(absolute_corpus(stored), given):
        config = replace(config, corpus=given)  # (the run's own, named otherwise, as it is: an older run's relative)
    elif given is None and stored != "shakespeare" and not os.path.exists(_kind_and_path(stored)[1]):
        # (a probe: a moved project's run could not be evaluated again, and nothing said how)
        raise StillError(f"{run_dir}'s corpus {stored} does not exist: give it where it lies now with --corpus "
                         "(checked against the digests the run recorded of its text)")
    try:
        corpus = load_encoded(config.corpus, cache=cache, byte_level=config.byte_level, splits=(split,), vocab=vocab)
    except NotInVocabulary as e:
        if config.corpus != stored:
            raise StillError(f"--corpus {given} is not {run_dir}'s corpus {stored}: its {split} split holds a "
                             f"character the run's vocabulary lacks ({e})") from None
        raise StillError(f"the {split} split of {config.corpus} holds a character the run's vocabulary lacks, so it "
                         f"has changed since {run_dir} was trained: {e}") from None
    docs, names = corpus.split(split)
    # the split's text against what training recorded of it (runs made before then recorded nothing):
    # numbers of other text are written beside the run's, so they say so
    recorded, current = _recorded_split_digest(run_dir, split), corpus.split_digests.get(split)
    if config.corpus != stored and recorded is None:  # text elsewhere: the run's only
        raise StillError(f"--corpus {given}: {run_dir} recorded no digest of its {split} split (trained by an older "
                         f"still), so it cannot be told to be its corpus {stored}; put that back where it was")
    if config.corpus != stored and current != recorded:
        raise StillError(f"--corpus {given} is not {run_dir}'s corpus {stored}: its {split} split's SHA-256 is "
                         f"{str(current)[:12]}..., the run recorded {recorded[:12]}...")
    changed = recorded is not None and current is not None and recorded != current
    if changed:
        log(f"the {split} split of {config.corpus} has changed since {run_dir} was trained: these numbers are "
            "of its text as it is now")
    fill_rows = config.eval_fill_rows if fill_rows is None else fill_rows
    streams = eval_streams(docs, names, batch_size or config.batch_size, config, fill_rows, split, "--fill-rows")
    cut = len(streams.pieces) > len(docs)
    within = "piece" if cut else "document"  # what the positions count from (`Segment.positions`)
    longest = max(end - first for _, first, end in streams.pieces)
    edges = sorted({0, *[2**k for k in range(4, 40) if 2**k < longest], longest})  # (positions 0 .. longest - 1)
    device = next(model.parameters()).device
    if shards is None:
        shards = eval_shards(model, streams.batch_size, config.segment_len, precision=precision)
    if slower := bf16_slower(precision, device):
        log(f"bf16: {slower}")
    with autocast(precision, device):
        result = evaluate_streams(model, streams, position_edges=edges, shards=shards,
                                  progress=lambda r: progress(r, desc=f"eval {split}", unit="segment"))
    check(math.isfinite(result["bits_per_token"]), f"the model's loss on the {split} split is "
          f"{result['bits_per_token']}: its weights diverged (an earlier checkpoint, --checkpoint, may not have)")
    rows = [{"from": b["from"], "to": b["to"] - 1, "tokens": b["tokens"],
             "bits_per_char": round(b["bits_per_token"], 4) if b["bits_per_token"] is not None else None}
            for b in result["by_position"]]
    title = (f"{corpus.name} {split}: {result['bits_per_token']:.4f} bits per {vocab.unit}, perplexity "
             f"{result['perplexity']:.3f}, {result['tokens']} {vocab.unit}s; checkpoint step {checkpoint.step}, "
             f"{precision}" + (f"; the {len(docs)} document(s) cut into {len(streams.pieces)} pieces, each read "
                               "without the text before it" if cut else "")
             + (f"; the {split} text has changed since training" if changed else "") + "\n\n"
             f"Loss by position within the {within}:")
    # what is written beside the run's results must be of the run there now (a probe: `lm eval` of a run that
    # `lm train --overwrite` started again meanwhile wrote the old model's numbers into the new run's files)
    # (its settings only: a checkpoint rotated away by the training going on is still this run's step)
    if _run_files(run_dir) != settings:
        raise StillError(f"{run_dir} changed while it was evaluated (started again with other settings): nothing "
                         "written; evaluate it again")
    name = f"eval-{split}"
    try:  # (a probe: an older checkpoint's evaluation replaced the newest one's unsaid)
        before = json.loads((run_dir / f"{name}.json").read_text(encoding="utf-8"))["meta"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        before = None
    if before is not None and before != checkpoint.step:
        log(f"{name}.json, .md and its plot were of checkpoint step {before}: now of step {checkpoint.step}")
    try:
        with report_whole():  # (an interrupt between them left this step's eval-*.json beside the last's plot)
            table = write_results(run_dir, name, rows, title=title,
                                  meta={k: v for k, v in result.items() if k != "by_position"}
                                  | {"step": checkpoint.step, "precision": precision,
                                     "shards": min(shards, streams.batch_size),  # (what the scorer split the rows into)
                                     "rows": streams.batch_size, "pieces": len(streams.pieces), "documents": len(docs),
                                     "split_sha256": current,
                                     "changed_since_training": changed})
            plot_curves(run_dir / f"{name}-by-position.png",
                        [(_describe(config.model),
                          [max(1.0, (r["from"] + r["to"]) / 2) for r in rows if r["bits_per_char"] is not None],
                          [r["bits_per_char"] for r in rows if r["bits_per_char"] is not None])],
                        xlabel=f"position in the {within} ({vocab.unit}s)", ylabel=f"bits per {vocab.unit}", logx=True,
                        title=f"{corpus.name} {split}: loss by position in the {within}")
    except OSError:  # (a run on read-only media, a full disk): the numbers first, then why they were not kept
        if print_table:
            print(format_table(rows, title=title))
        raise
    if print_table:
        print(table)
    return result


def generate_lm(run_dir: str | Path, prompt: str = "", max_new_tokens: int = 256, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None, seed: int | None = None, stream=None,
                checkpoint: str | Path | None = None, precision: str | None = None, compile: bool | None = None,
                state: str | Path | None = None, save_state: str | Path | None = None,
                keep_text: bool = True) -> str | None:
    """Sample from a trained run; writes the text to `stream` (a file object) as it is generated, and
    returns it (None with `keep_text` False, which with `stream` generates any length in bounded
    memory, as `still lm generate` does: the text and the tokens are not kept).
    `precision`: fp32 or bf16 (default: the run's). `compile`: the decoding step compiled (on the CPU written by
    hand, elsewhere ahead of time; cached); None: the hand-written step where it can run, else eager steps.

    `save_state`: a file to write the memories to afterwards (`save_generation_state`), and `state`
    one to read them from first (`load_generation_state`; it may be the same file): the prompt then
    continues the saved text, no document start before it (`Vocab.DOC`), and may be empty, and the
    random numbers go on from the saved ones where `seed` is None (else they start from `seed`;
    None without `state`: 0). The text of one generation equals, to float rounding, that of
    generations continued from each other with empty prompts, the same sampling settings and no
    seed. (At byte level a character whose bytes two calls share is written as U+FFFD by each.)"""
    if seed is not None:
        check_seed(seed)
    config, vocab, model, loaded = load_run(run_dir, checkpoint)
    precision = precision or config.precision
    check_precision(precision)
    check(max_new_tokens > 0, f"the number of tokens must be > 0, got {max_new_tokens}")
    if save_state is not None:  # (found before the text rather than after it)
        target = Path(save_state)
        check(not target.is_dir(), f"the state file {save_state} is a directory")
        # (a probe: written over a checkpoint's weights, or a run's stage.json, unsaid; an empty file, as
        # `mktemp` makes, holds nothing to lose)
        check(not target.exists() or target.stat().st_size == 0 or _is_state_file(target),
              f"--save-state {save_state}: the file is there and is not a state file of `still lm generate "
              "--save-state`: choose another file, or delete it first")
        folder = target.absolute().parent
        check(folder.is_dir(),
              f"the state file's folder {folder} " + ("is a file" if folder.exists() else "does not exist"))
    device = next(model.parameters()).device
    memories, opening = None, Vocab.DOC  # a new document, or the saved text's last token, not yet read
    generator = torch.Generator().manual_seed(seed or 0)
    if state is not None:
        memories, opening, numbers = load_generation_state(state, config, vocab, model, loaded)
        if seed is None:  # the saved text's random numbers, going on
            generator.set_state(numbers)
    ids = torch.cat([torch.tensor([opening]), vocab.encode(prompt, "the prompt")])[None].to(device)  # (1, P)
    pieces, decode = [], vocab.decoder()
    if compile is not False and device.type == "cpu":  # built (once per machine) or loaded before the text
        # starts, so that what it says stands on lines of its own
        native_step.library("the compiled one" if compile else "eager steps")
    unwritten = prompt if stream is not None else None  # written with the first token: by then the prompt is
    # read and the step chosen, so that what they say (a step that cannot run here, compiling) comes before it
    # (never the padding or a document's start: no training targets, they are not quite improbable, and
    # they write nothing and a newline: probes' 200 tokens at temperature 100 wrote 193 characters, and a
    # corpus without a newline generated 17 in 200 tokens, each a new document read without a reset)
    generation = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          segment_len=config.segment_len, generator=generator, state=memories, compile=compile,
                          exclude=(Vocab.PAD, Vocab.DOC), keep_tokens=save_state is not None)
    for token in itertools.chain(_under(autocast(precision, device), generation), [None]):  # None: the decoder's rest
        piece = decode(token.cpu() if token is not None else None)
        if keep_text:
            pieces.append(piece)
        if unwritten is not None:
            stream.write(unwritten)
            unwritten = None
        if stream is not None and piece:
            stream.write(piece)
            stream.flush()
    if stream is not None:
        stream.write("\n")
    if save_state is not None:  # the last token is read first by the generation that continues
        with autocast(precision, device):  # (the memories under the precision that sampled: `Generation`)
            memories = generation.state_after(max_new_tokens - 1)
        save_generation_state(save_state, memories, int(generation.tokens[-1][0]), generator.get_state(), config,
                              vocab, loaded)
    return prompt + "".join(pieces) if keep_text else None


STATE_FORMAT = "still lm generate state 1"
"""The `format` of a generation state file's metadata (`save_generation_state`)."""


def _model_identity(config: LMConfig, vocab: Vocab, loaded: ckpt.Checkpoint) -> dict[str, str]:
    """What a generation state's memories belong to: the model's configuration, its weights (the
    SHA-256 of the checkpoint's weights file, from its manifest, verified when it was loaded) and
    its vocabulary (the ids it reads), as safetensors metadata (strings)."""
    manifest = json.loads((loaded.path / "manifest.json").read_text(encoding="utf-8"))
    return {"model": json.dumps(to_dict(config.model), sort_keys=True), "vocab_size": str(len(vocab)),
            "byte_level": json.dumps(vocab.byte_level),
            "vocabulary": _vocab_digest(vocab.to_json()),
            "weights": manifest["files"]["model.safetensors"], "step": str(loaded.step)}


def save_generation_state(path: str | Path, state: MemoryState, pending: int, numbers: torch.Tensor,
                          config: LMConfig, vocab: Vocab, loaded: ckpt.Checkpoint) -> None:
    """Write `state` (one row), the memories of a generated text but its last token, that token
    (`pending`, which continuing reads first: no logits need saving) and the random generator's
    state after it (`numbers`) to `path` as safetensors, atomically; the metadata names the model
    and checkpoint they belong to (`_model_identity`)."""
    tensors = {name: t.cpu() for name, t in state.to_tensors().items()}  # (contiguous, each its own)
    tensors["pending"] = torch.tensor([pending], dtype=torch.int64)  # (1,)
    tensors["generator"] = numbers.clone()  # (the CPU generator's state: uint8)
    metadata = {"format": STATE_FORMAT, **_model_identity(config, vocab, loaded)}
    if Path(path).is_symlink():  # (a probe: a state file kept elsewhere through a link was left as it was, the
        # link replaced by a file; the user named this file: written where it leads, as open() would)
        path = os.path.realpath(path)
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except (OSError, SafetensorError) as e:  # (safetensors says its I/O errors with its own)
        raise StillError(f"cannot write the state file {path}: {e}") from None


def _is_state_file(path: Path) -> bool:
    """Whether `path` is a state file `save_generation_state` wrote (by its metadata's format)."""
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            return (f.metadata() or {}).get("format") == STATE_FORMAT
    except (OSError, SafetensorError):
        return False


def load_generation_state(path: str | Path, config: LMConfig, vocab: Vocab, model: CompressiveTransformer,
                          loaded: ckpt.Checkpoint) -> tuple[MemoryState, int, torch.Tensor]:
    """The memories, the pending token and the random generator's state `save_generation_state`
    wrote to `path`, the memories where `model`'s weights are and in their dtype; refused, naming
    the file and what differs, where it is missing, not such a file, or made by another model (its
    configuration or vocabulary) or another checkpoint (`loaded`'s weights)."""
    path = Path(path)
    if not path.is_file():
        raise StillError(f"the state file {path} does not exist")
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            metadata = f.metadata() or {}
            # (the tensors only of a state file: not a whole checkpoint's weights read to be refused)
            tensors = {name: f.get_tensor(name) for name in f.keys()} if metadata.get("format") == STATE_FORMAT else {}
    except (OSError, SafetensorError) as e:
        raise StillError(f"{path} is not a state file of `still lm generate --save-state` ({e})") from None
    if metadata.get("format") != STATE_FORMAT:
        raise StillError(f"{path} is not a state file of `still lm generate --save-state` (its format is "
                         f"{metadata.get('format')!r}, not {STATE_FORMAT!r})")
    ours = _model_identity(config, vocab, loaded)
    theirs = {k: metadata.get(k) for k in ours}
    differences = [f"{k} {theirs[k]} there, {ours[k]} here" for k in ("vocab_size", "byte_level")
                   if theirs[k] != ours[k]]
    if theirs["vocabulary"] != ours["vocabulary"] and not differences:
        differences.append("another vocabulary")
    try:
        model_there = to_dict(from_dict(CompressiveConfig, json.loads(theirs["model"] or "null"), where="model"))
    except (StillError, ValueError) as e:
        differences.append(f"a model configuration this version cannot read ({e})")
    else:
        model_here = to_dict(config.model)
        differences += [f"{k} {model_there.get(k)} there, {model_here.get(k)} here"  # (vocab_size: said above)
                        for k in changed_settings(model_here, model_there) if k != "vocab_size"]
    if differences:
        raise StillError(f"{path} holds the memories of another model ({'; '.join(differences)}): continue with "
                         "the run that saved it")
    if theirs["weights"] != ours["weights"]:
        raise StillError(f"{path} holds the memories of other weights (step {theirs['step']} there, "
                         f"{ours['step']} here): continue with the run and checkpoint that saved it (--checkpoint "
                         "names an older checkpoint of a run)")
    try:
        state, pending, numbers = MemoryState.from_tensors(tensors), tensors["pending"], tensors["generator"]
    except KeyError as e:
        raise StillError(f"{path} is damaged: it has no tensor {e}") from None
    except StillError as e:
        raise StillError(f"{path} is damaged: {e}") from None
    weight = model.embedding.weight
    state = state._replace(memory=tuple(m.to(weight.device, weight.dtype) for m in state.memory),
                           compressed=tuple(c.to(weight.device, weight.dtype) for c in state.compressed))
    try:
        model.check_state(state, 1)
    except StillError as e:
        raise StillError(f"{path} is damaged: {e}") from None
    if not all(bool(t.isfinite().all()) for t in (*state.memory, *state.compressed)):
        raise StillError(f"{path} is damaged: its memories are not all finite numbers")
    if pending.shape != (1,) or pending.dtype != torch.int64 or not 0 <= int(pending[0]) < len(vocab):
        raise StillError(f"{path} is damaged: its pending token is not one id of the vocabulary (0..{len(vocab) - 1})")
    if numbers.dtype != torch.uint8 or numbers.shape != torch.Generator().get_state().shape:
        raise StillError(f"{path} is damaged: its generator state is not a CPU generator's")
    try:  # (a probe: one byte flipped in it was PyTorch's "Invalid mt19937 state", a traceback)
        torch.Generator().set_state(numbers)
    except RuntimeError as e:
        raise StillError(f"{path} is damaged: its generator state cannot be read ({e})") from None
    return state, int(pending[0]), numbers


def _under(context, iterator):
    """Run each step of `iterator` inside `context` (entered and left around every step, so the
    caller's code between steps runs outside it)."""
    while True:
        with context:
            try:
                item = next(iterator)
            except StopIteration:
                return
        yield item


@contextlib.contextmanager
def _unreadable(path: Path, remedy: str) -> Iterator[None]:
    """Inside: a file of still's that does not hold what still writes there (damaged, or made by
    hand) is refused naming it, where its reading raised Python's own error."""
    try:
        yield
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise StillError(f"cannot read {path}: not as still writes it ({type(e).__name__}: {e}); "
                         f"{remedy}") from None


def _figure(value: object, what: str) -> object:
    """`value` where it is a finite number or None; else a ValueError naming it (for `_unreadable`:
    a hand-edited results file put "abc" or NaN into the table unsaid)."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        return value
    raise ValueError(f"{what} is {value!r}, not a finite number")


COMPARISON = "still lm compare"
"""The `written_by` of a comparison's record (`compare-<split>.json`'s meta)."""


def _compare_record(path: Path) -> bool:
    """Whether `path` is a comparison's record (`compare_runs`): its meta's `written_by`, or, written
    before that (meta empty in most versions), a run and a model in each of its rows."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        meta, rows = data["meta"], data["rows"]
        return meta.get("written_by") == COMPARISON or (isinstance(rows, list) and bool(rows) and all(
            isinstance(row, dict) and "run" in row and "model" in row for row in rows))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def compare_runs(run_dirs: list[Path], out: Path, split: str = "test", print_table: bool = True) -> str:
    """One table (bits per character of each run) and two plots (bits per character against the
    position in the document, and validation during training, one curve per run) from finished
    runs and their `still lm eval`. Runs of different corpora, or of bytes beside characters, get a
    corpus and a unit column, and a line that says their numbers do not compare."""
    for folder in (out, *out.resolve().parents):  # (resolved: `runs/a/../cmp` is not under runs/a)
        if (kind := run_kind(folder)) is not None or (folder / "stage.json").exists():
            raise StillError(f"--out {out}: {folder} holds {f'a {kind} run' if kind else 'a stage of a run'}, among "
                             "whose files the comparison's would be written; choose another folder")
    # written over or removed below: only where they are a comparison's (a probe: a user's compare-test.md was
    # written over, and a plot of theirs removed "of an earlier comparison")
    record = out / f"compare-{split}.json"
    by_position, valid_curves = out / f"compare-{split}-by-position.png", out / "compare-valid-curves.png"
    ours = _compare_record(record)
    theirs = [path.name for path in (record, out / f"compare-{split}.md", by_position) if path.exists() and not ours]
    if valid_curves.exists() and not (ours or any(_compare_record(path) for path in out.glob("compare-*.json"))):
        theirs.append(valid_curves.name)
    if theirs:
        raise StillError(f"--out {out} holds {', '.join(theirs)}, not of a comparison of still's, which a comparison "
                         "there writes over (or removes): move them out, or choose another folder")
    rows, curves, histories = [], [], []
    seen: dict[Path, Path] = {}
    for run_dir in run_dirs:
        if (same := seen.get(key := run_dir.resolve())) is not None:
            raise StillError(f"{run_dir} is given twice" + (f" (as {same} too)" if same != run_dir else ""))
        seen[key] = run_dir
    # each run by its folder's name; by the path as given where two share one (runs/a, old/a)
    names = {run_dir: run_dir.name if run_dir.name not in ("", ".", "..") else run_dir.resolve().name
             for run_dir in run_dirs}
    shared = {name for name in names.values() if list(names.values()).count(name) > 1}
    names = {run_dir: str(run_dir) if name in shared else name for run_dir, name in names.items()}
    notes: list[str] = []  # kept with the table (its title and its JSON's meta), and said where it is not printed

    def note(text: str) -> None:
        if not print_table:  # (a probe: printed, each note came twice)
            log(text)
        notes.append(text)

    for run_dir in run_dirs:
        name = names[run_dir]
        if not run_dir.is_dir():
            raise StillError(f"{run_dir} " + ("is a file, not a run directory" if run_dir.exists()
                                              else "does not exist"))
        check_run_kind(run_dir, "language-model")
        if not (run_dir / "results.json").is_file():
            raise StillError(f"{run_dir} has no results.json: finish its training first (the `still lm train` that "
                             f"made it, with its settings and --out {run_dir})")  # (a probe: the bare command was
            # refused, "different settings")
        try:
            data = (run_dir / "results.json").read_bytes()
        except OSError as e:
            raise StillError(f"cannot read {run_dir}/results.json: {e.strerror or e}") from None
        with _unreadable(run_dir / "results.json", f"train it again (still lm train --out {run_dir})"):
            result = json.loads(data.decode("utf-8"))
            row = {"run": name, **result["rows"][0]}
            for key in ("params", "steps", "valid_bpc", "test_bpc"):
                _figure(row.get(key), key)
            settings = result.get("meta", {}).get("config", {})
            row["corpus"] = settings.get("corpus", result.get("meta", {}).get("corpus"))
            row["unit"] = "byte" if settings.get("byte_level") else "character"
            history = result.get("meta", {}).get("history", [])
            if history:
                histories.append((name, [_figure(h["step"], "a history's step") for h in history],
                                  [_figure(h["valid_bits"], "a history's valid_bits") for h in history]))
        evaluation = run_dir / f"eval-{split}.json"
        if evaluation.is_file():
            with _unreadable(evaluation, f"evaluate the run again (still lm eval {run_dir} --split {split})"):
                data = json.loads(evaluation.read_bytes().decode("utf-8"))
                points = [r for r in data["rows"] if _figure(r["bits_per_char"], "a row's bits_per_char") is not None]
                curves.append((f"{name}: {row['model']}",
                               [max(1.0, (r["from"] + r["to"]) / 2) for r in points],
                               [r["bits_per_char"] for r in points]))
                first = [r["bits_per_char"] for r in points if r["to"] < 1024]
                late = [r["bits_per_char"] for r in points if r["from"] >= 4096]
                row["bpc_first_1k"] = round(sum(first) / len(first), 4) if first else None
                row["bpc_after_4k"] = round(sum(late) / len(late), 4) if late else None
                row["eval_step"] = data.get("meta", {}).get("step")
                meta = data.get("meta", {})
                changed = meta.get("changed_since_training")
                trained_in = settings.get("precision", "fp32")
                how = ([f"in {meta['precision']} (the run trained in {trained_in})"]
                       if meta.get("precision") not in (None, trained_in) else []) + (
                      [f"of the split cut into {meta['pieces']} pieces, positions counted from each piece's start"]
                      if isinstance(meta.get("documents"), int) and meta.get("pieces", 0) > meta["documents"] else [])
            if how:
                note(f"{name}: the by-position columns come from `still lm eval` {' and '.join(how)}")
            if row["eval_step"] != row.get("steps"):
                note(f"{name}: the by-position columns come from `still lm eval` of checkpoint step "
                    f"{row['eval_step']}, the others from the end of training (step {row.get('steps')})")
            if changed:
                note(f"{name}: the by-position columns come from `still lm eval` of the {split} text as it "
                    "was changed since training, the others from the text it trained on")
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["run", "model", "params", "steps", "valid_bpc", "test_bpc", "eval_step", "bpc_first_1k",
               "bpc_after_4k"]
    units = sorted({r["unit"] for r in rows})
    unit = units[0] if len(units) == 1 else "token"
    if len({(r["corpus"], r["unit"]) for r in rows}) > 1:
        columns[2:2] = ["corpus", "unit"]
        note("these runs read different corpora or units (the corpus and unit columns): their bits do not compare")
    title = f"Bits per {unit} ({split}); by position: mean over the position buckets"
    table = write_results(out, f"compare-{split}", rows, columns=columns,
                          title="\n\n".join([title, *(f"Note: {text}" for text in notes)]),
                          meta={"notes": notes, "written_by": COMPARISON})
    # (a plot this comparison has nothing for is removed, not left from an earlier one of other runs)
    if curves:
        plot_curves(by_position, curves, xlabel=f"position in the document ({unit}s)",
                    ylabel=f"bits per {unit}", logx=True, title=f"{split}: loss by position in the document")
    elif by_position.exists():
        by_position.unlink()
        log(f"no run has a `still lm eval` of {split}: {by_position} (of an earlier comparison) removed")
    if histories:
        plot_curves(valid_curves, histories, xlabel="step", ylabel=f"validation bits per {unit} (interval subset)",
                    title="validation during training (the segments evaluated at each interval)")
    elif valid_curves.exists():
        valid_curves.unlink()
        log(f"no run has a validation history: {valid_curves} (of an earlier comparison) removed")
    if print_table:
        print(table)
    return table
