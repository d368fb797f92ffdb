import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

import pytest

from still.config import check_fields, from_dict, load_config, replace, save_config, to_dict
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


def test_a_files_keys_are_named_after_a_colon(tmp_path):
    """`runs/e/config.json.model.mem_len` read as one path; the file, then its key."""
    path = tmp_path / "config.json"
    path.write_text('{"teacher": {"hidden": ["8"]}}')
    with pytest.raises(StillError, match=re.escape(f"{path}: teacher.hidden[0]: expected an integer, got '8'")):
        load_config(MnistConfig, path)
    # values a config's own checks refuse are named where they were read too (a probe: "error: mem_len must
    # be >= 0, got -1" said neither the file nor the key's place)
    from still.recipes.lm import LMConfig

    for text, message in (('{"alpha": 1.5}', f"{path}: alpha (the weight of the soft-target term) must be in [0, 1]"),
                          ('{"model": {"mem_len": -1}}', f"{path}: model: mem_len must be >= 0, got -1")):
        path.write_text(text)
        with pytest.raises(StillError, match=re.escape(message)):
            load_config(MnistConfig if "alpha" in text else LMConfig, path)
    path.write_bytes(b"\xff\xfe{}")  # (not UTF-8: a UnicodeDecodeError's traceback, from `still lm eval` too)
    with pytest.raises(StillError, match=re.escape(f"cannot read config {path}: 'utf-8' codec can't decode")):
        load_config(MnistConfig, path)
    with pytest.raises(StillError, match=r"^alpha \(the weight"):  # (built in Python: the message alone)
        replace(MnistConfig(), alpha=1.5)


@pytest.mark.parametrize("data, message", [
    ({"teacher_epochs": "ten"}, "teacher_epochs: expected an integer, got 'ten'"),
    ({"alpha": True}, "alpha: expected a number"),
    ({"temperatures": [2, -1]}, "temperature must be a finite number > 0, got -1"),
    ({"alpha": 1.5}, r"alpha \(the weight of the soft-target term\) must be in \[0, 1\], got 1.5"),
    ({"teacher_optim": {"name": "rmsprop"}}, "'rmsprop' is not one of 'sgd', 'adam', 'adamw'"),
    ({"omit_digit": 11}, "omit_digit must be in 0..9, got 11"),
])
def test_bad_values_are_named(data, message):
    with pytest.raises(StillError, match=message):
        from_dict(MnistConfig, data)


def test_replace_validates():
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(StillError, match="lr must be a finite number > 0"):
            replace(OptimConfig(), lr=bad)
    for field in ("weight_decay", "grad_clip"):
        with pytest.raises(StillError, match=f"{field} must be a finite number"):
            replace(OptimConfig(), **{field: float("inf")})
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


from hypothesis import (  # noqa: E402
    given,
    settings,
    strategies as st,  # noqa: E402
)

from still.compressive.model import CompressiveConfig  # noqa: E402
from still.recipes.lm import LMConfig  # noqa: E402

json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                           | st.text(max_size=8), lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(data=st.dictionaries(st.sampled_from(["vocab_size", "d_model", "n_layers", "n_heads", "mem_len",
                                             "c_mem_len", "compression_rate", "compression", "dropout",
                                             "pre_norm", "nonsense"]), json_values, max_size=5))
def test_config_parser_accepts_or_names_the_problem(data):
    """Whatever JSON-like data comes in: a valid config, or a StillError; never another exception."""
    try:
        config = from_dict(CompressiveConfig, data)
    except StillError as e:
        assert str(e)
    else:
        assert from_dict(CompressiveConfig, to_dict(config)) == config


@settings(max_examples=60, deadline=None)
@given(mem_len=st.integers(0, 64), c_mem_len=st.integers(0, 64), rate=st.integers(1, 8),
       segment_len=st.integers(1, 64))
def test_lm_config_rate_compatibility(mem_len, c_mem_len, rate, segment_len):
    data = {"model": {"mem_len": mem_len, "c_mem_len": c_mem_len, "compression_rate": rate},
            "segment_len": segment_len}
    compatible = c_mem_len == 0 or (mem_len % rate == 0 and segment_len % rate == 0)
    try:
        from_dict(LMConfig, data)
        assert compatible
    except StillError as e:
        assert not compatible and "multiple of compression_rate" in str(e)


@dataclass(frozen=True)
class _Checked:
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[float, float] | None = None
    mode: Literal["a", "b"] = "a"
    maybe: Literal["x"] | None = None

    def __post_init__(self) -> None:
        check_fields(self)


def test_check_fields_makes_tuples_and_checks_literals():
    config = _Checked(sizes=[3, 4], pair=[0.5, 0.25])
    assert config.sizes == (3, 4) and config.pair == (0.5, 0.25)
    assert from_dict(_Checked, to_dict(config)) == config and hash(config) == hash(_Checked((3, 4), (0.5, 0.25)))
    assert _Checked(maybe=None).maybe is None and _Checked(maybe="x").maybe == "x"
    with pytest.raises(StillError, match="_Checked.mode: 'c' is not one of 'a', 'b'"):
        _Checked(mode="c")
    with pytest.raises(StillError, match="_Checked.maybe: 'y' is not one of 'x', None"):
        _Checked(maybe="y")


def test_a_config_built_in_python_holds_values_of_its_types():
    """As `from_dict` makes them: `pre_norm="no"` (truthy) built a pre-norm model, `d_ff=32.0` and
    `vocab_size="10"` raised raw TypeErrors in the model's constructor."""
    from still.compressive import CompressiveConfig

    for kwargs, message in (({"pre_norm": "no"}, "CompressiveConfig.pre_norm: expected true or false, got 'no'"),
                            ({"d_ff": 32.0}, "CompressiveConfig.d_ff: expected an integer, got 32.0"),
                            ({"vocab_size": "10"}, "CompressiveConfig.vocab_size: expected an integer, got '10'"),
                            ({"n_layers": True}, "CompressiveConfig.n_layers: expected an integer, got True"),
                            ({"dropout": "0.1"}, "CompressiveConfig.dropout: expected a number, got '0.1'")):
        with pytest.raises(StillError, match=re.escape(message)):
            CompressiveConfig(**kwargs)
    config = CompressiveConfig(dropout=0)  # an int for a float: a float, as from JSON
    assert isinstance(config.dropout, float) and from_dict(CompressiveConfig, to_dict(config)) == config
    with pytest.raises(StillError, match=re.escape("_Checked.sizes[1]: expected an integer, got 'x'")):
        _Checked(sizes=(1, "x"))


def test_numpy_numbers_are_taken_as_python_ones():
    """Probes: `CompressiveConfig(d_model=np.int64(64))` and `OptimConfig(lr=np.float32(...))` (a
    sweep's values) were refused as not integers or numbers, where the loss functions take them."""
    import numpy as np

    from still.compressive import CompressiveConfig

    config = CompressiveConfig(d_model=np.int64(64), n_heads=np.int8(4), dropout=np.float32(0.25))
    assert type(config.d_model) is int and type(config.n_heads) is int and type(config.dropout) is float
    assert config == CompressiveConfig(d_model=64, n_heads=4, dropout=0.25)
    assert from_dict(CompressiveConfig, to_dict(config)) == config
    optim = OptimConfig(lr=np.float64(0.01), betas=list(np.array([0.9, 0.99], np.float32)),
                        warmup_fraction=np.float16(0.5))
    assert optim == OptimConfig(lr=0.01, betas=(np.float32(0.9).item(), np.float32(0.99).item()), warmup_fraction=0.5)
    assert all(type(b) is float for b in optim.betas)
    mnist = MnistConfig(batch_size=np.uint16(64), seed=np.uint64(7))
    assert (mnist.batch_size, mnist.seed) == (64, 7) and type(mnist.seed) is int
    assert CompressiveConfig(pre_norm=np.bool_(False)).pre_norm is False  # (NumPy's bools for bools)
    for kwargs, message in (({"n_layers": np.bool_(True)}, "expected an integer, got np.True_"),
                            ({"d_model": np.float64(64.0)}, "expected an integer, got"),
                            ({"dropout": np.bool_(False)}, "expected a number, got np.False_")):
        with pytest.raises(StillError, match=re.escape(message)):
            CompressiveConfig(**kwargs)


def test_optim_config_given_a_list_equals_itself_after_a_round_trip():
    config = OptimConfig(betas=[0.9, 0.99])
    assert config.betas == (0.9, 0.99) and from_dict(OptimConfig, to_dict(config)) == config
    assert hash(config) == hash(OptimConfig(betas=(0.9, 0.99)))


@dataclass(frozen=True)
class _Derived:
    width: int = 4
    area: int = dataclasses.field(init=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "area", self.width**2)


def test_derived_fields_are_neither_saved_nor_refused(tmp_path):
    save_config(_Derived(5), tmp_path / "c.json")
    assert to_dict(_Derived(5)) == {"width": 5}
    assert load_config(_Derived, tmp_path / "c.json") == _Derived(5)
    assert replace(_Derived(5), width=6).area == 36


def test_a_huge_integer_for_a_float_is_named():
    with pytest.raises(StillError, match="OptimConfig.lr: expected a number, got an integer too large for a float"):
        from_dict(OptimConfig, {"lr": 10**400})


def test_the_projects_configs_take_lists_for_tuples_and_round_trip():
    """Every config of the project runs `check_fields`: lists given in Python are stored as tuples,
    so the config hashes and equals itself after a JSON round trip."""
    from still.compressive import CompressiveConfig
    from still.distill.models import VGGConfig

    for config in (MLPConfig(hidden=[10, 10]), VGGConfig(blocks=[[8], [16, 16]]), MnistConfig(temperatures=[2.0, 20.0]),
                   CompressiveConfig(d_model=32, n_heads=4)):
        assert hash(config) is not None and from_dict(type(config), to_dict(config)) == config
    with pytest.raises(StillError, match="'zip' is not one of"):
        CompressiveConfig(compression="zip")
