"""Measurements of the machine and of the models (`still bench ...`)."""


def at_least_one(text: str) -> int:
    """An argparse type for the benchmarks' counts (repeats, steps, threads ...): a whole number >= 1,
    else a usage error (exit 2) naming the value."""
    return _at_least(text, 1)


def at_least_zero(text: str) -> int:
    """An argparse type for the benchmarks' positions (a training step ...): a whole number >= 0, else
    a usage error (exit 2) naming the value."""
    return _at_least(text, 0)


def _at_least(text: str, low: int) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def out_folder(text: str):
    """An argparse type for a benchmark's `--out`: a folder that is there or can be made, else a usage
    error (exit 2) naming it before anything is measured (a probe: a file given as --out ended the
    benchmark, after all its measuring, in a FileExistsError traceback, the results lost)."""
    import argparse
    from pathlib import Path

    path = Path(text)
    for folder in (path, *path.parents):  # the nearest that is there must be a folder
        if folder.is_symlink() and not folder.exists():
            raise argparse.ArgumentTypeError(f"{folder} is a symbolic link to {folder.readlink()}, which is not there")
        if folder.exists():
            if not folder.is_dir():
                raise argparse.ArgumentTypeError(f"{folder} is a file, not a folder" + (
                    f" (for {path})" if folder != path else ""))
            break
    return path


def run_script(main) -> None:
    """A benchmark script's `main()`, with a `StillError` (a missing run, a bad setting) said on one
    line with exit code 2, as the `still` command says it, not as a traceback."""
    from still.errors import StillError, fail

    try:
        main()
    except StillError as e:
        fail(str(e))
