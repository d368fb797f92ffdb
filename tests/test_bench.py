"""The benchmark scripts under bench/: every option explains itself in `--help`."""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if "ArgumentParser" in p.read_text())


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def test_the_scripts_are_found():
    assert len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_option_has_help(script, monkeypatch):
    def parse_args(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    main = runpy.run_path(str(script), run_name="bench_under_test")["main"]
    with pytest.raises(_Parsed) as parsed:
        main()
    actions = [a for a in parsed.value.parser._actions if not isinstance(a, argparse._HelpAction)]
    assert actions
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in actions if not a.help]
    assert missing == [], f"{script.name}: options without help: {missing}"
