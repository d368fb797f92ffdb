"""Measurements of the machine and of the models (`still bench ...`)."""


def at_least_one(text: str) -> int:
    """An argparse type for the benchmarks' counts (repeats, steps, threads ...): a whole number >= 1,
    else a usage error (exit 2) naming the value."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run_script(main) -> None:
    """A benchmark script's `main()`, with a `StillError` (a missing run, a bad setting) said on one
    line with exit code 2, as the `still` command says it, not as a traceback."""
    from still.errors import StillError, fail

    try:
        main()
    except StillError as e:
        fail(str(e))
