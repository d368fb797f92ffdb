import json
import math
import os

import numpy as np

from still.train.results import as_recorded, format_table, write_results


def test_huge_and_tiny_floats_stay_short():
    table = format_table([{"model": "a", "ppl": 1e30, "big": 1e300, "whole": 12345.6, "tiny": 1e-12, "nan": math.nan,
                           "inf": math.inf}])
    row = table.splitlines()[-1]
    assert "| 1e+30 |" in row and "| 1e+300 |" in row and "| 12346 |" in row and "| 1e-12 |" in row
    assert "| nan |" in row and "| inf |" in row and len(row) < 90


def test_numpy_scalars_are_written_as_numbers(tmp_path):
    rows = [{"model": "a", "errors": np.int64(3), "loss": np.float32(0.25), "ok": np.bool_(True)}]
    table = write_results(tmp_path, "results", rows, meta={"seed": np.int32(7), "nested": [np.float32(0.5)]})
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == {"rows": [{"model": "a", "errors": 3, "loss": 0.25, "ok": True}],
                    "meta": {"seed": 7, "nested": [0.5]}}
    assert "|      3 | 0.25 |" in table  # numeric columns, right-aligned


def test_arrays_are_written_as_lists_and_what_json_cannot_hold_is_named(tmp_path):
    """An array or a tensor of several numbers (a confusion matrix in the meta) was a TypeError."""
    import pytest
    import torch

    from still.errors import StillError

    write_results(tmp_path, "results", [{"model": "a"}], meta={"confusion": np.eye(2, dtype=np.int64),
                                                                "curve": torch.tensor([0.5, 0.25])})
    assert json.loads((tmp_path / "results.json").read_text())["meta"] == {"confusion": [[1, 0], [0, 1]],
                                                                           "curve": [0.5, 0.25]}
    with pytest.raises(StillError, match=r"results for .*results.json cannot be written as JSON: .*type object"):
        write_results(tmp_path, "results", [{"model": object()}])
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["curve"] == [0.5, 0.25]  # (unchanged)


def test_nan_is_written_as_python_json_writes_it(tmp_path):
    write_results(tmp_path, "results", [{"model": "a", "train_loss": math.nan}])
    assert '"train_loss": NaN' in (tmp_path / "results.json").read_text()
    assert math.isnan(json.loads((tmp_path / "results.json").read_text())["rows"][0]["train_loss"])


def test_a_file_names_undecodable_bytes_print_and_write_as_escapes(tmp_path):
    """A folder named in Latin-1 reaches Python as lone surrogates (surrogateescape), which UTF-8
    refuses: the table, its file and its print hold them as \\xNN (a run crashed at its end writing
    results.md)."""
    name = os.fsdecode(b"caf\xe9")
    table = write_results(tmp_path, "r", [{"corpus": name, "bpc": 1.5}], title=f"{name}: bits")
    assert table.startswith("caf\\xe9: bits") and "| caf\\xe9 |" in table
    assert (tmp_path / "r.md").read_text(encoding="utf-8") == table
    data = json.loads((tmp_path / "r.json").read_text())  # (JSON escapes it: the name read back is the same)
    assert data["rows"][0]["corpus"] == name
    table.encode("utf-8")


def test_one_element_tensors_are_numbers_and_text_stays_in_its_cell(tmp_path):
    """A tensor in a row raised json's TypeError (nothing written) and printed as `tensor(0.5)`; a `|`
    or a line break in a cell broke the table's rows (a probe)."""
    import torch

    rows = [{"model": "a|b\nc", "loss": torch.tensor(0.5), "errors": torch.tensor([3])}]
    table = write_results(tmp_path, "results", rows, meta={"seconds": torch.tensor(1.5)})
    assert table.splitlines()[2] == r"| a\|b c |  0.5 |      3 |"
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rows"] == [{"model": "a|b\nc", "loss": 0.5, "errors": 3}] and data["meta"] == {"seconds": 1.5}


def test_a_commands_timings_are_taken_as_recorded_where_its_results_are_those_there(tmp_path):
    """A probe: a finished distillation run again rewrote results.json for its timing alone (and failed
    on read-only media). Where the rows and the rest of the meta are those recorded, the recorded
    timings are kept, and so the same bytes (which `atomic_write_text` leaves as they are)."""
    rows = [{"model": "teacher", "test_errors": np.int64(3)}]
    write_results(tmp_path, "results", rows, meta={"config": {"seed": 0}, "seconds": {"logits": 0.1}})
    assert as_recorded(tmp_path / "results.json", rows, {"config": {"seed": 0}, "seconds": {"logits": 0.2}},
                       ("seconds",)) == {"config": {"seed": 0}, "seconds": {"logits": 0.1}}
    for other_rows, meta in (([{"model": "teacher", "test_errors": 4}], {"config": {"seed": 0}}),
                             (rows, {"config": {"seed": 1}}), (rows, {"config": {"seed": 0}, "more": 1})):
        meta = {**meta, "seconds": {"logits": 0.2}}
        assert as_recorded(tmp_path / "results.json", other_rows, meta, ("seconds",)) is meta
    assert as_recorded(tmp_path / "none.json", rows, meta, ("seconds",)) is meta
