"""`MnistConfig`'s checks, and the CLI's refusal of what they reject (no MNIST needed: refused before loading)."""

import re

import pytest

from helpers import assert_user_error
from still.errors import StillError
from still.recipes.mnist import MnistConfig


def test_a_setting_names_its_stage_by_all_the_digits_it_needs():
    """A probe: stages were named by `:g`'s six digits, so T 5.0000001 took T5's folder (refused as
    other settings; --overwrite deleted T5's student). Values `:g` gives back keep their names."""
    from still.recipes.common import number

    assert [number(v) for v in (5.0, 20.0, 0.5, 1e-05, 0.0, 1e5)] == ["5", "20", "0.5", "1e-05", "0", "100000"]
    assert [number(v) for v in (5.0000001, 20.000001, 1 / 3)] == ["5.0000001", "20.000001", "0.3333333333333333"]
    assert MnistConfig(temperatures=(20.000001, 20.000002)).temperatures == (20.000001, 20.000002)


@pytest.mark.parametrize(("temperatures", "message"), [
    ((20.0, 20.0), "temperature 20 is given more than once"),
    ((2.0, 20.0, 2.0), "temperature 2 is given more than once"),
])
def test_temperatures_that_would_share_a_student_are_refused(temperatures, message):
    """Each temperature's student is a stage named by T: a repeated one would share a stage directory
    and give duplicate rows. (Two that `:g` rounds alike, 20.000001 and 20.000002, name two stages.)"""
    with pytest.raises(StillError, match=re.escape(message)):
        MnistConfig(temperatures=temperatures)
    assert MnistConfig(temperatures=(2.0, 20.0, 20.001)).temperatures == (2.0, 20.0, 20.001)


def test_the_cli_refuses_repeated_temperatures(tmp_path, capsys):
    tiny = ["--train-subset", "100", "--test-subset", "100", "--teacher-epochs", "1", "--student-epochs", "1",
            "--threads", "1"]  # short, were it to run
    assert_user_error(capsys, "distill", "mnist", *tiny, "--temperature", "20,20", "--out", str(tmp_path / "run"),
                      contains="temperature 20 is given more than once")
    assert not (tmp_path / "run").exists()


def test_precision_is_fp32_or_bf16():
    assert MnistConfig().precision == "fp32" and MnistConfig(precision="bf16").precision == "bf16"
    with pytest.raises(StillError, match="fp16"):
        MnistConfig(precision="fp16")


def test_the_cli_names_a_precision_it_does_not_know(tmp_path, capsys):
    assert_user_error(capsys, "distill", "mnist", "--precision", "fp16", "--out", str(tmp_path / "run"),
                      contains="fp16")
    assert not (tmp_path / "run").exists()
