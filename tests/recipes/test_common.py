"""The recipes' shared pieces (`still.recipes.common`) not covered through a recipe's run."""

import os

from still.recipes.common import plot_curves


def test_a_plot_that_holds_these_curves_already_is_left_as_it_is(tmp_path, monkeypatch):
    """A probe: a finished distillation run again drew its plot again, rewriting the file (failing on
    read-only media), and so did `lm eval` with the same numbers. The same curves give the same bytes,
    which are not written again; other curves are."""
    import still.train.io as io

    path = tmp_path / "curves.png"

    def plot(ys):
        plot_curves(path, [("a", [1, 2, 3], ys)], xlabel="epoch", ylabel="errors", title="t", logy=True,
                    hlines=[("paper", 2.5)])

    plot([3.0, 2.0, 1.0])
    drawn = path.read_bytes()
    os.utime(path, ns=(10**9, 10**9))  # (an mtime a write would change)

    def read_only(path, write):
        raise OSError(30, "Read-only file system", str(path))

    with monkeypatch.context() as patched:
        patched.setattr(io, "atomic_write", read_only)
        plot([3.0, 2.0, 1.0])
    assert path.read_bytes() == drawn and path.stat().st_mtime_ns == 10**9
    plot([3.0, 2.0, 1.5])
    assert path.read_bytes() != drawn and path.stat().st_mtime_ns != 10**9
