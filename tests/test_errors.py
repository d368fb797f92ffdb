"""`still.errors.fail`: the scripts' way out on bad input, as the CLI's."""

import pytest

from still.errors import fail


def test_fail_prints_the_message_and_exits_with_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fail("--out runs/x: not a directory")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --out runs/x: not a directory\n"
