"""End to end: `still lm train / eval / generate` on a small corpus the test writes."""

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from helpers import assert_user_error, run_cli, run_config
from still.errors import StillError
from still.train.checkpoint import list_checkpoints


def train_args(corpus, out, *extra):
    return ["lm", "train", "--corpus", str(corpus), "--steps", "8", "--eval-every", "4", "--batch-size", "3",
            "--segment-len", "16", "--mem-len", "16", "--c-mem-len", "8", "--threads", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "run"
    from still.cli import main

    try:
        main(train_args(corpus, out))
    except SystemExit as e:
        assert e.code in (0, None)
    return out


def model_hash(run):
    newest = sorted((run / "checkpoints").glob("ckpt-*"))[-1]
    return hashlib.sha256((newest / "model.safetensors").read_bytes()).hexdigest()


def test_train_writes_results_curves_and_memories(trained):
    result = json.loads((trained / "results.json").read_text())
    row = result["rows"][0]
    assert row["model"].startswith("compressive 16+8/4 conv attention")
    assert 1.0 < row["valid_bpc"] < 7.0 and 1.0 < row["test_bpc"] < 7.0
    assert [h["step"] for h in result["meta"]["history"]] == [4, 8]
    assert (trained / "curves.png").is_file() and (trained / "vocab.json").is_file()
    from safetensors.torch import load_file

    newest = sorted((trained / "checkpoints").glob("ckpt-*"))[-1]
    state = load_file(str(newest / "state.safetensors"))
    assert state["extra/memory/0"].shape == (3, 16, 128) and state["extra/compressed/0"].shape[1] > 0


def test_resume_after_losing_the_last_checkpoint_is_exact(trained, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    shutil.rmtree(sorted((out / "checkpoints").glob("ckpt-*"))[-1])
    code, _, err = run_cli(capsys, *train_args(corpus, out))
    assert code == 0 and "at the start of epoch 2" in err
    assert model_hash(out) == model_hash(trained)
    a = json.loads((out / "results.json").read_text())["rows"]
    b = json.loads((trained / "results.json").read_text())["rows"]
    assert a == b


def test_a_run_interrupted_within_an_interval_records_the_uninterrupted_history(trained, corpus, tmp_path, capsys,
                                                                               monkeypatch):
    """Interrupted at step 6 of 8 (the second interval's middle) and resumed: the training bits of
    that interval average all four of its steps, as the uninterrupted run's do (the steps before
    the interruption travel in the checkpoint)."""
    import os
    import signal

    from still.recipes.lm import TrainStream

    segment = TrainStream.segment

    def interrupting(self, step):
        if step == 5:  # during step 5: the step ends, a checkpoint at step 6 is written, the run stops
            os.kill(os.getpid(), signal.SIGINT)
        return segment(self, step)

    out = tmp_path / "run"
    monkeypatch.setattr(TrainStream, "segment", interrupting)
    code, _, err = run_cli(capsys, *train_args(corpus, out))
    assert code == 130, err
    assert sorted(p.name for p in (out / "checkpoints").glob("ckpt-*")) == ["ckpt-00000004", "ckpt-00000006"]
    monkeypatch.setattr(TrainStream, "segment", segment)
    code, _, err = run_cli(capsys, *train_args(corpus, out))
    assert code == 0 and "resuming" in err
    history = [{k: v for k, v in h.items() if k != "seconds"}
               for h in json.loads((out / "results.json").read_text())["meta"]["history"]]
    assert history == [{k: v for k, v in h.items() if k != "seconds"}
                       for h in json.loads((trained / "results.json").read_text())["meta"]["history"]]


def test_eval_by_position(trained, capsys):
    code, out, _ = run_cli(capsys, "lm", "eval", str(trained), "--split", "valid", "--threads", "1")
    assert code == 0 and "bits per character" in out and "Loss by position" in out
    result = json.loads((trained / "eval-valid.json").read_text())
    assert result["meta"]["tokens"] == sum(r["tokens"] for r in result["rows"])
    rows = result["rows"]  # inclusive ranges, one after another, the last ending at the last position
    assert rows[0]["from"] == 0 and all(a["to"] + 1 == b["from"] for a, b in zip(rows, rows[1:]))
    from still.data.text import load_corpus
    from still.recipes.lm import load_run

    config = load_run(trained)[0]
    assert rows[-1]["to"] == max(len(d.text) for d in load_corpus(config.corpus).valid) - 1
    train_valid = json.loads((trained / "results.json").read_text())["rows"][0]["valid_bpc"]
    assert result["meta"]["bits_per_token"] == pytest.approx(train_valid, abs=1e-4)
    assert (trained / "eval-valid-by-position.png").is_file()


def test_eval_maps_the_ids_training_encoded_and_reads_no_text(trained, capsys, monkeypatch):
    """Training encoded the corpus once into the cache (`still.data.encoded`): `lm eval` maps its ids
    and opens none of the corpus's files, for the bits training gave."""
    import still.data.text as text

    def unread(path, byte_level):
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(text, "_read", unread)
    code, _, _ = run_cli(capsys, "lm", "eval", str(trained), "--split", "test", "--threads", "1")
    assert code == 0
    test_bpc = json.loads((trained / "results.json").read_text())["rows"][0]["test_bpc"]
    meta = json.loads((trained / "eval-test.json").read_text())["meta"]
    assert meta["bits_per_token"] == pytest.approx(test_bpc, abs=1e-4)
    # the entry's digest of the split, the one training recorded
    recorded = json.loads((trained / "stage.json").read_text())["split_sha256"]
    assert sorted(recorded) == ["test", "train", "valid"]
    assert meta["split_sha256"] == recorded["test"] and meta["changed_since_training"] is False


def test_generate_is_seeded_and_streams(trained, capsys):
    args = ["lm", "generate", str(trained), "--prompt", "To be", "--tokens", "40", "--top-k", "5", "--threads", "1"]
    code, first, _ = run_cli(capsys, *args)
    code2, second, _ = run_cli(capsys, *args)
    assert code == code2 == 0 and first == second and first.startswith("To be") and len(first) > 40
    _, other, _ = run_cli(capsys, *args, "--seed", "1")
    assert other != first
    _, eager, _ = run_cli(capsys, *args, "--no-compile")  # the default: the hand-written step, in fp32 the same draws
    assert eager == first
    # a character a token, never the padding (a probe: 200 tokens at temperature 100 wrote 193 characters)
    for compiled in ("--compile", "--no-compile"):
        _, hot, _ = run_cli(capsys, "lm", "generate", str(trained), "--prompt", "To be", "--tokens", "300",
                            "--temperature", "100", "--threads", "1", compiled)
        assert len(hot) == len("To be") + 300 + 1, compiled


def test_the_kernels_are_built_before_training_is_timed(corpus, tmp_path, capsys, monkeypatch):
    """A probe: a first run on a machine built the attention and dropout kernels in its first step,
    and recorded 4 tokens a second (15 s of compiling counted as training)."""
    from still.compressive import native
    from still.train.loop import Trainer

    order = []

    def spied(name):
        original = getattr(native, name)

        def asked():
            order.append(name)
            return original()
        return asked

    for name in ("attention_fp32_library", "dropout_library"):
        monkeypatch.setattr(native, name, spied(name))
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: (order.append("fit"), fit(self, *a, **k))[1])
    assert run_cli(capsys, *train_args(corpus, tmp_path / "run", "--dropout", "0.1", "--steps", "4"))[0] == 0
    assert order[:3] == ["attention_fp32_library", "dropout_library", "fit"]


def test_generate_never_draws_a_documents_start(tmp_path, capsys):
    """A probe: a corpus without a newline generated 17 in 200 tokens: the document-start token, never a
    training target, drawn (and read on without a reset) and written as a newline."""
    corpus = tmp_path / "a.txt"
    corpus.write_text("ab" * 1500)
    assert run_cli(capsys, *train_args(corpus, tmp_path / "run", "--steps", "1", "--eval-every", "1"))[0] == 0
    for compiled in ("--compile", "--no-compile"):
        code, text, _ = run_cli(capsys, "lm", "generate", str(tmp_path / "run"), "--tokens", "300", "--temperature",
                                "100", "--threads", "1", compiled)
        assert code == 0 and len(text) == 301 and set(text[:-1]) == {"a", "b"}, (compiled, text)


@pytest.mark.parametrize("compression", ["conv", "most_used"])
def test_generation_state_stays_bounded(compression, monkeypatch):
    """The cost of a new token does not grow: memories stay within mem_len + c - 1 and c_mem_len
    (the ring-buffer decoder, and the model's forward that most_used falls back to)."""
    from still.compressive import CompressiveConfig, CompressiveTransformer, decode
    from still.compressive.generate import generate

    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=10, d_model=16, n_layers=1, n_heads=2, d_ff=16,
                                                     mem_len=8, c_mem_len=4, compression_rate=4,
                                                     compression=compression))
    sizes, shapes = [], set()
    original_forward, original_run = model.forward, decode.Decoder._run

    def spy(tokens, state=None, **kw):
        out = original_forward(tokens, state, **kw)
        sizes.append((out.state.memory_len, out.state.compressed_len))
        return out

    def spy_run(self, *args):  # every step, with or without the draw
        out = original_run(self, *args)
        sizes.append((self.m, self.n))
        shapes.add((self.keys.shape, self.values.shape, self.inputs.shape))
        return out

    model.forward = spy
    monkeypatch.setattr(decode.Decoder, "_run", spy_run)
    list(generate(model, torch.ones(1, 5, dtype=torch.long), 60, segment_len=4))
    assert len(sizes) >= 59 and max(m for m, _ in sizes) <= 8 + 4 - 1 and max(c for _, c in sizes) == 4
    assert len(shapes) == (1 if compression == "conv" else 0)  # the decoder's buffers never change shape


def test_bad_inputs(corpus, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("tiny")
    assert_user_error(capsys, *train_args(tmp_path / "short.txt", tmp_path / "a"), contains="too short to split")
    (tmp_path / "bad.txt").write_bytes(b"x" * 500 + b"\xfe" + b"y" * 500)
    assert_user_error(capsys, *train_args(tmp_path / "bad.txt", tmp_path / "b"),
                      contains="is not UTF-8: byte 0xfe at offset 500")
    assert_user_error(capsys, *train_args(corpus, tmp_path / "c", "--mem-len", "10"),
                      contains="mem_len (10) must be a multiple of compression_rate (4)")
    assert_user_error(capsys, *train_args(corpus, tmp_path / "d", "--compression", "zip"),
                      contains="'zip' is not one of")
    assert_user_error(capsys, *train_args(corpus, tmp_path / "d", "--lr", "inf"),
                      contains="lr must be a finite number > 0, got inf")
    assert_user_error(capsys, "lm", "eval", str(tmp_path / "nothing"), contains="nothing does not exist")
    (tmp_path / "empty").mkdir()
    assert_user_error(capsys, "lm", "eval", str(tmp_path / "empty"), contains="not a language-model run directory")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_another_recipes_run_directory_is_refused_and_left_as_it_was(corpus, tmp_path, capsys):
    """A recipe run into another recipe's directory would replace its config.json and results."""
    from still.recipes.cifar10 import PRESETS as CIFAR_PRESETS, run_cifar10
    from still.recipes.mnist import PRESETS, run_mnist

    distill = tmp_path / "distill"
    distill.mkdir()
    (distill / "config.json").write_text(run_config("distill mnist"))
    (distill / "results.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in distill.iterdir()}
    for args in (train_args(corpus, distill), ["lm", "eval", str(distill)], ["lm", "generate", str(distill)],
                 ["lm", "compare", str(distill), "--out", str(tmp_path / "cmp")]):
        assert_user_error(capsys, *args, contains="holds a distill mnist run, not a language-model run")
    assert {p.name: p.read_bytes() for p in distill.iterdir()} == before
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(run_config("language-model"))
    with pytest.raises(StillError, match="holds a language-model run, not a distill mnist run"):
        run_mnist(PRESETS["quick"], lm, cache=tmp_path / "no-cache")
    with pytest.raises(StillError, match="holds a language-model run, not a distill cifar10 run"):
        run_cifar10(CIFAR_PRESETS["tiny"], tmp_path / "no-data", lm)
    assert sorted(p.name for p in lm.iterdir()) == ["config.json"]
    cifar = tmp_path / "cifar"  # its keys mostly MNIST's too (alpha, teacher, student, ...)
    cifar.mkdir()
    (cifar / "config.json").write_text(run_config("distill cifar10"))
    with pytest.raises(StillError, match="holds a distill cifar10 run, not a distill mnist run"):
        run_mnist(PRESETS["quick"], cifar, cache=tmp_path / "no-cache")


def test_a_folder_of_the_users_is_not_written_over_with_stills_names(corpus, tmp_path, capsys):
    """A probe: a folder that held no run but a user's config.json and results.md took a run (with
    or without --overwrite), which wrote over both. Refused, naming them; a folder of other files
    takes a run as before."""
    from still.recipes.cifar10 import PRESETS as CIFAR_PRESETS, run_cifar10
    from still.recipes.mnist import PRESETS, run_mnist

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": 1}')
    (mine / "results.md").write_text("my table")
    (mine / "notes.txt").write_text("notes")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    for overwrite in (False, True):
        assert_user_error(capsys, *train_args(corpus, mine, *["--overwrite"][:overwrite]),
                          contains=f"{mine} holds no run of still's, but config.json, results.md, which a run there "
                                   "writes (or --overwrite deletes)")
        with pytest.raises(StillError, match="holds no run of still's, but config.json, results.md"):
            run_mnist(PRESETS["quick"], mine, cache=tmp_path / "no-cache", overwrite=overwrite)
        with pytest.raises(StillError, match="holds no run of still's, but config.json, results.md"):
            run_cifar10(CIFAR_PRESETS["tiny"], tmp_path / "no-data", mine, overwrite=overwrite)
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    (mine / "config.json").unlink()
    (mine / "results.md").unlink()
    (mine / ".notes.txt.123-abc.tmp").write_text("")  # (a temporary's name of still's: no user's file)
    code, _, err = run_cli(capsys, *train_args(corpus, mine, "--steps", "2", "--eval-every", "2"))
    assert code == 0 and (mine / "notes.txt").read_text() == "notes", err


def test_a_users_config_json_of_a_few_settings_is_no_run_of_stills(corpus, tmp_path, capsys):
    """A probe: a config.json whose keys were all some config's fields (`{}`, `{"batch_size": 64,
    "seed": 1}`) was taken for a run of every kind, and `lm train`, `distill mnist` and `distill
    cifar10` wrote over it and results.md (exit 0). A run's config.json holds every setting that
    still ever wrote."""
    from still.recipes.cifar10 import PRESETS as CIFAR_PRESETS, run_cifar10
    from still.recipes.common import run_kind
    from still.recipes.mnist import PRESETS, run_mnist

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my table")
    for config in ("{}", '{"batch_size": 64, "seed": 1}'):
        (mine / "config.json").write_text(config)
        before = {p.name: p.read_bytes() for p in mine.iterdir()}
        assert run_kind(mine) is None
        assert_user_error(capsys, *train_args(corpus, mine, "--overwrite"),
                          contains=f"{mine} holds no run of still's, but config.json, results.md")
        with pytest.raises(StillError, match="holds no run of still's, but config.json, results.md"):
            run_mnist(PRESETS["quick"], mine, cache=tmp_path / "no-cache", overwrite=True)
        with pytest.raises(StillError, match="holds no run of still's, but config.json, results.md"):
            run_cifar10(CIFAR_PRESETS["tiny"], tmp_path / "no-data", mine, overwrite=True)
        assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    older = json.loads(run_config("language-model"))  # (a run of an older still: the settings it had then)
    del older["eval_fill_rows"], older["precision"]
    (mine / "config.json").write_text(json.dumps(older))
    assert run_kind(mine) == "language-model"


def test_a_users_own_stage_json_is_not_stills(corpus, tmp_path, capsys):
    """A probe: any stage.json made a folder a run of still's: a user's own ({"env": "prod"}) was
    refused as a run of other settings, suggesting --overwrite, which deleted it and results.md."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "stage.json").write_text('{"env": "prod"}')
    (mine / "results.md").write_text("my table")
    for extra in ((), ("--overwrite",)):
        assert_user_error(capsys, *train_args(corpus, mine, *extra),
                          contains=f"{mine} holds no run of still's, but results.md, stage.json")
    assert {p.name: p.read_text() for p in mine.iterdir()} == {"stage.json": '{"env": "prod"}',
                                                               "results.md": "my table"}


def test_a_folder_of_runs_is_no_run_of_stills(trained, corpus, tmp_path, capsys):
    """A probe: a folder whose subfolders are language-model runs (each with its stage.json) counted
    as a distillation's run, and as a language model's, so the user's results.md and config.json
    beside them were written over. A subfolder counts only as a distillation's stage of its name."""
    from still.recipes.mnist import PRESETS, run_mnist

    runs = tmp_path / "runs"
    (runs / "first").mkdir(parents=True)
    shutil.copy(trained / "stage.json", runs / "first" / "stage.json")
    (runs / "config.json").write_text('{"mine": 1}')
    (runs / "results.md").write_text("my table")
    before = {p.name: p.read_bytes() for p in runs.iterdir() if p.is_file()}
    for overwrite in (False, True):
        assert_user_error(capsys, *train_args(corpus, runs, *["--overwrite"][:overwrite]),
                          contains=f"{runs} holds no run of still's, but config.json, results.md")
        with pytest.raises(StillError, match="holds no run of still's, but config.json, results.md"):
            run_mnist(PRESETS["quick"], runs, cache=tmp_path / "no-cache", overwrite=overwrite)
    assert {p.name: p.read_bytes() for p in runs.iterdir() if p.is_file()} == before


def test_an_empty_checkpoints_folder_made_for_a_run_is_taken(corpus, tmp_path, capsys):
    """A probe: an empty `checkpoints` folder made for the run (or a link to one) was refused as a
    user's file of a name still writes; it holds nothing to lose."""
    (tmp_path / "disk").mkdir()
    for name, make in (("made", lambda path: path.mkdir()),
                       ("linked", lambda path: path.symlink_to(tmp_path / "disk"))):
        out = tmp_path / name
        out.mkdir()
        make(out / "checkpoints")
        code, _, err = run_cli(capsys, *train_args(corpus, out, "--steps", "2", "--eval-every", "2"))
        assert code == 0 and list_checkpoints(out / "checkpoints"), err
    assert (tmp_path / "linked" / "checkpoints").is_symlink() and list_checkpoints(tmp_path / "disk")


def distillation_with_a_teacher(tmp_path):
    """A distillation's run folder (as still writes its config) and its teacher stage, one checkpoint in it."""
    run = tmp_path / "distill"
    teacher = run / "teacher"
    (teacher / "checkpoints" / "ckpt-00000004").mkdir(parents=True)
    (run / "config.json").write_text(run_config("distill mnist"))
    (teacher / "stage.json").write_text(json.dumps({"epochs": 1, "jitter": 0, "model": {}, "optim": {}}))
    (teacher / "checkpoints" / "ckpt-00000004" / "model.safetensors").write_bytes(b"weights")
    return run, teacher


def test_a_stage_of_another_run_is_refused_even_with_overwrite(corpus, tmp_path, capsys):
    """`--out` given a distillation's teacher stage: the stage's settings are not a language model's,
    and `--overwrite` would have deleted the stage to train a language model in its place."""
    run, teacher = distillation_with_a_teacher(tmp_path)
    before = sorted((p.relative_to(run), p.read_bytes() if p.is_file() else None) for p in run.rglob("*"))
    for extra in ((), ("--overwrite",)):
        assert_user_error(capsys, *train_args(corpus, teacher, *extra),
                          contains=f"{teacher} is the teacher stage of the distill mnist run in {run}")
    assert sorted((p.relative_to(run), p.read_bytes() if p.is_file() else None) for p in run.rglob("*")) == before


def test_a_stage_of_another_run_is_refused_wherever_the_path_to_it_comes_from(corpus, tmp_path, capsys,
                                                                            monkeypatch):
    """A probe: the stage was judged by the path as typed, so `--out .` in the teacher's folder,
    `teacher/checkpoints/..` and a symbolic link to it (or into it) were taken, and `--overwrite`
    deleted the teacher."""
    from still.recipes.mnist import PRESETS, run_mnist

    run, teacher = distillation_with_a_teacher(tmp_path)
    (tmp_path / "link").symlink_to(teacher)
    (tmp_path / "into").symlink_to(teacher / "checkpoints")
    before = sorted((p.relative_to(run), p.read_bytes() if p.is_file() else None) for p in run.rglob("*"))
    monkeypatch.chdir(teacher)
    for out in (".", teacher / "checkpoints" / "..", tmp_path / "link", tmp_path / "into" / ".."):
        for extra in ((), ("--overwrite",)):
            assert_user_error(capsys, *train_args(corpus, out, *extra),
                              contains=f"{out} is the teacher stage of the distill mnist run in {run}, not a "
                                       "language-model run")
    with pytest.raises(StillError, match="is the teacher stage of the distill mnist run in"):
        run_mnist(PRESETS["quick"], tmp_path / "link", cache=tmp_path / "no-cache")
    assert sorted((p.relative_to(run), p.read_bytes() if p.is_file() else None) for p in run.rglob("*")) == before


def test_a_run_inside_another_runs_checkpoints_is_refused(trained, corpus, tmp_path, capsys):
    # (a probe: accepted, it was deleted whole by the other run's --overwrite, which starts its checkpoints again)
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for out in (run / "checkpoints" / "nested", run / "checkpoints" / "a" / "b"):
        assert_user_error(capsys, *train_args(corpus, out),
                          contains=f"{out} is inside the checkpoints folder of the run in {run}, which is for its "
                                   "checkpoints alone")
        assert not out.exists()
    assert_user_error(capsys, "distill", "mnist", "--out", str(run / "checkpoints" / "m"),
                      contains="is inside the checkpoints folder of the run in")
    stage = tmp_path / "distill" / "teacher"  # (a stage's: named as one, not as a run)
    (stage / "checkpoints").mkdir(parents=True)
    (stage / "stage.json").write_text(json.dumps({"epochs": 1, "model": {}, "optim": {}}))
    (stage.parent / "config.json").write_text(run_config("distill mnist"))
    assert_user_error(capsys, *train_args(corpus, stage / "checkpoints" / "mine"),
                      contains=f"is inside the checkpoints folder of the teacher stage of the run in {stage.parent}, "
                               "which is for its checkpoints alone")
    # (a review probe: the checkpoints folder itself, a way there through a symbolic link, and the other order)
    assert_user_error(capsys, *train_args(corpus, run / "checkpoints"),
                      contains=f"{run / 'checkpoints'} is the checkpoints folder of the run in {run}")
    (tmp_path / "link").symlink_to(run / "checkpoints")
    assert_user_error(capsys, *train_args(corpus, tmp_path / "link" / "b"),
                      contains=f"is inside the checkpoints folder of the run in {run}")
    later = tmp_path / "later"
    shutil.copytree(trained, later / "checkpoints" / "b")
    assert_user_error(capsys, *train_args(corpus, later),
                      contains=f"{later / 'checkpoints'} holds a run (b), where this run's checkpoints alone go")
    from still.recipes.common import check_run_kind

    check_run_kind(run / "checkpoints" / ".." / ".." / "beside", "language-model")  # (beside the run: taken)
    (tmp_path / "project" / "checkpoints").mkdir(parents=True)
    (tmp_path / "project" / "config.json").write_text('{"model_type": "bert"}')  # (not a run of still's)
    check_run_kind(tmp_path / "project" / "checkpoints" / "run", "language-model")


def test_overwrite_deletes_what_still_wrote_in_a_checkpoints_folder_and_only_that(trained, corpus, tmp_path, capsys):
    """A probe: `--overwrite` deleted the checkpoints folder whole, with a run deeper in it than the
    refusal looks (`checkpoints/a/run`) and a user's own model.pt."""
    from still.recipes.common import _start_again

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    shutil.copytree(trained, out / "checkpoints" / "a" / "run")
    (out / "checkpoints" / "model.pt").write_bytes(b"mine")
    (out / "checkpoints" / "ckpt-00000002.damaged").mkdir()
    (out / "checkpoints" / ".ckpt-00000009.tmp-1").mkdir()
    code, _, err = run_cli(capsys, *train_args(corpus, out, "--seed", "1", "--overwrite"))
    assert code == 0, err
    assert f"--overwrite: left what still did not write in {out}: checkpoints/a, checkpoints/model.pt" in err
    assert model_hash(out / "checkpoints" / "a" / "run") == model_hash(trained)
    assert (out / "checkpoints" / "model.pt").read_bytes() == b"mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["a", "ckpt-00000004", "ckpt-00000008",
                                                                      "model.pt"]
    stage = tmp_path / "teacher"  # (a distillation's stage: the same; a folder of still's checkpoints alone goes)
    (stage / "checkpoints" / "ckpt-00000004").mkdir(parents=True)
    (stage / "stage.json").write_text("{}")
    _start_again(stage)
    assert list(stage.iterdir()) == []


def test_overwrite_keeps_a_checkpoints_link_and_empties_it(trained, corpus, tmp_path, capsys):
    """A probe: --overwrite removed a `checkpoints` symbolic link (to a bigger disk), unsaid, and
    the new run's checkpoints went to the run folder's disk."""
    out, disk = tmp_path / "run", tmp_path / "disk"
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(trained / "checkpoints", disk / "checkpoints")
    (disk / "checkpoints" / "model.pt").write_bytes(b"mine")
    (out / "checkpoints").symlink_to(disk / "checkpoints")
    code, _, err = run_cli(capsys, *train_args(corpus, out, "--seed", "1", "--overwrite"))
    assert code == 0, err
    assert f"--overwrite: kept the symbolic link {out / 'checkpoints'} (to {disk / 'checkpoints'})" in err
    assert (out / "checkpoints").is_symlink()
    assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["ckpt-00000004", "ckpt-00000008", "model.pt"]
    assert model_hash(out) != model_hash(trained)


def test_a_run_never_resumes_on_other_text(corpus, tmp_path, capsys):
    """The run records its corpus's digest (`EncodedCorpus.digest`): text changed since (here the same
    characters in another order, which the vocabulary cannot tell) is refused; the same text, its
    files touched and encoded again, is the same run; a run made before the digest was recorded
    takes the corpus as it is."""
    own = tmp_path / "corpus"
    shutil.copytree(corpus, own)
    out = tmp_path / "run"
    args = train_args(own, out, "--steps", "4", "--eval-every", "4")
    assert run_cli(capsys, *args)[0] == 0
    recorded = json.loads((out / "stage.json").read_text())["corpus_sha256"]
    assert len(recorded) == 64
    trained = model_hash(out)
    splits = json.loads((out / "stage.json").read_text())["split_sha256"]
    doc = own / "doc5.txt"  # (the test document)
    text = doc.read_text()
    doc.write_text(" ".join(reversed(text.split(" "))))
    assert_user_error(capsys, *args, contains=f"{out} holds a run with different settings (corpus_sha256, "
                                              "split_sha256)")
    # `lm eval` of a changed split says so, on stderr, in its table and its record, which `lm compare`
    # reads; an unchanged split's evaluation says nothing of it
    code, printed, err = run_cli(capsys, "lm", "eval", str(out), "--split", "test", "--threads", "1")
    assert code == 0 and f"the test split of {own} has changed since {out} was trained" in err
    assert "the test text has changed since training" in printed
    meta = json.loads((out / "eval-test.json").read_text())["meta"]
    assert meta["changed_since_training"] is True and meta["split_sha256"] != splits["test"]
    code, printed, err = run_cli(capsys, "lm", "eval", str(out), "--split", "valid", "--threads", "1")
    assert code == 0 and "changed" not in err + printed
    meta = json.loads((out / "eval-valid.json").read_text())["meta"]
    assert meta["changed_since_training"] is False and meta["split_sha256"] == splits["valid"]
    code, printed, _ = run_cli(capsys, "lm", "compare", str(out), "--out", str(tmp_path / "compare"))
    assert code == 0 and "come from `still lm eval` of the test text as it was changed" in printed
    doc.write_text(text + "\u00a7")  # a character the run never saw: said to be a change (a probe)
    assert_user_error(capsys, "lm", "eval", str(out), "--split", "test", "--threads", "1",
                      contains=f"the test split of {own} holds a character the run's vocabulary lacks, so it has "
                               f"changed since {out} was trained")
    doc.write_text(text)  # (a new modification time: encoded again)
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and "encoded" in err and "loaded the finished run" in err and model_hash(out) == trained
    for gone in (["split_sha256"], ["corpus_sha256", "split_sha256"]):  # runs made before they were recorded
        stage = json.loads((out / "stage.json").read_text())
        for key in gone:
            del stage[key]
        (out / "stage.json").write_text(json.dumps(stage))
        assert run_cli(capsys, *args)[0] == 0
        stage = json.loads((out / "stage.json").read_text())
        assert stage["corpus_sha256"] == recorded and stage["split_sha256"] == splits


def test_an_edited_vocabulary_is_refused(trained, tmp_path, capsys):
    """vocab.json maps the model's ids to characters: one edited since training (two characters
    swapped) would decode generated text as other characters; refused where the run recorded it."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    vocab = json.loads((out / "vocab.json").read_text())
    assert json.loads((out / "stage.json").read_text())["vocab_sha256"]
    (out / "vocab.json").write_text(json.dumps(vocab, indent=1))  # the same symbols, written otherwise: the run's
    assert run_cli(capsys, "lm", "generate", str(out), "--tokens", "5", "--threads", "1")[0] == 0
    symbols = vocab["symbols"]
    symbols[-1], symbols[-2] = symbols[-2], symbols[-1]
    (out / "vocab.json").write_text(json.dumps(vocab))
    for args in (["lm", "generate", str(out), "--tokens", "5", "--threads", "1"],
                 ["lm", "eval", str(out), "--threads", "1"]):
        assert_user_error(capsys, *args, contains=f"{out}/vocab.json has changed since the run was trained")
    stage = json.loads((out / "stage.json").read_text())
    del stage["vocab_sha256"]  # a run made before it was recorded: read as it is
    (out / "stage.json").write_text(json.dumps(stage))
    assert run_cli(capsys, "lm", "generate", str(out), "--tokens", "5", "--threads", "1")[0] == 0


def test_without_its_stage_json_a_run_is_held_to_its_checkpoints_settings(trained, corpus, tmp_path, capsys):
    """stage.json deleted (or left out of a copy): the settings the newest checkpoint carries stand
    in for it, so that other settings do not take over the run's checkpoints and record themselves."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "stage.json").unlink()
    assert_user_error(capsys, *train_args(corpus, out, "--lr", "0.01"),
                      contains="different settings (optim, as its checkpoint ckpt-00000008 records them: "
                               "its stage.json is missing)")
    assert not (out / "stage.json").exists()
    code, _, err = run_cli(capsys, *train_args(corpus, out))
    assert code == 0 and "loaded the finished run" in err
    assert (out / "stage.json").read_text() == (trained / "stage.json").read_text()


def test_a_damaged_stage_json_is_refused_unless_started_again(trained, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    for damaged in ('{"batch', "[1, 2]"):
        (out / "stage.json").write_text(damaged)
        assert_user_error(capsys, *train_args(corpus, out), contains=f"cannot read {out / 'stage.json'}")
    assert model_hash(out) == model_hash(trained)
    code, _, err = run_cli(capsys, *train_args(corpus, out, "--overwrite"))
    assert code == 0 and "loaded the finished run" not in err  # trained again, from the start
    assert json.loads((out / "stage.json").read_text()) == json.loads((trained / "stage.json").read_text())
    assert model_hash(out) == model_hash(trained)  # (seeded: the same run)


def test_a_relative_corpus_is_stored_absolute(corpus, tmp_path, capsys, monkeypatch):
    """`lm eval` reads the corpus again, maybe from another directory; a run made before the path
    was stored absolute still resumes from the directory it was made in."""
    monkeypatch.chdir(corpus.parent)
    out = tmp_path / "run"
    args = train_args(corpus.name, out, "--steps", "4", "--eval-every", "4")
    assert run_cli(capsys, *args)[0] == 0
    assert json.loads((out / "config.json").read_text())["corpus"] == str(corpus)
    for name in ("stage.json", "config.json"):  # as such a run was written
        data = json.loads((out / name).read_text())
        (out / name).write_text(json.dumps({**data, "corpus": corpus.name}))
    assert run_cli(capsys, *args)[0] == 0  # resumed (finished): not refused for changed settings
    assert json.loads((out / "stage.json").read_text())["corpus"] == str(corpus)
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, "lm", "eval", str(out), "--split", "valid", "--threads", "1")[0] == 0


def test_the_runs_corpus_through_a_link_is_the_runs_corpus(trained, corpus, tmp_path, capsys):
    """A probe: the same file through a symbolic link was "different settings (corpus)", and the
    refusal offered --overwrite, which would have deleted the run."""
    out, link = tmp_path / "run", tmp_path / "link"
    shutil.copytree(trained, out)
    link.symlink_to(corpus)
    code, _, err = run_cli(capsys, *train_args(link, out))
    assert code == 0 and "loaded the finished run" in err and f"is {out}'s corpus {corpus}" in err, err
    assert json.loads((out / "stage.json").read_text())["corpus"] == str(corpus)
    other = tmp_path / "other"  # other text at another path: other settings (a copy of its text is the run's:
    shutil.copytree(corpus, other)  # `test_the_runs_corpus_moved_elsewhere_is_the_runs_corpus`)
    (other / "doc5.txt").write_text("other text")
    assert_user_error(capsys, *train_args(other, out), contains="holds a run with different settings (corpus")


def moved_run(corpus, tmp_path, capsys, kind=""):
    """A run of 4 steps whose corpus (a folder, or with `kind` pg19:, PG-19's layout) was moved
    after training, and a copy of it whose test text differs: (run, first path, moved, other)."""
    own = tmp_path / "corpus"
    if kind:
        for split, docs in (("train", range(4)), ("validation", [4]), ("test", [5])):
            (own / split).mkdir(parents=True)
            for i in docs:
                shutil.copy(corpus / f"doc{i}.txt", own / split)
    else:
        shutil.copytree(corpus, own)
    out, moved, other = tmp_path / "run", tmp_path / "moved", tmp_path / "other"
    assert run_cli(capsys, *train_args(f"{kind}{own}", out, "--steps", "4", "--eval-every", "4"))[0] == 0
    own.rename(moved)
    shutil.copytree(moved, other)
    test_doc = next(other.rglob("doc5.txt"))
    test_doc.write_text(" ".join(reversed(test_doc.read_text().split(" "))))  # the same characters, other text
    return out, own, moved, other


@pytest.mark.parametrize("kind", ["", "pg19:"])
def test_the_runs_corpus_moved_elsewhere_is_the_runs_corpus(kind, corpus, tmp_path, capsys):
    """A probe: a project folder moved, its run's corpus with it, the run could never be trained
    again ("different settings (corpus)"), though its text was the same. The text at another path
    with the digests the run recorded is the run's, recorded where it lies now (config.json and
    stage.json: later commands find it); other text stays refused, naming the run's corpus."""
    out, own, moved, other = moved_run(corpus, tmp_path, capsys, kind)
    trained = model_hash(out)
    args = train_args(f"{kind}{moved}", out, "--steps", "4", "--eval-every", "4")
    assert_user_error(capsys, *train_args(f"{kind}{other}", out, "--steps", "4", "--eval-every", "4"),
                      contains=f"holds a run with different settings (corpus, corpus_sha256, split_sha256); choose "
                               f"another --out, or pass --overwrite to start it again (its corpus: {kind}{own};")
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and "loaded the finished run" in err and f"has the text of {out}'s corpus {kind}{own}" in err, err
    assert model_hash(out) == trained
    for name in ("config.json", "stage.json"):
        assert json.loads((out / name).read_text())["corpus"] == f"{kind}{moved}"
    # its checkpoints, saved with the first path, are the run's all the same
    for checkpoint in ([], ["--checkpoint", str(out / "checkpoints" / "ckpt-00000004")]):
        assert run_cli(capsys, "lm", "eval", str(out), "--split", "valid", "--threads", "1", *checkpoint)[0] == 0
    assert run_cli(capsys, *args)[0] == 0  # and the run goes on from there as from its first path


def test_eval_reads_the_runs_moved_corpus_where_it_is_now(corpus, tmp_path, capsys):
    """A probe: `lm eval` of a run whose corpus was moved said it "does not exist", and no more.
    --corpus names where it lies now, held to the digest the run recorded of the split."""
    out, own, moved, other = moved_run(corpus, tmp_path, capsys)
    evaluate = ["lm", "eval", str(out), "--split", "test", "--threads", "1"]
    assert_user_error(capsys, *evaluate, contains=f"{out}'s corpus {own} does not exist: give it where it lies now "
                                                  "with --corpus")
    assert_user_error(capsys, *evaluate, "--corpus", str(other),
                      contains=f"--corpus {other} is not {out}'s corpus {own}: its test split's SHA-256 is")
    code, _, err = run_cli(capsys, *evaluate, "--corpus", str(moved))
    assert code == 0, err
    meta = json.loads((out / "eval-test.json").read_text())["meta"]
    test_bpc = json.loads((out / "results.json").read_text())["rows"][0]["test_bpc"]
    assert meta["changed_since_training"] is False and meta["bits_per_token"] == pytest.approx(test_bpc, abs=1e-4)
    # a run of an older still (no digests of its text): its own corpus named otherwise (a link) is read as
    # it is (a review: refused for want of digests); other text is refused saying why it cannot be taken
    assert run_cli(capsys, *train_args(moved, out, "--steps", "4", "--eval-every", "4"))[0] == 0  # (recorded there)
    stage = json.loads((out / "stage.json").read_text())
    (out / "stage.json").write_text(json.dumps({k: v for k, v in stage.items() if not k.endswith("_sha256")}))
    (tmp_path / "link").symlink_to(moved)
    code, _, err = run_cli(capsys, *evaluate, "--corpus", str(tmp_path / "link"))
    assert code == 0, err
    assert_user_error(capsys, *train_args(other, out, "--steps", "4", "--eval-every", "4"),
                      contains=f"(its corpus: {moved}; it recorded no digest of its text, an older still's run")


def test_generation_piped_into_head_ends_quietly(trained):
    """`still lm generate ... | head -c 20`: the reader leaves early; the command exits 0, silently."""
    import subprocess
    import sys

    command = (f"set -o pipefail; {sys.executable} -m still lm generate {trained} --tokens 3000 --threads 1 "
               "--no-compile | head -c 20")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and len(done.stdout) == 20 and "Error" not in done.stderr, done.stderr
    # with --save-state, the state of text the reader did not take is not written, and it says so (a
    # probe: it exited 0, the file missing unsaid)
    state = trained.parent / "piped.state"
    done = subprocess.run(["bash", "-c", command.replace("--no-compile", f"--no-compile --save-state {state}")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 141 and len(done.stdout) == 20 and not state.exists(), done.stderr
    assert done.stderr.strip().endswith(f"{state} was not written (its state would be of text the reader did not "
                                        "take)"), done.stderr


def test_generate_bad_prompt(trained, capsys):
    assert_user_error(capsys, "lm", "generate", str(trained), "--prompt", "Zebra#", contains="is not in the vocabulary")
    assert_user_error(capsys, "lm", "generate", str(trained), "--temperature", "0",
                      contains="0.0 is not in the range x>0")
    for value in ("nan", "inf"):
        assert_user_error(capsys, "lm", "generate", str(trained), "--temperature", value,
                          contains=f"temperature must be a finite number > 0, got {value}")


def test_a_state_saved_through_a_link_is_written_where_it_leads(trained, tmp_path, capsys):
    """A probe: `--save-state` given a symbolic link (a state kept on another disk) replaced the link
    by a file and left the state it led to as it was."""
    (tmp_path / "elsewhere").mkdir()
    target, link = tmp_path / "elsewhere" / "state.safetensors", tmp_path / "state.safetensors"
    link.symlink_to(target)
    args = ["lm", "generate", str(trained), "--tokens", "5", "--threads", "1", "--save-state", str(link)]
    for _ in range(2):  # made through the link, then written over through it
        assert run_cli(capsys, *args)[0] == 0
        assert link.is_symlink() and target.is_file()


def test_generation_saved_and_continued_is_one_generation(trained, tmp_path, capsys, monkeypatch):
    """`--save-state FILE` writes the memories of the text but its last token, that token and the
    random numbers' state; `--state FILE` continues the text from them (the same file read and
    written again). Sampled, the texts of 20, then 15, then 10 tokens are the text of 45 in one call
    (greedy too); with a --seed, a continuation draws that seed's numbers instead."""
    from safetensors import safe_open

    from still.compressive.generate import eval_mode, generate
    from still.config import to_dict
    from still.data.text import Vocab
    from still.recipes.lm import load_run

    args = ["lm", "generate", str(trained), "--temperature", "0.8", "--threads", "1"]
    saved = tmp_path / "state.safetensors"
    code, whole, _ = run_cli(capsys, *args, "--prompt", "To be", "--tokens", "45")
    assert code == 0 and whole.startswith("To be")
    code, first, _ = run_cli(capsys, *args, "--prompt", "To be", "--tokens", "20", "--save-state", str(saved))
    assert code == 0 and first.startswith("To be") and saved.is_file()
    # the file: the memories of <doc> "To be" (in segments of 16) and of the 19 tokens after it (one at a
    # time, as generated), and the 20th, still to read
    config, vocab, model, _ = load_run(trained)
    prompt = torch.cat([torch.tensor([Vocab.DOC]), vocab.encode("To be")])[None]  # (1, 6)
    tokens = torch.stack(list(generate(model, prompt, 20, temperature=0.8, segment_len=16,
                                       exclude=(Vocab.PAD, Vocab.DOC),
                                       generator=torch.Generator().manual_seed(0))), 1)  # (1, 20)
    assert "To be" + vocab.decode(tokens[0]) == first.rstrip("\n")
    with eval_mode(model), torch.no_grad():
        state = model(prompt).state
        for i in range(19):
            state = model(tokens[:, i : i + 1], state).state
    with safe_open(str(saved), "pt") as f:
        assert f.get_tensor("pending").tolist() == [int(tokens[0, -1])]
        assert json.loads(f.metadata()["model"]) == to_dict(config.model)
        for i in range(config.model.n_layers):
            torch.testing.assert_close(f.get_tensor(f"memory/{i}"), state.memory[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(f.get_tensor(f"compressed/{i}"), state.compressed[i], rtol=1e-5, atol=1e-5)
    code, second, _ = run_cli(capsys, *args, "--tokens", "15", "--state", str(saved), "--save-state", str(saved))
    assert code == 0
    code, third, _ = run_cli(capsys, *args, "--tokens", "10", "--state", str(saved))
    assert code == 0
    assert first.rstrip("\n") + second.rstrip("\n") + third.rstrip("\n") == whole.rstrip("\n")
    assert len(set(whole[5:])) > 3  # (sampled text, not one repeated character)
    assert [p.name for p in tmp_path.iterdir()] == [saved.name]  # (no temporary file left)
    greedy = [*args, "--top-k", "1"]
    whole = run_cli(capsys, *greedy, "--prompt", "To be", "--tokens", "30")[1]
    first = run_cli(capsys, *greedy, "--prompt", "To be", "--tokens", "12", "--save-state", str(saved))[1]
    assert first.rstrip("\n") + run_cli(capsys, *greedy, "--tokens", "18", "--state", str(saved))[1] == whole
    # a seed given: that seed's numbers, not the saved ones (the continuation is another text)
    first = run_cli(capsys, *args, "--prompt", "To be", "--tokens", "20", "--save-state", str(saved))[1]
    seeded = [run_cli(capsys, *args, "--tokens", "25", "--state", str(saved), *seed)[1] for seed in
              ([], ["--seed", "0"], ["--seed", "0"])]
    assert seeded[1] == seeded[2] != seeded[0]
    # a prompt continues the saved text: the pending token, then the prompt's, no <doc> before them
    import still.recipes.lm as lm

    seen = []
    monkeypatch.setattr(lm, "generate", lambda model, ids, count, **options: seen.append((ids, options["state"]))
                        or generate(model, ids, count, **options))
    with safe_open(str(saved), "pt") as f:
        pending, memory = f.get_tensor("pending"), f.get_tensor("memory/1")
    code, text, _ = run_cli(capsys, *args, "--tokens", "3", "--state", str(saved), "--prompt", "or")
    assert code == 0 and text.startswith("or")
    ids, state = seen[0]
    assert ids.tolist() == [pending.tolist() + vocab.encode("or").tolist()] and torch.equal(state.memory[1], memory)


def test_a_state_file_of_another_model_or_of_nothing_is_refused(trained, tmp_path, capsys):
    """Before anything is generated: a missing file, one that is no state file, one saved by another
    model (another d_model, another vocabulary); each named, with what differs."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    args = ["lm", "generate", str(trained), "--tokens", "3", "--prompt", "To be", "--threads", "1"]
    saved = tmp_path / "state.safetensors"
    assert run_cli(capsys, *args, "--save-state", str(saved))[0] == 0
    tensors = load_file(str(saved))
    with safe_open(str(saved), "pt") as f:
        metadata = f.metadata()

    def refused(path, contains):
        code, out, err = run_cli(capsys, *args, "--state", str(path))
        assert code == 2 and out == "" and "Traceback" not in err, (code, out, err)  # nothing generated
        assert str(path) in err and contains in err, err

    refused(tmp_path / "missing.safetensors", "does not exist")
    (tmp_path / "text.safetensors").write_text("not tensors")
    refused(tmp_path / "text.safetensors", "is not a state file of `still lm generate --save-state`")
    newest = sorted((trained / "checkpoints").glob("ckpt-*"))[-1]
    refused(newest / "model.safetensors", "is not a state file")  # safetensors, but weights
    model = json.loads(metadata["model"])
    save_file(tensors, str(tmp_path / "wider"), metadata=metadata | {"model": json.dumps(model | {"d_model": 64})})
    refused(tmp_path / "wider", "holds the memories of another model (d_model 64 there, 128 here)")
    save_file(tensors, str(tmp_path / "bytes"), metadata=metadata | {"byte_level": "true", "vocab_size": "258"})
    refused(tmp_path / "bytes", f"(vocab_size 258 there, {metadata['vocab_size']} here; byte_level true there, "
                                "false here)")
    save_file(tensors, str(tmp_path / "letters"), metadata=metadata | {"vocabulary": "0" * 64})
    refused(tmp_path / "letters", "(another vocabulary)")
    nan = {name: t.clone() for name, t in tensors.items()}
    nan["memory/0"][0, 0, 0] = float("nan")  # (a probe: blamed on the weights, "diverged")
    save_file(nan, str(tmp_path / "nan"), metadata=metadata)
    refused(tmp_path / "nan", "is damaged: its memories are not all finite numbers")
    flipped = dict(tensors, generator=tensors["generator"].clone())
    flipped["generator"][11] ^= 0x40  # (a probe: PyTorch's "Invalid mt19937 state", a traceback)
    save_file(flipped, str(tmp_path / "flipped"), metadata=metadata)
    refused(tmp_path / "flipped", "is damaged: its generator state cannot be read")
    # the same run's older checkpoint: other weights
    older, newest = sorted((trained / "checkpoints").glob("ckpt-*"))[-2:]
    code, out, err = run_cli(capsys, *args, "--state", str(saved), "--checkpoint", str(older))
    assert code == 2 and out == "" and str(saved) in err, (code, out, err)
    assert f"other weights (step {metadata['step']} there, {int(older.name.split('-')[1])} here)" in err, err
    assert metadata["step"] == str(int(newest.name.split("-")[1]))
    assert_user_error(capsys, *args, "--save-state", str(tmp_path), contains="is a directory")
    err = assert_user_error(capsys, *args, "--save-state", str(tmp_path / "no" / "s.st"), contains="does not exist")
    assert str(tmp_path / "no") in err
    (tmp_path / "a-file").write_text("")  # (a probe: said "does not exist" of a file)
    assert_user_error(capsys, *args, "--save-state", str(tmp_path / "a-file" / "s.st"),
                      contains=f"the state file's folder {tmp_path / 'a-file'} is a file")
    # a file there that is not a state file is not written over (a probe: a checkpoint's weights, a stage.json)
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    for kept in (copy / "stage.json", sorted((copy / "checkpoints").glob("ckpt-*"))[-1] / "model.safetensors"):
        before = kept.read_bytes()
        assert_user_error(capsys, "lm", "generate", str(copy), "--tokens", "3", "--save-state", str(kept),
                          contains="the file is there and is not a state file")
        assert kept.read_bytes() == before
    assert run_cli(capsys, *args, "--save-state", str(saved))[0] == 0  # (a state file: written again)
    (tmp_path / "empty").write_bytes(b"")
    assert run_cli(capsys, *args, "--save-state", str(tmp_path / "empty"))[0] == 0  # (as `mktemp` makes: written)


def test_train_stream_passes_follow_each_other():
    from still.recipes.lm import LMConfig, TrainStream

    docs = [torch.arange(2, 2 + n) for n in (9, 30, 4, 17, 12)]
    stream = TrainStream(docs, LMConfig(batch_size=2, segment_len=4))
    targets = []
    for step in range(60):
        segment = stream.segment(step)
        targets.append(int((segment.targets != -100).sum()))
    assert all(t > 0 for t in targets)  # never a segment with nothing to learn
    # the same step gives the same segment from a fresh stream (resume)
    again = TrainStream(docs, LMConfig(batch_size=2, segment_len=4)).segment(37)
    assert torch.equal(again.inputs, stream.segment(37).inputs)
    # empty documents are left out: a probe's two empty files made steps of no targets (an update spent
    # on nothing, counted as 0 bits in the interval's training bits)
    with_empty = TrainStream(docs[:2] + [torch.arange(2, 2)] * 3 + docs[2:], LMConfig(batch_size=2, segment_len=4))
    for step in range(60):
        assert torch.equal(with_empty.segment(step).targets, stream.segment(step).targets), step


def test_train_stream_gives_every_thread_the_same_segments():
    """The shards of a step ask for its segment from their own threads, across pass boundaries too."""
    import threading

    from still.recipes.lm import LMConfig, TrainStream

    docs = [torch.arange(2, 2 + n) for n in (9, 30, 4, 17, 12)]
    expected = TrainStream(docs, LMConfig(batch_size=2, segment_len=4))
    expected = [expected.segment(step).inputs for step in range(60)]
    for _ in range(5):  # unguarded, a pass boundary went wrong in about two runs of three
        stream, seen, barrier = TrainStream(docs, LMConfig(batch_size=2, segment_len=4)), {}, threading.Barrier(4)

        def shard(index, stream=stream, seen=seen, barrier=barrier):
            for step in range(60):
                barrier.wait()  # the four threads ask for each step at once, as the shards do
                seen[index, step] = stream.segment(step).inputs

        threads = [threading.Thread(target=shard, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(torch.equal(seen[i, step], expected[step]) for i in range(4) for step in range(60))


def test_compare_runs(trained, tmp_path, capsys):
    code, _, _ = run_cli(capsys, "lm", "eval", str(trained), "--split", "test", "--threads", "1")
    assert code == 0
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    code, out, err = run_cli(capsys, "lm", "compare", str(trained), str(copy), "--out", str(tmp_path / "cmp"))
    assert code == 0 and out.count("compressive 16+8/4") == 2 and "eval_step" in out and "come from" not in err
    rows = json.loads((tmp_path / "cmp" / "compare-test.json").read_text())["rows"]
    assert [r["eval_step"] for r in rows] == [8, 8]
    assert (tmp_path / "cmp" / "compare-test-by-position.png").is_file()
    assert (tmp_path / "cmp" / "compare-valid-curves.png").is_file()
    assert_user_error(capsys, "lm", "compare", str(tmp_path), "--out", str(tmp_path / "cmp"),
                      contains="has no results.json")
    assert_user_error(capsys, "lm", "compare", str(trained), str(copy), str(copy / ".." / "copy"), "--out",
                      str(tmp_path / "cmp"), contains=f"{copy / '..' / 'copy'} is given twice (as {copy} too)")
    for inside in (copy, copy / "checkpoints"):
        assert_user_error(capsys, "lm", "compare", str(trained), "--out", str(inside),
                          contains=f"--out {inside}: {copy} holds a language-model run, among whose files")
    from still.recipes.lm import compare_runs

    with pytest.raises(StillError, match=f"{copy} is given twice$"):
        compare_runs([copy, copy], tmp_path / "cmp")

    # found by a probe: results and evaluations that are not as still writes them ended in tracebacks
    results, evaluation = copy / "results.json", copy / "eval-test.json"
    kept = results.read_text(), evaluation.read_text()
    for damaged in ("{}", "[]", '{"rows": []}', '{"rows": [5]}', b'\xff\xfe{}'):  # (not UTF-8: a traceback)
        results.write_bytes(damaged if isinstance(damaged, bytes) else damaged.encode())
        assert_user_error(capsys, "lm", "compare", str(copy), "--out", str(tmp_path / "cmp"),
                          contains=f"cannot read {results}: not as still writes it (")
    # and (later probes) a results file that is not JSON read as missing, and values put in by hand
    # (a bpc of "abc" or NaN, a history's "x") went into the table and the plots unsaid
    row = json.loads(kept[0])
    for damaged in ("{bad", {"test_bpc": "abc"}, {"valid_bpc": math.nan},
                    {"history": [{"step": 4, "valid_bits": "x"}]}):
        if isinstance(damaged, dict):
            changed = json.loads(kept[0])
            if "history" in damaged:
                changed["meta"]["history"] = damaged["history"]
            else:
                changed["rows"][0].update(damaged)
            damaged = json.dumps(changed)
        results.write_text(damaged)
        assert_user_error(capsys, "lm", "compare", str(copy), "--out", str(tmp_path / "cmp"),
                          contains=f"cannot read {results}: not as still writes it (")
    results.write_text(kept[0])
    assert row == json.loads(results.read_text())
    for damaged in (kept[1][: len(kept[1]) // 2], '{"rows": [{"from": 0}]}', '\udcff'):
        evaluation.write_bytes(damaged.encode("utf-8", "surrogateescape"))
        assert_user_error(capsys, "lm", "compare", str(copy), "--out", str(tmp_path / "cmp"),
                          contains=f"cannot read {evaluation}: not as still writes it (")
    evaluation.unlink()
    assert_user_error(capsys, "lm", "compare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "cmp"),
                      contains="nowhere does not exist")
    # an --out through a run folder's `..` lies outside it; a plot the comparison has nothing for (no
    # run has an evaluation) is removed, not left from the last comparison of other runs
    code, _, err = run_cli(capsys, "lm", "compare", str(copy), "--out", str(copy / ".." / "cmp"))
    assert code == 0 and not (tmp_path / "cmp" / "compare-test-by-position.png").exists()
    assert "compare-test-by-position.png (of an earlier comparison) removed" in err
    assert (tmp_path / "cmp" / "compare-valid-curves.png").is_file()


def test_compare_names_runs_apart_and_says_how_their_evaluation_was_made(trained, tmp_path, capsys):
    """Two runs of one folder name made two rows of one name (and `.` an empty one); an evaluation in
    another precision, or of a split cut into pieces (positions counted from each piece), went into
    the by-position columns unsaid (a probe)."""
    first, second = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for copy in (first, second):
        shutil.copytree(trained, copy)
    assert run_cli(capsys, "lm", "eval", str(second), "--precision", "bf16", "--fill-rows", "--batch-size", "4",
                   "--threads", "1")[0] == 0
    code, out, err = run_cli(capsys, "lm", "compare", str(first), str(second), "--out", str(tmp_path / "cmp"))
    rows = json.loads((tmp_path / "cmp" / "compare-test.json").read_text())["rows"]
    assert code == 0 and [r["run"] for r in rows] == [str(first), str(second)]
    said = (f"{second}: the by-position columns come from `still lm eval` in bf16 (the run trained in fp32) and of "
            "the split cut into")
    assert (out + err).count(said) == 1 and f"Note: {said}" in out  # (printed once: a probe's came twice)
    # kept with the table, not said on the screen alone (a probe)
    assert f"Note: {said}" in (tmp_path / "cmp" / "compare-test.md").read_text()
    notes = json.loads((tmp_path / "cmp" / "compare-test.json").read_text())["meta"]["notes"]
    assert any(n.startswith(said) for n in notes)


def test_a_byte_level_run_counts_bytes_and_streams_whole_characters(trained, corpus, tmp_path, capsys, monkeypatch):
    """Byte level: `lm eval` says bits per byte, `lm generate` holds a character's bytes until it is
    whole (each byte alone decoded to U+FFFD), and `lm compare` beside a character run says that
    their numbers do not compare."""
    out = tmp_path / "bytes"
    code, _, err = run_cli(capsys, *train_args(corpus, out, "--byte-level"))
    assert code == 0, err
    code, printed, _ = run_cli(capsys, "lm", "eval", str(out), "--threads", "1")
    assert code == 0 and "bits per byte" in printed and "bytes; checkpoint" in printed
    code, printed, err = run_cli(capsys, "lm", "generate", str(out), "--tokens", "5")  # (the empty prompt: a fuzzer's)
    assert code == 0 and printed.endswith("\n"), err
    import still.recipes.lm as lm

    def generate(model, ids, count, **options):  # the bytes of "é—" (2 + 3), two specials first
        return iter(torch.tensor([b + 2]) for b in "é—".encode())

    monkeypatch.setattr(lm, "generate", generate)
    code, printed, _ = run_cli(capsys, "lm", "generate", str(out), "--prompt", "a", "--tokens", "5")
    assert code == 0 and printed == "aé—\n"
    code, printed, err = run_cli(capsys, "lm", "compare", str(trained), str(out), "--out", str(tmp_path / "cmp"))
    assert code == 0 and "their bits do not compare" in printed and "Bits per token" in printed
    rows = json.loads((tmp_path / "cmp" / "compare-test.json").read_text())["rows"]
    assert [r["unit"] for r in rows] == ["character", "byte"]


def test_named_checkpoint_and_damaged_checkpoint(trained, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    first, newest = sorted((out / "checkpoints").glob("ckpt-*"))
    code, _, _ = run_cli(capsys, "lm", "generate", str(out), "--checkpoint", str(first), "--tokens", "5")
    assert code == 0
    weights = newest / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:200] + bytes([data[200] ^ 1]) + data[201:])
    assert_user_error(capsys, "lm", "eval", str(out), "--checkpoint", str(newest),
                      contains="model.safetensors does not match its SHA-256")
    code, _, err = run_cli(capsys, "lm", "generate", str(out), "--tokens", "5")  # falls back to the older one
    assert code == 0 and "ckpt-00000008 is damaged: model.safetensors does not match" in err
    assert "SHA-256 in the manifest: skipped" in err and (out / "checkpoints" / newest.name).is_dir()  # not set aside


def test_evaluating_another_checkpoint_says_whose_result_it_replaces(trained, tmp_path, capsys):
    # (a probe: `lm eval --checkpoint OLDER` replaced the newest checkpoint's eval-valid.json unsaid)
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    for earlier in out.glob("eval-valid*"):  # (another test's)
        earlier.unlink()
    first, newest = sorted((out / "checkpoints").glob("ckpt-*"))
    steps = [int(path.name.split("-")[1]) for path in (first, newest)]
    said = []
    for checkpoint in (newest, newest, first):
        code, _, err = run_cli(capsys, "lm", "eval", str(out), "--split", "valid", "--checkpoint", str(checkpoint))
        assert code == 0
        said.append(err)
    assert "eval-valid.json, .md and its plot were of" not in said[0] + said[1]
    assert f"eval-valid.json, .md and its plot were of checkpoint step {steps[1]}: now of step {steps[0]}" in said[2]


def test_a_checkpoint_of_another_run_is_refused(trained, corpus, tmp_path, capsys):
    """`lm eval RUN --checkpoint` writes RUN/eval-*.json, which `lm compare` reads beside RUN's own
    results: a checkpoint trained with other settings would be filed under the wrong run. One of the
    run's own earlier checkpoints is fine, and `lm compare` says which step its columns come from."""
    other = tmp_path / "other"
    assert run_cli(capsys, *train_args(corpus, other, "--steps", "4", "--eval-every", "4"))[0] == 0
    theirs = sorted((other / "checkpoints").glob("ckpt-*"))[-1]
    assert_user_error(capsys, "lm", "eval", str(trained), "--checkpoint", str(theirs),
                      contains="was trained with other settings than")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    first = sorted((run / "checkpoints").glob("ckpt-*"))[0]
    assert run_cli(capsys, "lm", "eval", str(run), "--checkpoint", str(first), "--threads", "1")[0] == 0
    code, printed, _ = run_cli(capsys, "lm", "compare", str(run), "--out", str(tmp_path / "cmp"))
    assert code == 0 and "the by-position columns come from `still lm eval` of checkpoint step 4" in printed


@pytest.mark.parametrize("edit", ["changed", "removed"])
def test_a_run_whose_config_json_was_edited_is_refused_by_eval_and_generate(trained, tmp_path, capsys, edit):
    """`lm eval RUN` and `lm generate RUN` read the model's settings from RUN/config.json and its newest
    checkpoint's weights: an edited (or shortened, a missing key reading as its default) config.json
    scored and generated with other memory lengths than the weights were trained with, unsaid."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    evaluations = {path.name: path.read_bytes() for path in run.glob("eval-*.json")}  # (earlier tests' lm eval)
    config = json.loads((run / "config.json").read_text())
    if edit == "changed":
        config["model"]["mem_len"] = config["model"]["mem_len"] // 2
    else:
        del config["model"]["mem_len"]
    (run / "config.json").write_text(json.dumps(config))
    for command in (("lm", "eval", str(run), "--threads", "1"), ("lm", "generate", str(run), "--tokens", "4")):
        assert_user_error(capsys, *command, contains="config.json differs from the settings its newest checkpoint "
                                                      "was trained with (model.mem_len)")
    assert {path.name: path.read_bytes() for path in run.glob("eval-*.json")} == evaluations


def test_deterministic_runs_are_identical(corpus, tmp_path, capsys):
    import torch

    try:
        for name in ("a", "b"):
            code, _, _ = run_cli(capsys, *train_args(corpus, tmp_path / name, "--deterministic"))
            assert code == 0
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert model_hash(tmp_path / "a") == model_hash(tmp_path / "b")
    a = json.loads((tmp_path / "a" / "results.json").read_text())["meta"]["history"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["meta"]["history"]
    assert [(h["train_loss"], h["valid_bits"]) for h in a] == [(h["train_loss"], h["valid_bits"]) for h in b]


def test_rerunning_a_finished_run_prints_its_table_without_work(trained, corpus, capsys):
    before = (trained / "results.json").read_text()
    code, out, err = run_cli(capsys, *train_args(corpus, trained))
    assert code == 0 and "loaded the finished run" in err and "valid_bpc" in out
    assert (trained / "results.json").read_text() == before


def test_run_directory_problems_are_named(trained, tmp_path, capsys):
    """A config with an unknown key, or one changed since training (its weights would not fit it):
    exit 2, no traceback."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "segmnet_len": 16}))
    assert_user_error(capsys, "lm", "eval", str(out), contains="unknown key(s) segmnet_len")
    config["model"]["d_ff"] = 64
    (out / "config.json").write_text(json.dumps(config))
    assert_user_error(capsys, "lm", "generate", str(out), "--tokens", "3",
                      contains="config.json differs from the settings its newest checkpoint was trained with "
                               "(model.d_ff)")  # (a probe: "(model)" left the user to find which of its keys)


def test_skip_mode_skips_a_nan_step_and_its_training_bits(corpus, tmp_path, capsys, monkeypatch):
    import torch.nn.functional as F

    cross_entropy, calls = F.cross_entropy, []

    def nan_at_the_sixth_step(*args, **kwargs):  # the training loss (a sum); evaluation's is per token
        out = cross_entropy(*args, **kwargs)
        if kwargs.get("reduction") == "sum":
            calls.append(1)
            return out * float("nan") if len(calls) == 6 else out
        return out

    monkeypatch.setattr(F, "cross_entropy", nan_at_the_sixth_step)
    code, _, err = run_cli(capsys, *train_args(corpus, tmp_path / "run", "--on-nonfinite", "skip"))
    assert code == 0 and "step skipped (1 so far)" in err
    history = json.loads((tmp_path / "run" / "results.json").read_text())["meta"]["history"]
    assert all(math.isfinite(h["train_bits"]) and math.isfinite(h["train_loss"]) for h in history)
    assert_user_error(capsys, *train_args(corpus, tmp_path / "other", "--on-nonfinite", "ignore"),
                      contains="'ignore' is not one of 'stop', 'skip'")


def test_keep_option_and_corpus_shorter_than_a_segment(corpus, tmp_path, capsys):
    code, _, _ = run_cli(capsys, *train_args(corpus, tmp_path / "run", "--keep", "1"))
    assert code == 0 and len(list((tmp_path / "run" / "checkpoints").glob("ckpt-*"))) == 1
    (tmp_path / "tiny").mkdir()
    for i in range(3):
        (tmp_path / "tiny" / f"{i}.txt").write_text("abc")
    assert_user_error(capsys, *train_args(tmp_path / "tiny", tmp_path / "t"),
                      contains="fewer than one segment (16)")
    (tmp_path / "tiny" / "0.txt").write_text("abcdefghijklmnop")  # one segment exactly: refused, before (a probe)
    code, _, err = run_cli(capsys, *train_args(tmp_path / "tiny", tmp_path / "t"))
    assert code == 0, err


def test_bf16_run_records_its_precision_and_eval_can_override_it(corpus, trained, tmp_path, capsys):
    run = tmp_path / "bf16"
    code, out, _ = run_cli(capsys, *train_args(corpus, run, "--precision", "bf16"))
    assert code == 0
    result = json.loads((run / "results.json").read_text())
    assert (result["meta"]["precision"] == "bf16"
            and json.loads((run / "config.json").read_text())["precision"] == "bf16")
    # d_head 32: the kernel's where it runs, but 8 compressed slots make key lengths it does not take
    from still.compressive import native

    assert result["meta"]["attention_scores"] == (
        "bf16" if native.attention_library() is None else "fp32 where the kernel took the shapes, else bf16")
    assert json.loads((trained / "results.json").read_text())["meta"]["attention_scores"] == "fp32"
    assert result["meta"]["position_gradient"] == "exact"
    fp32 = json.loads((trained / "results.json").read_text())["rows"][0]
    assert abs(result["rows"][0]["valid_bpc"] - fp32["valid_bpc"]) < 0.1  # the same 8 steps, another precision
    code, out, _ = run_cli(capsys, "lm", "eval", str(run), "--split", "valid")
    assert code == 0 and ", bf16" in out
    code, out32, _ = run_cli(capsys, "lm", "eval", str(run), "--split", "valid", "--precision", "fp32")
    assert code == 0 and ", fp32" in out32
    bpc = [float(text.split(": ", 1)[1].split(" bits")[0]) for text in (out, out32)]
    assert abs(bpc[0] - bpc[1]) < 0.05
    # greedy (top-k 1): the eager and the compiled bf16 steps round differently (logits agree to
    # ~1e-2), so sampled tokens may differ where a uniform falls near a boundary; the top token agrees
    code, text, _ = run_cli(capsys, "lm", "generate", str(run), "--tokens", "5", "--prompt", "To be", "--top-k", "1",
                            "--no-compile")
    assert code == 0 and text.startswith("To be") and len(text.rstrip("\n")) == len("To be") + 5
    code, compiled, _ = run_cli(capsys, "lm", "generate", str(run), "--tokens", "5", "--prompt", "To be",
                                "--top-k", "1", "--compile")
    assert code == 0 and compiled == text
    assert_user_error(capsys, *train_args(corpus, tmp_path / "x", "--precision", "fp16"),
                      contains="'fp16' is not one of 'fp32', 'bf16'")


def _sharded_args(corpus, out, shards, threads, *extra):
    return ["lm", "train", "--corpus", str(corpus), "--steps", "8", "--eval-every", "4", "--batch-size", "4",
            "--segment-len", "16", "--mem-len", "16", "--c-mem-len", "8", "--dropout", "0", "--threads", str(threads),
            "--shards", str(shards), "--out", str(out), *extra]


def test_two_shards_train_as_one_batch_and_resume_on_one(corpus, tmp_path, capsys):
    """Each step split across two threads (`still.train.shards`): the same run as one thread with the
    whole batch, to float tolerance; its checkpoint (memories of both shards) resumes on one."""
    from safetensors.torch import load_file

    runs = {}
    for name, shards, threads in (("whole", 1, 1), ("sharded", 2, 2)):
        code, _, _ = run_cli(capsys, *_sharded_args(corpus, tmp_path / name, shards, threads))
        assert code == 0
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert runs["sharded"]["meta"]["shards"] == 2 and runs["whole"]["meta"]["shards"] == 1
    for a, b in zip(runs["whole"]["meta"]["history"], runs["sharded"]["meta"]["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_bits"] == pytest.approx(b["train_bits"], rel=1e-5)
        assert a["valid_bits"] == pytest.approx(b["valid_bits"], rel=1e-5)
    newest = {name: sorted((tmp_path / name / "checkpoints").glob("ckpt-*"))[-1] for name in runs}
    weights = {name: load_file(str(path / "model.safetensors")) for name, path in newest.items()}
    for key, value in weights["whole"].items():
        torch.testing.assert_close(weights["sharded"][key], value, rtol=1e-4, atol=1e-5)
    state = {name: load_file(str(path / "state.safetensors")) for name, path in newest.items()}
    assert state["sharded"]["extra/memory/0"].shape == (4, 16, 128)  # both shards' rows, in order
    torch.testing.assert_close(state["sharded"]["extra/memory/1"], state["whole"]["extra/memory/1"],
                               rtol=1e-4, atol=1e-4)

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "sharded", resumed)
    shutil.rmtree(resumed / "checkpoints" / newest["sharded"].name)  # resume from step 4
    code, _, err = run_cli(capsys, *_sharded_args(corpus, resumed, 1, 1))
    assert code == 0 and "at the start of epoch 2" in err
    a = json.loads((resumed / "results.json").read_text())
    assert a["meta"]["shards"] == 1
    assert a["rows"][0]["valid_bpc"] == pytest.approx(runs["sharded"]["rows"][0]["valid_bpc"], abs=2e-4)


def test_shards_that_do_not_split_the_batch_are_named(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert_user_error(capsys, *_sharded_args(corpus, out, 3, 2),
                      contains="shards (3) must be >= 1 and divide the rows of a batch (4)")
    assert not out.exists()


def test_a_batch_larger_than_the_text_says_how_many_rows_it_trains(tmp_path, capsys):
    # (a probe: --batch-size 2**63 dealt segments to rows for minutes, then trained the rows there were, unsaid)
    from conftest import HAMLET

    text = tmp_path / "short.txt"
    text.write_text(HAMLET[:400])
    args = ["lm", "train", "--corpus", str(text), "--steps", "2", "--eval-every", "2", "--segment-len", "16",
            "--mem-len", "16", "--c-mem-len", "8", "--threads", "1", "--batch-size", str(2**63)]
    code, _, err = run_cli(capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 0
    rows = int(re.search(rf"--batch-size {2**63}: a step trains (\d+) rows \(the training text has only \1 "
                         rf"segments of 16 tokens, fewer than the batch size {2**63}\)", err)[1])
    assert 0 < rows < 400 / 16
    meta = json.loads((tmp_path / "run" / "results.json").read_text())["meta"]
    assert meta["tokens_per_second"] < 1e9  # (of the rows trained: of 2**63 rows a step, 1e19 and more)
    assert_user_error(capsys, *args, "--shards", str(rows + 1), "--out", str(tmp_path / "sharded"),
                      contains=f"divide the rows of a batch ({rows}: the training text has only {rows} segments")


def test_compiled_training_matches_eager_training(corpus, tmp_path, capsys):
    """`--compile` (torch.compile of each layer's feed-forward block; dropout drawn eagerly inside,
    from each shard thread's generator): the run of eager training, to float tolerance, with
    dropout and two shards; its checkpoint has the same names, so it resumes without `--compile`."""
    import torch._dynamo
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        compiled_before = counters["stats"]["unique_graphs"]
        code, _, _ = run_cli(capsys, *_sharded_args(corpus, tmp_path / name, 2, 2, "--dropout", "0.1", *extra))
        assert code == 0
        assert torch._dynamo.config.suppress_errors is False  # set for the run only (failures run eagerly)
        assert (counters["stats"]["unique_graphs"] > compiled_before) == (name == "compiled")
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
    # Compiled and eager products round differently, and which shard runs its first steps compiled
    # depends on the threads' timing (one may run eagerly while the other compiles): the same
    # command gave two results. Adam then turns a gradient within rounding of zero into a step of
    # its learning rate. Seen: up to 1.1e-5 relative in the losses and 1.7e-3 in a weight's norm;
    # with the masks drawn differently (one extra draw a call: docs/performance.md, session 30)
    # 1.5e-3 and 1.1, which these tolerances do not let through.
    for a, b in zip(runs["eager"]["meta"]["history"], runs["compiled"]["meta"]["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-4)
        assert a["valid_bits"] == pytest.approx(b["valid_bits"], rel=2e-4)
    newest = {name: sorted((tmp_path / name / "checkpoints").glob("ckpt-*"))[-1] for name in runs}
    weights = {name: load_file(str(path / "model.safetensors")) for name, path in newest.items()}
    assert weights["eager"].keys() == weights["compiled"].keys()
    for key, value in weights["eager"].items():  # by norm: single elements may differ by a step
        assert (weights["compiled"][key] - value).norm() <= 2e-2 * value.norm() + 1e-5, key


def test_training_where_compiling_cannot_work_says_so_and_trains(corpus, tmp_path, capsys, monkeypatch):
    from still.recipes import lm

    monkeypatch.setattr(lm, "torch_compile_problem", lambda device: "InvalidCxxCompiler: No working C++ compiler found")
    code, _, err = run_cli(capsys, *train_args(corpus, tmp_path / "run", "--compile"))
    assert code == 0 and (tmp_path / "run" / "results.json").exists()
    assert ("--compile: cannot compile (InvalidCxxCompiler: No working C++ compiler found); training without "
            "compiling") in err


def test_eval_split_across_threads_gives_the_same_bits(trained, capsys):
    before = torch.get_num_threads()
    metas = []
    try:
        for shards in ("1", "2", "64"):
            # (the split cut into 4 rows: whole, its one document would be one row, which no shards split)
            code, _, _ = run_cli(capsys, "lm", "eval", str(trained), "--split", "valid", "--threads", "2",
                                 "--fill-rows", "--batch-size", "4", "--shards", shards)
            assert code == 0
            metas.append(json.loads((trained / "eval-valid.json").read_text())["meta"])
    finally:
        torch.set_num_threads(before)
    # (more shards than rows split them a row each: the record says so, not the number asked for)
    assert [m["rows"] for m in metas] == [4, 4, 4] and [m["shards"] for m in metas] == [1, 2, 4]
    assert metas[0]["tokens"] == metas[1]["tokens"]
    assert metas[1]["bits_per_token"] == pytest.approx(metas[0]["bits_per_token"], abs=1e-6)
    assert_user_error(capsys, "lm", "eval", str(trained), "--shards", "0", contains="--shards")


def test_lm_generate_keeps_neither_text_nor_tokens_unless_a_state_is_saved(trained, tmp_path, capsys, monkeypatch):
    """A probe: a long `lm generate` grew by some 30 bytes a token (each token and its text kept, for
    a state and a return value the command never used): in bounded memory now, but for --save-state."""
    import still.recipes.lm as lm

    generations, original = [], lm.generate

    def generate(*args, **kwargs):
        generations.append(original(*args, **kwargs))
        return generations[-1]

    monkeypatch.setattr(lm, "generate", generate)
    for compiled in ("--compile", "--no-compile"):
        code, text, _ = run_cli(capsys, "lm", "generate", str(trained), "--tokens", "40", "--threads", "1", compiled)
        record = generations[-1]._record
        assert code == 0 and len(text) == 41 and record.yielded == 40 and record.chunks == [], compiled
    saved = tmp_path / "state.safetensors"
    code, _, _ = run_cli(capsys, "lm", "generate", str(trained), "--tokens", "40", "--save-state", str(saved))
    assert code == 0 and saved.is_file() and len(generations[-1].tokens) == 40


def test_generate_writes_the_prompt_after_what_choosing_the_step_says(trained, monkeypatch):
    """The prompt was written before `generate` read it and chose its step, so that a line it said
    then (a step that cannot run here; compiling ahead of time) came in the middle of the text."""
    import io

    import still.recipes.lm as lm

    said = []
    original = lm.generate

    def generate(*args, **kwargs):
        def tokens():
            lm.log("the step chosen")  # (as the decoding step's choice says it, at the first token)
            said.append("<log>")
            yield from original(*args, **kwargs)
        return tokens()

    class Stream(io.StringIO):
        def write(self, text):
            said.append(text)
            return super().write(text)

    monkeypatch.setattr(lm, "generate", generate)
    text = lm.generate_lm(trained, "To be", 5, stream=Stream(), compile=False)
    assert said[0] == "<log>" and said[1] == "To be" and "".join(said[1:]) == text + "\n"


def test_one_document_corpus_trains_on_every_row_and_eval_can_fill_them(tmp_path, capsys):
    from conftest import HAMLET

    text = tmp_path / "one.txt"  # one file: one document in each split (as enwik8)
    text.write_text("".join(f"{i}: {HAMLET}" for i in range(60)))
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(text, run))
    assert code == 0 and "the valid split is one document" in err and "--eval-fill-rows cuts" in err
    from safetensors.torch import load_file

    newest = sorted((run / "checkpoints").glob("ckpt-*"))[-1]
    assert load_file(str(newest / "state.safetensors"))["extra/memory/0"].shape[0] == 3  # the batch, not 1 row
    whole = json.loads((run / "results.json").read_text())["rows"][0]
    code, out, err = run_cli(capsys, "lm", "eval", str(run), "--threads", "1")
    assert code == 0 and "cut into" not in out
    assert "the test split is one document: evaluating it as one row (of a batch of 3); --fill-rows cuts" in err
    plain = json.loads((run / "eval-test.json").read_text())["meta"]
    assert (plain["rows"], plain["pieces"]) == (1, 1)
    assert plain["bits_per_token"] == pytest.approx(whole["test_bpc"], abs=1e-4)
    code, out, err = run_cli(capsys, "lm", "eval", str(run), "--threads", "1", "--fill-rows")
    assert code == 0 and "the 1 document(s) cut into 3 pieces" in out and "evaluating it as one row" not in err
    assert "Loss by position within the piece" in out
    filled = json.loads((run / "eval-test.json").read_text())["meta"]
    assert (filled["rows"], filled["pieces"], filled["tokens"]) == (3, 3, plain["tokens"])
    # the same targets, two of the three pieces read without the text before them
    assert filled["bits_per_token"] == pytest.approx(plain["bits_per_token"], abs=0.3)
    assert filled["bits_per_token"] != plain["bits_per_token"]
    # a run trained with --eval-fill-rows evaluates so by default
    code, out, _ = run_cli(capsys, *train_args(text, tmp_path / "filled", "--eval-fill-rows"))
    assert code == 0
    code, out, _ = run_cli(capsys, "lm", "eval", str(tmp_path / "filled"), "--threads", "1")
    assert "cut into 3 pieces" in out
    code, out, _ = run_cli(capsys, "lm", "eval", str(tmp_path / "filled"), "--threads", "1", "--no-fill-rows")
    assert "cut into" not in out


def test_a_run_made_before_a_setting_existed_resumes(trained, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    for name in ("stage.json", "config.json"):  # as written by a version without eval_fill_rows
        config = json.loads((out / name).read_text())
        del config["eval_fill_rows"]
        (out / name).write_text(json.dumps(config))
    code, printed, err = run_cli(capsys, *train_args(corpus, out))
    assert code == 0 and "different settings" not in err
    code, _, err = run_cli(capsys, *train_args(corpus, out, "--eval-fill-rows"))
    assert code == 2 and "different settings (eval_fill_rows)" in err


def test_bf16_on_a_cpu_without_bf16_instructions_says_fp32_is_faster(corpus, tmp_path, capsys, monkeypatch):
    """`still lm train` and `still lm eval` with bf16 where the CPU has no bf16 matrix instructions
    (PyTorch emulates them: 10x slower than fp32 at the reference preset held to AVX2) say so once
    and still run; with the instructions, or in fp32, they say nothing of it."""
    from still.train import precision

    message = "no bf16 matrix instructions"
    for has_bf16, mode in ((False, "bf16"), (True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(precision, "_cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        out = tmp_path / f"{mode}-{has_bf16}"
        code, _, err = run_cli(capsys, *train_args(corpus, out, "--steps", "4", "--precision", mode))
        assert code == 0 and err.count(message) == (1 if mode == "bf16" and not has_bf16 else 0), err
        code, _, err = run_cli(capsys, "lm", "eval", str(out), "--split", "valid")
        assert code == 0 and err.count(message) == (1 if mode == "bf16" and not has_bf16 else 0), err


def test_a_corpus_folder_named_in_latin1_trains_evaluates_and_compares(corpus, tmp_path, capsys):
    """A name of undecodable bytes (here b"caf\\xe9") is held as lone surrogates, which neither UTF-8
    nor a font takes: a run crashed at its end, writing results.md, and `lm eval` at its plot. Its
    tables, files and plots now show it as \\xNN."""
    import os

    own = tmp_path / os.fsdecode(b"caf\xe9")
    shutil.copytree(corpus, own)
    out = tmp_path / "run"
    code, printed, _ = run_cli(capsys, *train_args(own, out, "--steps", "2", "--eval-every", "2"))
    assert code == 0 and printed.startswith("caf\\xe9: bits per character")
    assert (out / "results.md").read_text(encoding="utf-8").startswith("caf\\xe9")
    code, printed, _ = run_cli(capsys, "lm", "eval", str(out), "--threads", "1")
    assert code == 0 and printed.startswith("caf\\xe9 test:") and (out / "eval-test-by-position.png").is_file()
    assert run_cli(capsys, "lm", "compare", str(out), "--out", str(tmp_path / "compare"))[0] == 0


def test_folders_that_cannot_be_written_and_odd_paths_are_one_line_errors(corpus, trained, tmp_path, capsys):
    """Found by a probe: an --out under a file, a full disk (safetensors' own error) and --overwrite
    through a symbolic link ended in tracebacks (exit 1); an empty --corpus trained on the working
    folder; a file given as a run or /dev/null as a corpus was said not to exist."""
    (tmp_path / "afile").write_text("x")
    err = assert_user_error(capsys, *train_args(corpus, tmp_path / "afile" / "sub"),
                            contains="Not a directory: ")
    assert "STILL_TRACEBACK=1" in err
    assert_user_error(capsys, *train_args("", tmp_path / "empty"), contains="corpus must name a corpus")
    assert_user_error(capsys, *train_args("pg19:", tmp_path / "empty"), contains="corpus must name a corpus")
    assert_user_error(capsys, *train_args("/dev/null", tmp_path / "null"),
                      contains="corpus /dev/null is not a file or a folder")
    assert_user_error(capsys, "lm", "eval", str(tmp_path / "afile"), contains="afile is a file, not a run directory")
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    link = tmp_path / "link"
    link.symlink_to(other)
    assert_user_error(capsys, *train_args(corpus, link, "--steps", "4", "--eval-every", "4", "--overwrite"),
                      contains=f"{link} is a symbolic link (to {other}): --overwrite does not delete")
    assert (other / "results.json").is_file()


def test_a_full_disk_while_saving_a_checkpoint_is_a_one_line_error(corpus, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import still.train.checkpoint as checkpoint

    def full(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    assert_user_error(capsys, *train_args(corpus, tmp_path / "run", "--steps", "4", "--eval-every", "4"),
                      contains="No space left on device")
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))  # (the half-written one removed)


def test_sigterm_while_a_corpus_is_encoded_removes_the_entry_and_exits_143(corpus, tmp_path, capsys, monkeypatch):
    """SIGTERM outside the training steps killed the process where it stood: the half-written cache
    entry stayed (for PG-19 up to 23 GB) and nothing was said. It now unwinds: the entry's
    temporary folder is removed, "terminated", exit 143."""
    import os
    import signal

    import still.data.encoded as encoded

    own = tmp_path / "corpus"
    shutil.copytree(corpus, own)
    monkeypatch.setenv("STILL_CORPUS_CACHE", str(tmp_path / "corpora"))
    real = encoded._encode

    def encode_then_terminate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(encoded, "_encode", encode_then_terminate)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = run_cli(capsys, *train_args(own, tmp_path / "run"))
    assert code == 143 and "terminated" in err and "Traceback" not in err
    assert not [p for p in (tmp_path / "corpora").iterdir() if p.name.endswith(".tmp")]
    assert signal.getsignal(signal.SIGTERM) == before  # (the previous handler is back)


def test_a_run_folder_in_use_is_refused_and_overwrite_keeps_the_folder(corpus, trained, tmp_path, capsys):
    """Two runs into one --out at once both did all the work. The second is now refused while the
    first holds the folder; --overwrite empties the folder rather than replacing it (the lock is
    the folder's own); a run refused before it wrote anything leaves no folder behind."""
    import subprocess
    import sys

    from still.recipes.common import hold_run_folder

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "notes.txt").write_text("mine")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, pathlib\n"
        "from still.recipes.common import hold_run_folder\n"
        f"with hold_run_folder(pathlib.Path({str(out)!r})):\n"
        "    print('holding', flush=True)\n"
        "    sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        before = sorted(p.name for p in out.iterdir())
        for extra in ((), ("--overwrite",)):
            assert_user_error(capsys, *train_args(corpus, out, *extra),
                              contains=f"{out} is in use: another still process is training into it now")
        assert sorted(p.name for p in out.iterdir()) == before  # nothing touched
    finally:
        holder.communicate("")
    inode = out.stat().st_ino
    shutil.copytree(trained, out / "child")  # found by a probe: a run inside it was deleted, even one in use
    shutil.copytree(trained, out / "child" / "grandchild")
    (out / "eval-test.json").write_text("{}")
    # (let go with its process; other settings: started again)
    code, _, err = run_cli(capsys, *train_args(corpus, out, "--steps", "4", "--eval-every", "4", "--overwrite"))
    assert code == 0 and "loaded the finished run" not in err, err
    assert out.stat().st_ino == inode and json.loads((out / "results.json").read_text())["rows"][0]["steps"] == 4
    assert f"--overwrite: left what still did not write in {out}: child, notes.txt" in err
    assert (out / "notes.txt").read_text() == "mine" and not (out / "eval-test.json").exists()
    assert model_hash(out / "child") == model_hash(out / "child" / "grandchild") == model_hash(trained)
    with hold_run_folder(out):  # one process's own lock, taken again by another open: refused as well
        assert_user_error(capsys, *train_args(corpus, out), contains="is in use")
    assert_user_error(capsys, *train_args(tmp_path / "missing", tmp_path / "new" / "a" / "b"), contains="missing")
    assert not (tmp_path / "new").exists()  # (nor the folders above it that it made)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert_user_error(capsys, *train_args(corpus, tmp_path / "dangling"),
                      contains=f"{tmp_path / 'dangling'} is a symbolic link to {tmp_path / 'nowhere'}, which does "
                               "not exist")


def test_a_refused_run_leaves_no_folder_behind_whatever_the_path_to_it(corpus, tmp_path, capsys, monkeypatch):
    """A probe: refused, `--out N/x/../run` left N and N/x, which it had made (the folders it
    removes were named as typed: N/x/.. is N)."""
    monkeypatch.chdir(tmp_path)
    assert_user_error(capsys, *train_args(corpus, "N/x/../run", "--shards", "5"), contains="shards (5)")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_deletes_the_evaluations_still_wrote_and_not_the_users_files_named_alike(tmp_path):
    """A probe: `eval-*.md` took a user's eval-plan.md."""
    from still.recipes.common import _start_again

    names = ["eval-test.json", "eval-valid.md", "eval-test-by-position.png", "eval-plan.md", "eval-x.json",
             "eval-notes-by-position.png"]
    for name in names:
        (tmp_path / name).write_text("x")
    _start_again(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval-notes-by-position.png", "eval-plan.md", "eval-x.json"]


def test_overwrite_deletes_stills_temporaries_and_not_the_users_files_named_alike(tmp_path):
    """A probe: `.*.tmp` took a user's .draft.tmp, and their folder .work.tmp/ whole. still's are
    `atomic_write`'s, `.<name>.<pid>-<random>.tmp`, of the files it writes there."""
    from still.recipes.common import _start_again

    (tmp_path / ".work.tmp").mkdir()
    (tmp_path / ".work.tmp" / "notes").write_text("x")
    for name in (".draft.tmp", ".results.md.123-ab_c9xyz.tmp", ".notes.txt.123-abcdefgh.tmp"):
        (tmp_path / name).write_text("x")
    _start_again(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".draft.tmp", ".notes.txt.123-abcdefgh.tmp", ".work.tmp"]
    assert (tmp_path / ".work.tmp" / "notes").read_text() == "x"


def test_a_run_of_non_ascii_text_is_read_and_written_under_any_locale(corpus, tmp_path, capsys):
    """Found by a probe: under a locale that is not UTF-8 (LC_ALL=C without Python's coercion), a
    run's own vocab.json (written as UTF-8) could not be read back, and text the terminal's encoding
    lacks ended `lm generate` in a UnicodeEncodeError traceback."""
    import os
    import subprocess
    import sys

    text = tmp_path / "text"
    shutil.copytree(corpus, text)
    for path in text.iterdir():
        path.write_text(path.read_text(encoding="utf-8") + "café — naïve\n", encoding="utf-8")
    out = tmp_path / "run"
    assert run_cli(capsys, *train_args(text, out, "--steps", "2", "--eval-every", "2"))[0] == 0
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0",
           "PYTHONIOENCODING": "ascii"}
    result = subprocess.run([sys.executable, "-m", "still", "lm", "generate", str(out), "--prompt", "café",
                             "--tokens", "3", "--threads", "1"], capture_output=True, text=True, encoding="ascii",
                            errors="strict", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("caf\\xe9") and "Traceback" not in result.stderr


def test_an_evaluation_that_cannot_be_kept_prints_its_numbers_first(trained, tmp_path, capsys, monkeypatch):
    """Found by a probe: `lm eval` of a run on read-only media evaluated the whole split, then ended
    writing its record, and its numbers were lost with it."""
    import still.train.results as results

    def read_only(path, text):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(results, "atomic_write_text", read_only)
    code, printed, err = run_cli(capsys, "lm", "eval", str(trained), "--threads", "1")
    assert code == 2 and "error: Read-only file system: " in err and "eval-test.json" in err
    assert re.match(r"corpus\d* test: [\d.]+ bits per character", printed) and "| from |" in printed


def test_a_finished_run_is_loaded_again_where_it_cannot_be_written(trained, corpus, tmp_path, capsys, monkeypatch):
    """Found by a probe: running a finished `lm train` again on read-only media failed writing its
    config.json, which held those settings already. Nothing is written now that holds what is there."""
    import still.train.io as io

    out = tmp_path / "run"
    shutil.copytree(trained, out)

    def read_only(path, write):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(io, "atomic_write", read_only)
    code, _, err = run_cli(capsys, *train_args(corpus, out))
    assert code == 0 and "loaded the finished run" in err, err


def test_weights_that_give_nan_outputs_stop_the_run_and_are_refused(trained, corpus, tmp_path, capsys, monkeypatch):
    """Found by a fuzzer: at --lr 1e6 one step's loss and gradients were finite, its weights' outputs
    NaN; the run ended with exit code 0 and NaN in its table, `lm eval` printed NaN."""
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *train_args(corpus, out, "--steps", "1", "--eval-every", "1", "--lr", "1e6"))
    assert code == 3 and "error: lm: valid_bits is nan after step 1, though every step's loss" in err, err
    assert not list((out / "checkpoints").glob("ckpt-*")) and not (out / "results.json").exists()

    import still.recipes.lm as lm

    evaluate_streams = lm.evaluate_streams
    monkeypatch.setattr(lm, "evaluate_streams",
                        lambda *args, **kwargs: {**evaluate_streams(*args, **kwargs), "bits_per_token": math.nan})
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    (copy / "eval-test.json").unlink(missing_ok=True)
    assert_user_error(capsys, "lm", "eval", str(copy), "--threads", "1",
                      contains="the model's loss on the test split is nan: its weights diverged")
    assert not (copy / "eval-test.json").exists()


@pytest.mark.parametrize("change", ["started again", "checkpoint removed"])
def test_an_evaluation_of_a_run_changed_meanwhile_writes_nothing(trained, tmp_path, capsys, monkeypatch, change):
    """Found by a probe: `lm eval` of a run that `lm train --overwrite` started again while it
    evaluated wrote the old model's numbers into the new run's eval-test.* (the same step label).
    A checkpoint rotated away by training that goes on is still of this run: its numbers are written."""
    import still.recipes.lm as lm

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    for earlier in out.glob("eval-*"):  # (another test's)
        earlier.unlink()
    newest = sorted((out / "checkpoints").glob("ckpt-*"))[-1]
    real = lm.evaluate_streams

    def evaluate_then_change(*args, **kwargs):
        result = real(*args, **kwargs)
        if change == "started again":  # (as --overwrite with other settings: a new config.json, checkpoints gone)
            config = json.loads((out / "config.json").read_text())
            (out / "config.json").write_text(json.dumps({**config, "steps": 16}))
        shutil.rmtree(newest)
        return result

    monkeypatch.setattr(lm, "evaluate_streams", evaluate_then_change)
    args = ("lm", "eval", str(out), "--threads", "1")
    if change == "checkpoint removed":
        assert run_cli(capsys, *args)[0] == 0
        assert json.loads((out / "eval-test.json").read_text())["meta"]["step"] == int(newest.name[5:])
        return
    assert_user_error(capsys, *args, contains=f"{out} changed while it was evaluated (started again with other "
                                              "settings): nothing written; evaluate it again")
    assert not list(out.glob("eval-*"))


def test_a_report_cut_short_is_drawn_again_and_written_whole(trained, corpus, tmp_path, capsys, monkeypatch):
    """Found by a probe: `lm train` killed between results.* and curves.png lost the plot for good (the
    rerun found the run finished); an interrupt there, and in `lm eval`'s writes, now waits for the end."""
    import signal

    import still.recipes.common as common
    import still.recipes.lm as lm

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "curves.png").unlink()
    before = (out / "results.json").read_text()
    code, printed, err = run_cli(capsys, *train_args(corpus, out))
    assert code == 0 and "loaded the finished run" in err and "valid_bpc" in printed, err
    assert f"{out}/curves.png was missing: drawn again from results.json's history" in err
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG" and (out / "results.json").read_text() == before

    real = common.plot_curves

    def interrupted_before_the_plot(path, *args, **kwargs):  # (SIGINT between the table and the plot)
        signal.raise_signal(signal.SIGINT)
        real(path, *args, **kwargs)

    monkeypatch.setattr(lm, "plot_curves", interrupted_before_the_plot)
    (out / "curves.png").unlink()
    with pytest.raises(KeyboardInterrupt):
        lm.eval_lm(out, print_table=False)
    assert (out / "eval-test.json").is_file() and (out / "eval-test-by-position.png").is_file()
    config = lm.load_config(lm.LMConfig, out / "config.json")
    with pytest.raises(KeyboardInterrupt):  # (the shortcut's plot)
        lm.train_lm(config, out, print_table=False)
    assert (out / "curves.png").is_file()
    for name in ("results.md", "curves.png"):  # (the whole report, written again)
        (out / name).unlink()
    with pytest.raises(KeyboardInterrupt):
        lm.train_lm(config, out, print_table=False)
    assert (out / "results.md").is_file() and (out / "curves.png").is_file()


def test_compare_writes_over_and_removes_only_a_comparisons_files(trained, tmp_path, capsys):
    """Found by a probe: `lm compare --out C` removed a user's compare-test-by-position.png ("of an
    earlier comparison") and wrote over their compare-test.md."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for earlier in run.glob("eval-*"):  # (no evaluation: the comparison has no by-position plot)
        earlier.unlink()
    for name in ("compare-test-by-position.png", "compare-test.md", "compare-valid-curves.png"):
        out = tmp_path / name
        out.mkdir()
        (out / name).write_bytes(b"the user's")
        assert_user_error(capsys, "lm", "compare", str(run), "--out", str(out),
                          contains=f"--out {out} holds {name}, not of a comparison of still's")
        assert [p.name for p in out.iterdir()] == [name] and (out / name).read_bytes() == b"the user's"
    out = tmp_path / "cmp"  # (a comparison's own files: written over, and a plot removed, again)
    assert run_cli(capsys, "lm", "compare", str(run), "--out", str(out))[0] == 0
    (out / "compare-test-by-position.png").write_bytes(b"an earlier comparison's")
    code, _, err = run_cli(capsys, "lm", "compare", str(run), "--out", str(out))
    assert code == 0 and "(of an earlier comparison) removed" in err
    assert not (out / "compare-test-by-position.png").exists()
    record = json.loads((out / "compare-test.json").read_text())  # as most earlier versions wrote it (a review)
    (out / "compare-test.json").write_text(json.dumps({**record, "meta": {}}))
    assert run_cli(capsys, "lm", "compare", str(run), "--out", str(out))[0] == 0


def test_overwrite_deletes_what_marks_a_run_last(tmp_path, monkeypatch):
    """A review: killed between stage.json and vocab.json, `--overwrite` left a folder of no run's
    holding vocab.json, which every later run refused; what marks it as still's goes last."""
    from still.recipes import common

    out = tmp_path / "run"
    (out / "checkpoints" / "ckpt-00000002").mkdir(parents=True)
    for name in ("config.json", "results.md", "stage.json", "vocab.json", "curves.png"):
        (out / name).write_text("{}")
    gone = []
    real_unlink, real_rmtree = Path.unlink, common.shutil.rmtree
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: gone.append(self.name) or real_unlink(self, *a, **k))
    monkeypatch.setattr(common.shutil, "rmtree", lambda path, *a, **k: gone.append(Path(path).name)
                        or real_rmtree(path, *a, **k))
    common._start_again(out)
    assert gone[-3:] == ["ckpt-00000002", "config.json", "stage.json"] and not list(out.iterdir()), gone


def test_a_users_stage_json_does_not_make_a_run_of_its_checkpoints_folder(corpus, tmp_path, capsys):
    """A review: the checkpoints-folder refusal took any stage.json for a run's, and named a folder of
    the user's as "the U stage of the run in" its parent, which held no run."""
    user = tmp_path / "U"
    (user / "checkpoints").mkdir(parents=True)
    (user / "stage.json").write_text(json.dumps({"env": "prod"}))
    code, _, err = run_cli(capsys, *train_args(corpus, user / "checkpoints" / "r1"))
    assert code == 0, err
