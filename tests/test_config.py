from dataclasses import dataclass

import pytest

from still.config import from_dict, load_config, replace, save_config, to_dict
from still.distill.models import MLPConfig
from still.errors import StillError
from still.recipes.mnist import PRESETS, MnistConfig
from still.train.optim import OptimConfig


def test_round_trip_through_json(tmp_path):
    config = PRESETS["paper"]
    save_config(config, tmp_path / "config.json")
    assert load_config(MnistConfig, tmp_path / "config.json") == config


def test_unknown_keys_are_rejected_with_the_known_ones():
    with pytest.raises(StillError, match=r"unknown key\(s\) tempreature; known keys: .*temperatures"):
        from_dict(MnistConfig, {"tempreature": 3})


def test_nested_unknown_key_names_its_path():
    with pytest.raises(StillError, match=r"MnistConfig.teacher: unknown key\(s\) dropuot"):
        from_dict(MnistConfig, {"teacher": {"dropuot": 0.5}})


@pytest.mark.parametrize("data, message", [
    ({"teacher_epochs": "ten"}, "teacher_epochs: expected an integer, got 'ten'"),
    ({"alpha": True}, "alpha: expected a number"),
    ({"temperatures": [2, -1]}, "temperature must be > 0, got -1"),
    ({"alpha": 1.5}, r"alpha \(the weight of the soft-target term\) must be in \[0, 1\], got 1.5"),
    ({"teacher_optim": {"name": "rmsprop"}}, "'rmsprop' is not one of 'sgd', 'adam', 'adamw'"),
    ({"omit_digit": 11}, "omit_digit must be in 0..9, got 11"),
])
def test_bad_values_are_named(data, message):
    with pytest.raises(StillError, match=message):
        from_dict(MnistConfig, data)


def test_replace_validates():
    with pytest.raises(StillError, match="lr must be > 0"):
        replace(OptimConfig(), lr=0.0)
    assert replace(MLPConfig(), hidden=[10, 10]).hidden == (10, 10)


def test_to_dict_is_plain_data():
    data = to_dict(PRESETS["quick"])
    assert data["teacher"]["hidden"] == [1200, 1200] and data["temperatures"] == [20.0]


def test_optional_nested_dataclass():
    @dataclass(frozen=True)
    class Outer:
        inner: MLPConfig | None = None

    assert from_dict(Outer, {"inner": None}).inner is None
    assert from_dict(Outer, {"inner": {"classes": 3}}).inner.classes == 3
