"""`python -m still` and the `still` console script."""

import sys


def run() -> None:
    try:
        from still.cli import run as still
    except KeyboardInterrupt:  # (Ctrl-C while starting, before the command's own handling: a probe
        # under torchrun got the import's traceback)
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    still()


if __name__ == "__main__":
    run()
