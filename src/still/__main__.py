"""`python -m still` and the `still` console script."""

import os
import sys


def run() -> None:
    try:
        from still.cli import run as still

        still()
    except KeyboardInterrupt:  # (Ctrl-C while starting, before the command's own handling: a probe
        # under torchrun got the import's traceback); said once, by the first process, as the command says it
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None


if __name__ == "__main__":
    run()
