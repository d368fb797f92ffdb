"""End to end: `still distill cifar10` on batches the test writes in the real format."""

import json

from helpers import run_cli


def test_tiny_preset_runs_end_to_end(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny",
                                "--threads", "1", "--out", str(out))
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["teacher", "student alone", "distilled T=5"]
    assert all(0 <= r["test_accuracy"] <= 100 for r in rows)
    assert (out / "test_accuracy.png").is_file()
    assert "| test_accuracy |" in stdout and "labml |" not in stdout  # labml's numbers: its preset's alone


def test_online_teacher_with_augmentation(cifar_dir, tmp_path, capsys):
    from still.recipes.cifar10 import PRESETS, run_cifar10, with_overrides

    config = with_overrides(PRESETS["tiny"], augment=True, epochs=1)
    result = run_cifar10(config, cifar_dir, tmp_path / "aug", print_table=False)
    assert len(result["rows"]) == 3


def test_augment_shapes_and_flip():
    import torch

    from still.recipes.cifar10 import augment

    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    y = augment(x)
    assert y.shape == x.shape
