"""Every `still` command line the README and docs/ show parses: its subcommand exists and each option
and value is one the command accepts, so the documentation cannot drift from the CLI unnoticed."""

import re
import shlex
from pathlib import Path

import click
import pytest

from still.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def documented_commands(text: str) -> list[list[str]]:
    """The argument lists of the `still ...` and `torchrun ... -m still ...` lines in fenced code
    blocks of a Markdown text (comments dropped, backslash continuations joined)."""
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.startswith(("still ", "torchrun ")):
                continue
            words = shlex.split(line, comments=True)
            if words[:1] == ["still"]:
                commands.append(words[1:])
            elif words[:1] == ["torchrun"] and "-m" in words and words[words.index("-m") + 1:][:1] == ["still"]:
                commands.append(words[words.index("-m") + 2:])
    return commands


def parse(args: list[str]) -> None:
    """Parse `args` as the `still` command would, without running anything: raises click's
    UsageError (an unknown subcommand or option, a value out of range) where the line is wrong."""
    command, ctx, name = cli, None, "still"
    while isinstance(command, click.Group):
        if not args or args[0].startswith("-"):  # `still --version`, `still --help`
            command.make_context(name, args, parent=ctx)
            return
        ctx = click.Context(command, info_name=name, parent=ctx)
        name, args = args[0], args[1:]
        command = command.get_command(ctx, name)
        if command is None:
            raise click.UsageError(f"no such command: {name!r}")
    command.make_context(name, args, parent=ctx)


def test_the_documented_commands_are_found():
    found = {path.name: documented_commands(path.read_text()) for path in DOCS}
    assert len(found["README.md"]) >= 15
    assert ["lm", "train", "--preset", "reference", "--precision", "bf16"] in found["README.md"]
    assert ["lm", "train", "--preset", "reference", "--out", "runs/ref-8gpu"] in found["distributed.md"]


@pytest.mark.parametrize("args", [
    ["lm", "train", "--preset", "huge"],  # a choice that does not exist
    ["lm", "train", "--dropout", "1.5"],  # out of range
    ["lm", "sample", "runs/x"],  # a subcommand that does not exist
    ["distill", "mnist", "--temprature", "2"],  # a misspelt option
    ["lm", "generate"],  # a missing argument
])
def test_a_wrong_line_fails_to_parse(args):
    with pytest.raises(click.UsageError):
        parse(args)


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_documented_command_parses(path):
    for args in documented_commands(path.read_text()):
        try:
            parse(args)
        except click.UsageError as error:
            pytest.fail(f"{path.name}: `still {shlex.join(args)}`: {error.format_message()}")


def test_the_readmes_compressive_transformer_example_runs():
    """The README's language-model example is complete: it runs as written, and its compression
    loss appears once the memories overflow."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    example = next(block for block in blocks if "CompressiveTransformer(" in block)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["out"].compression_loss is not None and namespace["state"].compressed_len == 128
    # and its generation: the memories of the prompt and the 200 tokens, 264: the newest 128, the other
    # 136 in 34 compressed (rate 4)
    assert len(namespace["text"]) == 200 and len(list(namespace["more"])) == 100
    assert namespace["after"].memory_len == 128 and namespace["after"].compressed_len == 34


def cited_tests(text: str) -> list[tuple[str, str | None]]:
    """The tests a Markdown text cites, as (file, test name or None): `tests/a/test_b.py`,
    `tests/a/test_b.py::test_c`, `test_b.py::test_c` (the one file of that name under tests/), and
    `::test_d`, short for a test in the file cited last."""
    cited, current = [], None
    for quoted in re.findall(r"`([^`\n]+)`", text):
        match = re.fullmatch(r"((?:tests/[\w/]+|[\w/]*test_\w+)\.py)(?:::(\w+))?|::(test\w+)", quoted)
        if match is None:
            continue
        if match[1]:
            current = match[1]
            if not current.startswith("tests/"):
                found = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob(current))
                current = found[0] if len(found) == 1 else f"tests/<{len(found)} files named {current}>"
        if current is None:
            raise AssertionError(f"`{quoted}` follows no test file")
        cited.append((current, match[2] or match[3]))
    return cited


def test_citations_are_read_as_the_docs_mean_them():
    assert cited_tests("see `tests/test_a.py` (`::test_x`, `::test_y`) and `tests/b/test_c.py::test_z`; `aten::mm`; "
                       "`test_checkpoint.py::test_v`, `::test_w`; `test_none.py::test_u`") == [
        ("tests/test_a.py", None), ("tests/test_a.py", "test_x"), ("tests/test_a.py", "test_y"),
        ("tests/b/test_c.py", "test_z"), ("tests/train/test_checkpoint.py", "test_v"),
        ("tests/train/test_checkpoint.py", "test_w"), ("tests/<0 files named test_none.py>", "test_u")]


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_cited_test_is_in_the_file_cited(path):
    """A promise's evidence names real tests (a probe: thirteen of docs/reliability.md's were in
    another file than the one their `::name` followed)."""
    wrong = [f"{name or file} (not in {file})" for file, name in cited_tests(path.read_text())
             if not (ROOT / file).is_file()
             or name is not None and not re.search(rf"^def {name}\(", (ROOT / file).read_text(), flags=re.M)]
    assert not wrong, f"{path.name} cites: {', '.join(wrong)}"
