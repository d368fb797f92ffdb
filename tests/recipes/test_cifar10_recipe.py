"""End to end: `still distill cifar10` on batches the test writes in the real format."""

import json
import shutil

import pytest

from helpers import assert_user_error, run_cli, run_config, stage_history
from still.errors import StillError


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
    alpha = json.loads((out / "config.json").read_text())["alpha"]
    assert f"alpha {alpha:g}" in stdout.splitlines()[0]  # (a fuzzer: the table never said its alpha)
    code, stdout, err = run_cli(capsys, "distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny",
                                "--threads", "1", "--out", str(out), "--alpha", "-0.0")
    assert code == 0 and ", alpha 0" in stdout.splitlines()[0], err  # (it read "alpha -0")
    code, _, err = run_cli(capsys, "distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny",
                           "--threads", "1", "--out", str(out), "--alpha", "0")
    assert code == 0 and "distilled-T5-a0: loaded the finished run" in err, err  # (-0.0 trained a stage of its own)
    assert not (out / "distilled-T5-a-0").exists()


def test_a_table_names_the_finished_students_it_leaves_out(cifar_dir, tmp_path, capsys):
    """A probe (in run_mnist, and here alike): a second command's student replaced the first's in the
    folder's table, with nothing said of the first's, still on disk. They are named under it."""
    out = tmp_path / "run"
    args = ["distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny", "--epochs", "1", "--threads", "1",
            "--out", str(out)]
    for extra in (("--temperature", "2"), ("--alpha", "0.25"), ()):
        code, _, err = run_cli(capsys, *args, *extra)
        assert code == 0, err
    labels = ["distilled T=2", "distilled T=5, alpha 0.25"]
    assert json.loads((out / "results.json").read_text())["meta"]["other_students"] == labels
    note = f"{out} also holds finished students not in this table: {'; '.join(labels)} (each is in the table"
    assert note in (out / "results.md").read_text() and note in err
    shutil.rmtree(out / "distilled-T2-a0.5" / "checkpoints")  # (unfinished: not named)
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and json.loads((out / "results.json").read_text())["meta"]["other_students"] == labels[1:]


def test_a_signal_while_the_report_is_written_leaves_it_whole(cifar_dir, tmp_path, capsys, monkeypatch):
    """A probe: SIGTERM between results.json and results.md left this command's results.json beside
    the results.md and plot of the command before. The report is written with signals deferred to
    its end; the command then stops as the signal asks (exit 143), its report whole."""
    import os
    import signal

    import still.recipes.cifar10 as cifar10
    import still.train.results as results

    out = tmp_path / "run"
    args = ["distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny", "--epochs", "1", "--threads", "1",
            "--out", str(out)]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    write, plot, plotted = results.atomic_write_text, cifar10.plot_curves, []
    monkeypatch.setattr(cifar10, "plot_curves", lambda path, *a, **k: plotted.append(path) or plot(path, *a, **k))

    def signalled(path, text):
        write(path, text)
        if path.name == "results.json":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(results, "atomic_write_text", signalled)
    code, _, _ = run_cli(capsys, *args, "--temperature", "2")
    assert code == 143
    assert json.loads((out / "results.json").read_text())["rows"][-1]["model"] == "distilled T=2"
    assert "| distilled T=2 " in (out / "results.md").read_text()
    assert json.loads((out / "config.json").read_text())["temperature"] == 2
    assert plotted == [out / "test_accuracy.png"]  # (its curves here are the same as the T=5 run's)


def test_a_finished_run_run_again_writes_nothing_and_prints_its_table_first(cifar_dir, tmp_path, capsys,
                                                                             monkeypatch):
    """As in run_mnist (a probe there): a finished run run again on read-only media rewrote its
    plot, failing, and a report that could not be written printed no table."""
    import os

    import still.train.io as io

    out = tmp_path / "run"
    args = ["distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny", "--epochs", "1", "--threads", "1",
            "--out", str(out)]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    files = ("config.json", "results.json", "results.md", "test_accuracy.png")
    for name in files:
        os.utime(out / name, ns=(10**9, 10**9))  # (an mtime a write would change)

    def read_only(path, write):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(io, "atomic_write", read_only)
    code, printed, err = run_cli(capsys, *args)
    assert code == 0 and "| distilled T=5 " in printed, err
    assert all((out / name).stat().st_mtime_ns == 10**9 for name in files)
    (out / "results.md").unlink()
    code, printed, err = run_cli(capsys, *args)
    assert code == 2 and "error: Read-only file system: " in err and "| distilled T=5 " in printed


def test_a_temperature_that_six_digits_round_is_a_student_of_its_own(cifar_dir, tmp_path, capsys):
    """A probe: the stage of T 5.0000001 was named T5 (`:g`), and was refused as T5's with other
    settings (with --overwrite, T5's student was deleted). It names its own, all its digits."""
    out = tmp_path / "run"
    args = ["distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny", "--epochs", "1", "--threads", "1",
            "--out", str(out)]
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and (out / "distilled-T5-a0.5").is_dir(), err
    code, stdout, err = run_cli(capsys, *args, "--temperature", "5.0000001", "--alpha", "0.50000001")
    assert code == 0, err
    assert (out / "distilled-T5.0000001-a0.50000001").is_dir() and (out / "distilled-T5-a0.5").is_dir()
    assert "| distilled T=5.0000001 " in stdout
    # a stage an older still named by :g is its student still (a review probe: trained again beside it)
    code, _, err = run_cli(capsys, *args, "--temperature", "0.1234567")
    assert code == 0, err
    (out / "distilled-T0.1234567-a0.5").rename(out / "distilled-T0.123457-a0.5")
    code, stdout, err = run_cli(capsys, *args, "--temperature", "0.1234567")
    assert code == 0 and not (out / "distilled-T0.1234567-a0.5").exists(), err
    assert "distilled-T0.123457-a0.5/checkpoints" in err and "loaded the finished run" in err, err
    assert "| distilled T=0.1234567 " in stdout and "T=0.1234567 (" not in err  # (not an "other student")


def test_labmls_numbers_stand_beside_labmls_experiment_only():
    """A probe: labml's 82 (its student at T=5 after 10 epochs) stood beside runs of the labml preset
    with --epochs 1 or --temperature 2. A row gets labml's number where its experiment is labml's."""
    from still.recipes.cifar10 import LABML, PRESETS, _labml, with_overrides

    labml = PRESETS["labml"]
    assert [_labml(labml, m) for m in LABML] == [85.0, 80.0, 82.0]
    assert [_labml(with_overrides(labml, seed=3, precision="bf16"), m) for m in LABML] == [85.0, 80.0, 82.0]
    assert [_labml(with_overrides(labml, temperature=2.0), m) for m in LABML] == [85.0, 80.0, None]
    assert [_labml(with_overrides(labml, alpha=0.9), m) for m in LABML] == [85.0, 80.0, None]
    assert [_labml(with_overrides(labml, epochs=1), m) for m in LABML] == [85.0, None, None]  # (its teacher's 20)
    assert [_labml(with_overrides(labml, teacher_epochs=1), m) for m in LABML] == [None, 80.0, None]
    assert [_labml(with_overrides(labml, normalization="mean_std"), m) for m in LABML] == [None, None, None]
    assert [_labml(PRESETS["tiny"], m) for m in LABML] == [None, None, None]


def test_the_labml_preset_is_labmls_experiment():
    """A probe, against labml-nn 0.5.1's `distillation/` and `experiments/cifar10.py`: labml trains its
    teacher 20 epochs and each student 10 (its configs' default 10; large.py sets 20), puts a dropout
    before each of the teacher's convolutions, and normalises pixels by 0.5 and 0.5. The preset
    trained all three 32 epochs, dropped out after each pool, and used CIFAR-10's mean and std. The
    tiny preset keeps its settings."""
    from still.distill.models import VGG_STUDENT, VGG_TEACHER
    from still.recipes.cifar10 import PRESETS

    labml, tiny = PRESETS["labml"], PRESETS["tiny"]
    assert (labml.teacher_run_epochs, labml.epochs, labml.normalization) == (20, 10, "half")
    assert labml.teacher == VGG_TEACHER and labml.teacher.dropout_at == "conv" and labml.teacher.dropout == 0.1
    assert labml.student == VGG_STUDENT and labml.student.dropout == 0
    assert (tiny.teacher_run_epochs, tiny.epochs, tiny.normalization, tiny.teacher.dropout_at) == (
        2, 2, "mean_std", "pool")


def test_a_config_json_from_before_the_per_stage_settings_loads_as_it_ran(tmp_path):
    """A config.json written before teacher_epochs, normalization and the VGG's dropout_at existed
    (the labml preset's, 32 epochs) loads to what it ran: the teacher for its epochs, CIFAR-10's mean
    and std, the dropouts after the pools; and its folder is still a distill cifar10 run."""
    from still.config import load_config, to_dict
    from still.recipes.cifar10 import Cifar10Config
    from still.recipes.common import run_kind

    old = to_dict(Cifar10Config(epochs=32))
    for key in ("teacher_epochs", "normalization"):
        del old[key]
    for model in ("teacher", "student"):
        del old[model]["dropout_at"]
    old["teacher"]["dropout"] = 0.1
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = load_config(Cifar10Config, tmp_path / "config.json")
    assert (config.teacher_run_epochs, config.epochs, config.normalization) == (32, 32, "mean_std")
    assert config.teacher.dropout_at == "pool" and config.student.dropout_at == "pool"
    assert run_kind(tmp_path) == "distill cifar10"


def test_the_teachers_epochs_and_the_new_settings_in_the_stages(cifar_dir, tmp_path, capsys, monkeypatch):
    """--teacher-epochs trains the teacher alone that long (--epochs alone: all three runs); the stages
    of the default settings record them as before they existed (an older run folder still loads), and
    another normalisation, dropout placement or teacher's epochs is refused like any changed setting."""
    import still.recipes.cifar10 as cifar10
    from still.config import replace
    from still.recipes.cifar10 import PRESETS, run_cifar10, with_overrides

    out = tmp_path / "run"
    args = ["distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny", "--epochs", "1", "--threads", "1",
            "--out", str(out)]
    code, _, err = run_cli(capsys, *args, "--teacher-epochs", "2")
    assert code == 0, err
    epochs = {stage: json.loads((out / stage / "stage.json").read_text())["epochs"]
              for stage in ("teacher", "student", "distilled-T5-a0.5")}
    assert epochs == {"teacher": 2, "student": 1, "distilled-T5-a0.5": 1}
    assert len(stage_history(out / "teacher")) == 2 and len(stage_history(out / "student")) == 1
    teacher = json.loads((out / "teacher" / "stage.json").read_text())
    assert "normalization" not in teacher and "dropout_at" not in teacher["model"]  # (as an older still's)
    tiny = with_overrides(PRESETS["tiny"], epochs=1, teacher_epochs=2)
    for changed, named in ((with_overrides(tiny, normalization="half"), "normalization"),
                           (with_overrides(tiny, teacher=replace(tiny.teacher, dropout_at="conv")), "model"),
                           (with_overrides(tiny, teacher_epochs=3), "epochs")):
        with pytest.raises(StillError, match=rf"teacher holds a run with different settings \({named}\)"):
            run_cifar10(changed, cifar_dir, out, print_table=False)

    seen = []  # --epochs alone: the teacher's too, as before (the labml preset's own is 20)
    monkeypatch.setattr(cifar10, "run_cifar10", lambda config, *a, **k: seen.append(config))
    code, _, err = run_cli(capsys, "distill", "cifar10", "--data-dir", str(cifar_dir), "--epochs", "3")
    assert code == 0 and (seen[0].teacher_run_epochs, seen[0].epochs) == (3, 3), err


def test_online_teacher_with_augmentation(cifar_dir, tmp_path, capsys):
    from still.recipes.cifar10 import PRESETS, run_cifar10, with_overrides

    config = with_overrides(PRESETS["tiny"], augment=True, epochs=1)
    result = run_cifar10(config, cifar_dir, tmp_path / "aug", print_table=False)
    assert len(result["rows"]) == 3
    # the same from the command line (the tiny preset's augmentation could be turned on from Python only)
    code, _, _ = run_cli(capsys, "distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny",
                         "--epochs", "1", "--augment", "--threads", "1", "--out", str(tmp_path / "aug"))
    assert code == 0 and json.loads((tmp_path / "aug" / "config.json").read_text())["augment"] is True


def test_augment_shapes_and_flip():
    import torch

    from still.recipes.cifar10 import augment

    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    y = augment(x)
    assert y.shape == x.shape


def test_another_data_set_in_the_same_directory_is_refused(cifar_dir, tmp_path, capsys):
    """The stages record their data set: another --data-dir into the same --out is refused like any
    other changed setting, the same data loads the finished stages, and a stage from before data
    sets were recorded is refused with that reason."""
    from conftest import write_cifar_batch

    out = tmp_path / "run"
    args = ["distill", "cifar10", "--preset", "tiny", "--epochs", "1", "--threads", "1", "--out", str(out)]
    code, _, err = run_cli(capsys, *args, "--data-dir", str(cifar_dir))
    assert code == 0, err
    recorded = json.loads((out / "teacher" / "stage.json").read_text())["data"]
    assert recorded["train_images"] == 200 and recorded["test_images"] == 50 and len(recorded["train_sha256"]) == 64

    other = tmp_path / "other"
    shutil.copytree(cifar_dir / "cifar-10-batches-py", other)
    write_cifar_batch(other / "data_batch_3", 40, seed=33)  # one batch changed
    assert_user_error(capsys, *args, "--data-dir", str(other), contains="holds a run with different settings (data)")
    code, _, err = run_cli(capsys, *args, "--data-dir", str(cifar_dir))
    assert code == 0 and err.count("loaded the finished run") == 3

    for stage in ("teacher", "student", "distilled-T5-a0.5"):  # as an older still wrote them
        path = out / stage / "stage.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "data"}))
    assert_user_error(capsys, *args, "--data-dir", str(cifar_dir), contains="did not record its data set")


def test_a_refused_overwrite_has_deleted_and_written_nothing(cifar_dir, tmp_path, capsys):
    """As in run_mnist (a probe there): refused at the distilled student's folder, `--overwrite` had
    removed the run's results, replaced its config.json and trained the teacher and student again."""
    out = tmp_path / "run"
    args = ["distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny", "--epochs", "1", "--threads", "1",
            "--out", str(out)]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    shutil.rmtree(out / "distilled-T5-a0.5")
    (out / "distilled-T5-a0.5").mkdir()
    (out / "distilled-T5-a0.5" / "config.json").write_text(run_config("language-model"))
    before = sorted((str(p.relative_to(out)), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))
    assert_user_error(capsys, *args, "--seed", "5", "--overwrite",
                      contains=f"{out / 'distilled-T5-a0.5'} holds a language-model run, not the distilled-T5-a0.5")
    assert sorted((str(p.relative_to(out)), p.read_bytes() if p.is_file() else None) for p in out.rglob("*")) == before


def test_augment_pads_with_black_as_labml_does():
    """labml pads the raw image with 0 (black) before normalising: the border is -mean/std per channel."""
    import torch

    from still.data.cifar10 import normalize
    from still.recipes.cifar10 import augment

    torch.manual_seed(0)
    black = normalize(torch.zeros(64, 3, 32, 32, dtype=torch.uint8))
    assert torch.equal(augment(black), black)  # a black image's border is black too
    white = normalize(torch.full((64, 3, 32, 32), 255, dtype=torch.uint8))
    out = augment(white)
    for channel in range(3):
        values = set(out[:, channel].unique().tolist())
        assert values == {black[0, channel, 0, 0].item(), white[0, channel, 0, 0].item()}, values
    white = normalize(torch.full((64, 3, 32, 32), 255, dtype=torch.uint8), "half")  # labml's: black is -1
    assert set(augment(white, "half").unique().tolist()) == {-1.0, 1.0}


def test_bf16_trains_every_stage_under_autocast(cifar_dir, tmp_path, capsys):
    """--precision bf16: each stage records it (an fp32 rerun into the directory is refused), and its
    losses move by bf16's rounding from the same seeded fp32 run's; fp32 stages record no precision."""
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        code, stdout, err = run_cli(capsys, "distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny",
                                    "--epochs", "1", "--threads", "1", "--precision", precision, "--out", str(out))
        assert code == 0, err
        runs[precision] = out
    title = "test images, alpha 0.5, epochs 1 (teacher) and 1 (students), bf16"
    assert title in (runs["bf16"] / "results.md").read_text()
    for stage in ("teacher", "student", "distilled-T5-a0.5"):
        assert json.loads((runs["bf16"] / stage / "stage.json").read_text())["precision"] == "bf16"
        assert "precision" not in json.loads((runs["fp32"] / stage / "stage.json").read_text())
        losses = {}
        for precision, run in runs.items():
            losses[precision] = [h["train_loss"] for h in stage_history(run / stage)]
        assert losses["bf16"] != losses["fp32"], stage
    assert_user_error(capsys, "distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny", "--epochs", "1",
                      "--threads", "1", "--out", str(runs["bf16"]), contains="different settings (precision)")


def _interrupted_after_the_teacher(monkeypatch, signum):
    """Runs of the recipe interrupted by `signum` as the stage after the teacher starts."""
    import still.recipes.cifar10 as cifar10
    from still.errors import TrainingInterrupted

    train_stage = cifar10.train_stage

    def interrupted(name, *args, **kwargs):
        if name != "teacher":
            raise TrainingInterrupted(signum, 0, None)
        return train_stage(name, *args, **kwargs)

    monkeypatch.setattr(cifar10, "train_stage", interrupted)


def test_an_interrupted_run_is_told_from_other_recipes_runs(cifar_dir, corpus, tmp_path, capsys, monkeypatch):
    """Found by a probe: a distillation wrote its config.json only at its end, so an interrupted one
    was taken for no run at all: `lm train --out <its teacher> --overwrite` emptied the teacher, and
    another recipe's --overwrite trained over its stages. A new run folder is now marked at once."""
    import signal

    _interrupted_after_the_teacher(monkeypatch, signal.SIGINT)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".gitkeep").write_text("")  # (found by a probe: a folder that held any file was not marked)
    args = ["distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny", "--epochs", "1", "--threads", "1",
            "--out", str(out)]
    code, _, _ = run_cli(capsys, *args)
    assert code == 130 and json.loads((out / "config.json").read_text())["preset"] == "tiny"
    teacher = sorted(p.name for p in (out / "teacher").iterdir())
    for extra in ((), ("--overwrite",)):
        assert_user_error(capsys, "lm", "train", "--corpus", str(corpus), "--out", str(out / "teacher"), *extra,
                          contains=f"is the teacher stage of the distill cifar10 run in {out}")
        assert_user_error(capsys, "distill", "mnist", "--out", str(out), *extra,
                          contains="holds a distill cifar10 run, not a distill mnist run")
    assert sorted(p.name for p in (out / "teacher").iterdir()) == teacher
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and "loaded the finished run" in err, err


def test_an_interrupted_overwrite_leaves_no_table_of_the_run_it_replaces(cifar_dir, tmp_path, capsys, monkeypatch):
    """A probe: `--overwrite` with another seed, interrupted in the student, left the old run's
    config.json and results beside the new run's teacher: the folder's table described a run no
    longer there until the new one ended."""
    import signal

    out = tmp_path / "run"
    args = ["distill", "cifar10", "--data-dir", str(cifar_dir), "--preset", "tiny", "--epochs", "1", "--threads", "1",
            "--out", str(out)]
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and (out / "results.json").exists() and (out / "test_accuracy.png").exists(), err
    _interrupted_after_the_teacher(monkeypatch, signal.SIGTERM)
    code, _, _ = run_cli(capsys, *args, "--seed", "5", "--overwrite")
    assert code == 143 and json.loads((out / "config.json").read_text())["seed"] == 5
    assert not any((out / name).exists() for name in ("results.json", "results.md", "test_accuracy.png"))
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *args, "--seed", "5", "--overwrite")  # (the old student's stage is still there)
    assert code == 0 and json.loads((out / "results.json").read_text())["meta"]["config"]["seed"] == 5, err
