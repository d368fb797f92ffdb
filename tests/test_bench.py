"""The benchmark scripts under bench/: every option explains itself in `--help`."""

from __future__ import annotations

import argparse
import os
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


def _parser_of(script: Path, monkeypatch) -> argparse.ArgumentParser:
    """The parser `script`'s main builds (caught where it would parse the command line)."""
    def parse_args(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    main = runpy.run_path(str(script), run_name="bench_under_test")["main"]
    with pytest.raises(_Parsed) as parsed:
        main()
    return parsed.value.parser


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_option_has_help(script, monkeypatch):
    actions = [a for a in _parser_of(script, monkeypatch)._actions if not isinstance(a, argparse._HelpAction)]
    assert actions
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in actions if not a.help]
    assert missing == [], f"{script.name}: options without help: {missing}"


def test_the_step_profile_counts_the_products_the_step_runs():
    """bench/step_profile.py: its FLOPs of PyTorch's products, read from the profiler's shapes, are
    those `FlopCounterMode` counts for the same step (addmm's and baddbmm's operands are its second
    and third; the counter leaves out matrix-vector products, which the profile counts; a bmm the
    profiler records inside another is counted once); its categories add up to the profiled step;
    a warm-up too short to fill the memories (whose shapes then change from step to step) is refused."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    profile = runpy.run_path(str(BENCH / "step_profile.py"), run_name="bench_under_test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for precision in ("fp32", "bf16"):
            trainer, memory = profile["make_trainer"]("peer", precision, 2, 12)
            result = profile["profile_steps"](trainer, memory, 6, 1)
            with FlopCounterMode(display=False) as counter:
                trainer._step(8)
            counted = {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}
            by_product = {name.removeprefix("aten::"): n for name, n in result["flops_by_product"].items()
                          if not name.startswith("aten::addmv")}
            assert by_product == counted and sum(counted.values()) > 0, (precision, by_product, counted)
            assert result["product_flops"] == sum(result["flops_by_product"].values())
            assert sum(result["categories"].values()) == pytest.approx(result["profiled_step"], rel=1e-9)
            assert set(result["categories"]) == set(profile["CATEGORIES"])
            assert result["categories"]["products"] > 0 and result["categories"]["attention kernels"] > 0
        trainer, memory = profile["make_trainer"]("peer", "fp32", 2, 8)
        with pytest.raises(ValueError, match="leaves the memories unfilled"):
            profile["profile_steps"](trainer, memory, 3, 1)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("name", "expected"), [
    ("aten::addmm", "products"), ("aten::copy_", "copies and casts"),
    ("aten::native_layer_norm_backward", "layer norms"),
    ("_PackedAttentionOutputsBackward", "attention kernels"), ("_NativeDropoutAdd", "dropout kernels"),
    ("aten::_fused_adam_", "optimizer, clipping"), ("Optimizer.step#Adam.step", "optimizer, clipping"),
    ("autograd::engine::evaluate_function: MmBackward0", "outside operators"), ("aten::view", "allocation, views"),
    ("aten::mul", "elementwise, other"), ("_MeanSquaredError", "attention kernels")])
def test_the_step_profile_sorts_operators(name, expected):
    profile = runpy.run_path(str(BENCH / "step_profile.py"), run_name="bench_under_test")
    assert profile["category"](name) == expected


def test_the_distillation_peer_benchmark_trains_stills_epoch_a_chunk_at_a_time():
    """bench/distill_peers.py runs still's `Trainer` a CHUNK of batches at a time, taking turns with
    the peers: the epoch so cut trains the student exactly as one `fit` over all its batches does
    (the same optimizer and momentum go on from chunk to chunk), and `loss` is the loss of that step."""
    import copy

    import torch

    from still.distill.models import MLP, MLPConfig
    from still.train.loop import IndexBatches, Trainer

    peers = runpy.run_path(str(BENCH / "distill_peers.py"), run_name="bench_under_test")
    torch.manual_seed(0)
    x, y = torch.rand(400, 784), torch.randint(0, 10, (400,))
    teacher = MLP(MLPConfig(hidden=(32,))).eval().requires_grad_(False)
    student = MLP(MLPConfig(hidden=(24,)))
    batches = IndexBatches(len(x), 8, seed=0)(0)  # 50 batches: chunks of 20, 20 and 10
    assert len(batches) > 2 * peers["CHUNK"]
    still = peers["Still"](teacher, x, y)
    chunked = copy.deepcopy(student)
    turns = sum(1 for _ in still.run(chunked, batches, own_data=True))
    assert turns == 3
    whole = copy.deepcopy(student)
    Trainer(whole, still.loss_fn, peers["sgd"](whole), log=lambda message: None).fit(lambda epoch: batches, 1)
    for a, b in zip(chunked.parameters(), whole.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(next(chunked.parameters()), next(student.parameters()))
    assert still.loss(whole, batches[0]) == pytest.approx(float(still.loss_fn(whole, batches[0]).detach()))


def test_the_distillation_peer_benchmark_names_the_peers_it_lacks(monkeypatch, capsys):
    peers = runpy.run_path(str(BENCH / "distill_peers.py"), run_name="bench_under_test")
    monkeypatch.setattr("sys.argv", ["distill_peers.py", "--repeats", "1"])
    peers["main"].__globals__["version"] = lambda dist: "not installed"
    with pytest.raises(SystemExit) as exited:
        peers["main"]()
    assert exited.value.code == 2
    assert "torchdistill, labml-nn not installed here" in capsys.readouterr().err


def test_the_cifar_step_benchmark_compares_one_network_in_two_layouts():
    """bench/cifar_step.py: the NCHW copy is the same network (the same logits and loss) with every
    convolution's weight in the default layout, the original left channels-last; and a `Runner`'s
    turns go on from one another as one `fit` over all its batches does."""
    import copy

    import torch
    import torch.nn.functional as F

    from still.distill.models import VGG, VGGConfig
    from still.train.loop import Trainer
    from still.train.optim import build_optimizer

    bench = runpy.run_path(str(BENCH / "cifar_step.py"), run_name="bench_under_test")
    torch.manual_seed(0)
    net = VGG(VGGConfig(blocks=((4,), (8,))))
    copied = bench["nchw"](net)
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    copied_convs = [m.weight for m in copied.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    assert all(w.is_contiguous() for w in copied_convs)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    torch.testing.assert_close(copied.eval()(x), net.eval()(x), rtol=1e-5, atol=1e-6)

    def loss_fn(model, idx):
        return F.cross_entropy(model(x[idx]), y[idx])

    batches = [torch.arange(i, i + 4) for i in range(0, 24, 4)]  # 6 batches: 3 turns of 2
    runner = bench["Runner"](copy.deepcopy(net).train(), loss_fn, "fp32", batches, steps=2)
    for _ in range(3):
        assert runner.turn() > 0
    whole = copy.deepcopy(net).train()
    Trainer(whole, loss_fn, build_optimizer(whole.parameters(), bench["CONFIG"].optim),
            log=lambda message: None).fit(lambda epoch: batches, 1)
    for a, b in zip(runner.trainer.model.parameters(), whole.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(runner.trainer.model.head.weight, net.head.weight)


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "argument --steps: must be >= 1, got 0"),
                                           (["--repeats", "x"], "argument --repeats: not a whole number: 'x'"),
                                           (["--threads", "-1"], "argument --threads: must be >= 1, got -1")])
def test_the_cifar_step_benchmark_refuses_bad_counts(argv, message, monkeypatch, capsys):
    bench = runpy.run_path(str(BENCH / "cifar_step.py"), run_name="bench_under_test")
    monkeypatch.setattr("sys.argv", ["cifar_step.py", *argv])
    with pytest.raises(SystemExit) as exited:
        bench["main"]()
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


COUNTS = {"rounds", "repeats", "steps", "threads", "processes", "batch_size", "gen_runs", "new_tokens", "megabytes",
          "tokens", "row_tokens", "rows"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_count_is_refused_below_one(script, monkeypatch):
    """A probe found --repeats 0 (a StatisticsError, a KeyError), --threads 0 (PyTorch's error) and
    --processes 0 ending in tracebacks, and --steps 0 starting a minute's compile: every count is
    `still.bench.at_least_one` (a usage error, exit 2, naming the value)."""
    from still.bench import at_least_one

    counts = {a.dest: a.type for a in _parser_of(script, monkeypatch)._actions if a.dest in COUNTS}
    assert all(kind is at_least_one for kind in counts.values()), (script.name, counts)


def test_the_step_profile_takes_top_0_and_refuses_below(monkeypatch, capsys):
    """A probe: --top -40 was taken, and then --top 0, the default (no list), was refused as a count."""
    parser = _parser_of(BENCH / "step_profile.py", monkeypatch)
    monkeypatch.undo()  # (parse_args itself again)
    assert parser.parse_args(["--top", "0"]).top == 0 and parser.parse_args([]).top == 0
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["--top", "-40"])
    assert exited.value.code == 2 and "argument --top: must be >= 0, got -40" in capsys.readouterr().err


def test_the_step_ab_benchmark_refuses_folders_that_hold_no_still(tmp_path, monkeypatch, capsys):
    """Given folders that do not exist, both sides imported the installed still through an empty
    PYTHONPATH and printed a difference between two measurements of the same code."""
    bench = runpy.run_path(str(BENCH / "step_ab.py"), run_name="bench_under_test")
    monkeypatch.setattr("sys.argv", ["step_ab.py", str(tmp_path / "old"), str(BENCH.parent / "src")])
    with pytest.raises(SystemExit) as exited:
        bench["main"]()
    assert exited.value.code == 2 and "old is not a src directory holding still" in capsys.readouterr().err


def test_a_scripts_still_error_is_one_line_with_exit_2(tmp_path):
    """A missing run given to a script ended in a StillError traceback (exit 1)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(BENCH / "eval_fill_rows.py"), "--run", str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {tmp_path / 'none'} does not exist"


def test_the_bf16_gradient_benchmark_leaves_out_of_adams_units_what_adam_has_not_seen(corpus, tmp_path, monkeypatch,
                                                                                      capsys):
    """After one training step the compressor has had no gradient (no memory was compressed yet), so
    the checkpoint's Adam state lacks it: the script ended in `KeyError: 'optimizer/15/exp_avg_sq'`."""
    from still.cli import main

    run = tmp_path / "run"
    try:
        main(["lm", "train", "--corpus", str(corpus), "--steps", "1", "--eval-every", "1", "--batch-size", "2",
              "--segment-len", "8", "--mem-len", "8", "--c-mem-len", "4", "--threads", "1", "--out", str(run)])
    except SystemExit as e:
        assert e.code in (0, None)
    capsys.readouterr()
    bench = runpy.run_path(str(BENCH / "bf16_gradient_error.py"), run_name="bench_under_test")
    monkeypatch.setattr("sys.argv", ["bf16_gradient_error.py", str(run), "--step", "0", "--steps", "1"])
    bench["main"]()
    out = capsys.readouterr().out
    assert "relative distance of each gradient from fp32's" in out
    assert "left out: 2 parameters the checkpoint's Adam state does not hold yet, compressor)" in out
    adam_table = out.split("in Adam's units")[1]
    assert "compressor" not in adam_table.split("\n", 2)[2] and "attention" in adam_table


def test_the_prompt_kernel_benchmark_reads_a_row_of_any_length():
    """A probe: --tokens not a multiple of one call's span (1,024 at the quick preset) read the last
    target as an input, and the loss's batch sizes disagreed (ValueError)."""
    import torch

    from still.compressive import CompressiveConfig, CompressiveTransformer

    score = runpy.run_path(str(BENCH / "eval_prompt_kernel.py"), run_name="bench_under_test")["score"]
    model = CompressiveTransformer(CompressiveConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                                     mem_len=8, c_mem_len=4, compression_rate=2)).eval()
    tokens = torch.randint(0, 20, (1, 1001), generator=torch.Generator().manual_seed(0))
    totals = [score(model, tokens, 16, written, "fp32")[1] for written in (False, True)]
    assert totals[0] == pytest.approx(totals[1], rel=1e-5) and totals[0] > 0


@pytest.mark.parametrize("preset, rows, most", [("quick", 9, 8), ("reference", 5, 4)])
def test_the_prompt_kernel_benchmark_refuses_rows_the_kernel_does_not_take(preset, rows, most, monkeypatch, capsys):
    """A probe: --preset quick --rows 9 ran PyTorch's attention in both arms (more than 512 / segment
    rows a segment take a segment a call) and printed "ratio 1.00x" as if it had compared the kernel."""
    bench = runpy.run_path(str(BENCH / "eval_prompt_kernel.py"), run_name="bench_under_test")
    monkeypatch.setattr("sys.argv", ["eval_prompt_kernel.py", "--preset", preset, "--rows", "1", str(rows),
                                     "--tokens", "512", "--repeats", "1"])
    with pytest.raises(SystemExit) as exited:
        bench["main"]()
    assert exited.value.code == 2
    assert f"--rows {rows}: at most {most} at the {preset} preset (512 / its segment of " in capsys.readouterr().err


def test_the_distillation_throughput_counts_an_epochs_samples_not_its_full_batches(monkeypatch, capsys):
    """A probe: a batch size that does not divide the data counted the partial last batch as a whole
    one (at --batch-size 40000, an MFU of 102.6%). Here 100 samples in batches of 40 (the last of 20),
    each epoch timed 0.5 s by a stand-in clock and the peak set to the plain epoch's counted FLOPs in
    that time: its MFU is 100.0% (it was 120.0%)."""
    import itertools
    import types

    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from still.distill.models import MLP, MLPConfig

    bench = runpy.run_path(str(BENCH / "distill_throughput.py"), run_name="bench_under_test")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(100, 784, generator=g), torch.randint(0, 10, (100,), generator=g)
    with FlopCounterMode(display=False) as counter:  # the plain student's epoch, every sample once
        F.cross_entropy(MLP(MLPConfig(hidden=(800, 800)))(x), y).backward()
    epoch_flops = counter.get_total_flops()
    scope = bench["main"].__globals__
    scope["load_data"] = lambda: (x, y, "a stand-in")
    scope["peak"] = lambda: {"fp32": epoch_flops / 0.5}
    scope["time"] = types.SimpleNamespace(perf_counter=itertools.count(0.0, 0.5).__next__)
    monkeypatch.setattr("sys.argv", ["distill_throughput.py", "--batch-size", "40", "--repeats", "1", "--threads", "1"])
    threads = torch.get_num_threads()
    try:
        bench["main"]()
    finally:
        torch.set_num_threads(threads)
    plain = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| plain student"))
    assert plain.split("|")[-2].strip() == "100.0%", plain


def test_the_rounding_twin_refuses_a_plain_runs_folder(corpus, tmp_path, monkeypatch, capsys):
    """A probe: given the folder of a finished plain run of the same settings, the script found it
    finished, trained nothing and marked its results a twin's. A plain run's folder is refused; a
    twin's is marked from its start, and resumed (here: reported, finished) by the script."""
    import json

    import still.compressive.attention as attention
    from still.cli import main

    monkeypatch.setattr(attention, "HEADS_MAJOR_PROJECTION", attention.HEADS_MAJOR_PROJECTION)  # (the script sets it)
    train = ["lm", "train", "--corpus", str(corpus), "--steps", "1", "--eval-every", "1", "--batch-size", "2",
             "--segment-len", "8", "--mem-len", "8", "--c-mem-len", "4", "--threads", "1"]
    main([*train, "--out", str(tmp_path / "plain")])

    def twin():  # as on a machine where the change moves the gradients (not this one, maybe: the test below)
        main = runpy.run_path(str(BENCH / "fp32_rounding_twin.py"), run_name="bench_under_test")["main"]
        main.__globals__["gradients_move"] = lambda *shapes: True
        main()

    monkeypatch.setattr("sys.argv", ["fp32_rounding_twin.py", *train, "--out", str(tmp_path / "plain")])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        twin()
    assert exited.value.code == 2
    assert "plain holds a run not started as a rounding twin" in capsys.readouterr().err
    assert "rounding_twin" not in json.loads((tmp_path / "plain" / "results.json").read_text())["meta"]
    for _ in range(2):  # trained, then found finished
        monkeypatch.setattr("sys.argv", ["fp32_rounding_twin.py", *train, "--out", str(tmp_path / "twin")])
        twin()
        meta = json.loads((tmp_path / "twin" / "results.json").read_text())["meta"]
        assert meta["rounding_twin"] == "HEADS_MAJOR_PROJECTION=False"
        assert (tmp_path / "twin" / "rounding_twin.txt").is_file()


def _peer_benchmark(argv: list[str], monkeypatch, capsys) -> tuple[list[dict], str, str]:
    """bench/compressive_peers.py's main with its measuring processes stood in for: each peak is 1
    GFLOP/s a thread (fp32; bf16 twice that), each row 256 tokens/s, and ours' counted step 1 GFLOP
    of 2 x 128 tokens (1 GFLOP/s). (The specs it asked for, its output and its error output.)"""
    bench = runpy.run_path(str(BENCH / "compressive_peers.py"), run_name="bench_under_test")
    specs = []

    def measured(spec):
        specs.append(spec)
        if spec["measure"] == "peak":
            threads = spec.get("threads", spec["config"]["threads"])
            return {"impl": "peak", "measure": "peak", "seed": spec["seed"], "fp32": 1e9 * threads,
                    "bf16": 2e9 * threads}
        return {"impl": spec["impl"], "measure": spec["measure"], "seed": spec["seed"], "params": 10,
                "flops": 1e9 if spec["count_flops"] else None, "tokens_per_s": 256.0, "peak_growth_mib": 1.0,
                "notes": [], "memory_after_warmup": [128, 128]}

    bench["main"].__globals__["run_subprocess"] = measured
    monkeypatch.setattr("sys.argv", ["compressive_peers.py", "--quick", "--glibc-default", "--measures", "train",
                                     *argv])
    bench["main"]()
    printed = capsys.readouterr()
    return specs, printed.out, printed.err


def test_the_peer_benchmark_reads_each_rows_mfu_against_the_peak_at_its_threads(monkeypatch, capsys):
    """A probe: at --threads 3 the 2-shard rows run on two threads (one a shard: `ShardPool` gives each
    3 // 2), and their MFU was read against the peak at three; the title said "two threads of 8 rows"
    at any batch."""
    specs, out, _ = _peer_benchmark(["--threads", "3", "--only", "ours", "ours-2shards"], monkeypatch, capsys)
    assert sorted(spec.get("threads") for spec in specs if spec["measure"] == "peak") == [2, 3]
    mfu = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in out.splitlines()
           if line.startswith("| ours")}
    assert mfu == {"ours": "33.3%", "ours-2shards": "50.0%"}, out
    assert "-2shards: 2 shards of 1 row, 1 thread each" in out and "8 rows" not in out


def test_the_peer_benchmark_leaves_the_two_shard_rows_out_at_one_thread(monkeypatch, capsys):
    """A probe: at --threads 1 the 2-shard rows ran on two threads against one thread's peak (up to 2x
    the MFU): they are left out, as bench/reference_speed.py leaves them out, and asked for alone refused."""
    specs, out, err = _peer_benchmark(["--threads", "1", "--only", "ours", "ours-2shards"], monkeypatch, capsys)
    assert {spec["impl"] for spec in specs} == {"peak", "ours"} and "2shards" not in out
    assert "--threads 1: ours-2shards (two threads) left out" in err
    with pytest.raises(SystemExit) as exited:
        _peer_benchmark(["--threads", "1", "--only", "ours-2shards"], monkeypatch, capsys)
    assert exited.value.code == 2
    assert "--threads 1: ours-2shards run on two threads: give --threads 2 or more" in capsys.readouterr().err


OUT_SCRIPTS = [p for p in SCRIPTS if '"--out"' in p.read_text()]


@pytest.mark.parametrize("script", OUT_SCRIPTS, ids=lambda p: p.name)
def test_an_out_that_is_a_file_is_refused_before_measuring(script, tmp_path, monkeypatch, capsys):
    """A probe: --out naming a file ended bench/reference_speed.py and bench/step_profile.py (and
    bench/cifar_step.py) in a FileExistsError traceback after the whole benchmark, its results lost:
    every --out is `still.bench.out_folder`, a usage error (exit 2) as the command line is read."""
    parser = _parser_of(script, monkeypatch)
    monkeypatch.undo()  # (parse_args itself again)
    (tmp_path / "file").write_text("")
    for out, said in ((tmp_path / "file", f"{tmp_path / 'file'} is a file, not a folder"),
                      (tmp_path / "file" / "sub", f"{tmp_path / 'file'} is a file, not a folder (for ")):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(["--out", str(out)])
        assert exited.value.code == 2 and said in capsys.readouterr().err
    assert parser.parse_args(["--out", str(tmp_path / "new" / "folder")]).out == tmp_path / "new" / "folder"


def test_the_decoding_step_benchmark_warms_up_at_few_steps(monkeypatch, capsys):
    """A probe: --steps 1, 2 or 3 warmed up for steps // 4 = 0 steps and divided by them
    (ZeroDivisionError). The decoders stand in for the compiled ones: each counts its steps."""
    bench = runpy.run_path(str(BENCH / "decode_steps.py"), run_name="bench_under_test")
    taken = []

    class Decoder:
        def __init__(self, model, state, batch, compile, dtype, native):
            self.native = native or None

        def prepare(self, sampling):
            pass

        def step_sample(self, token, uniform, sampling):
            taken.append(self)
            return token

    bench["main"].__globals__["Decoder"] = Decoder
    monkeypatch.setattr("sys.argv", ["decode_steps.py", "--preset", "peer", "--steps", "1", "--rounds", "1"])
    bench["main"]()
    assert len(taken) == 2 * 2 * (1 + 1)  # 2 dtypes x 2 steps x (a warm-up step + a timed one)
    assert "peer       fp32" in capsys.readouterr().out


def test_the_bf16_gradient_benchmark_refuses_a_step_below_zero(monkeypatch, capsys):
    """A probe: --step -5 ended in `ValueError: max() arg is an empty sequence`."""
    parser = _parser_of(BENCH / "bf16_gradient_error.py", monkeypatch)
    monkeypatch.undo()  # (parse_args itself again)
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["run", "--step", "-5"])
    assert exited.value.code == 2 and "argument --step: must be >= 0, got -5" in capsys.readouterr().err
    assert parser.parse_args(["run", "--step", "0"]).step == 0


def test_the_step_ab_benchmark_says_a_failed_measurements_own_error(tmp_path, monkeypatch, capsys):
    """A probe: a measuring process that failed (an old src whose API differs; here a still with
    nothing in it) ended in a CalledProcessError traceback showing the whole worker script, and never
    the child's own error: now that error on one line, exit 2."""
    from still.bench import run_script

    (tmp_path / "src" / "still").mkdir(parents=True)
    (tmp_path / "src" / "still" / "__init__.py").write_text("")
    bench = runpy.run_path(str(BENCH / "step_ab.py"), run_name="bench_under_test")
    src = str(tmp_path / "src")
    monkeypatch.setattr("sys.argv", ["step_ab.py", src, src, "--rounds", "1", "--steps", "1", "--only", "eval-fp32"])
    with pytest.raises(SystemExit) as exited:
        run_script(bench["main"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err == (f"error: the eval fp32 measurement of {src} failed (exit 1): "
                   "ModuleNotFoundError: No module named 'still.compressive'\n")


def test_the_precision_pairs_refuse_results_they_cannot_read(tmp_path, monkeypatch, capsys):
    """A probe: a truncated results.json, or a distillation's (rows without valid_bpc), ended in
    JSONDecodeError and KeyError tracebacks: now one line naming the file, exit 2."""
    import json

    from still.bench import run_script

    good = {"rows": [{"valid_bpc": 1.5, "test_bpc": 1.6}], "meta": {"config": {"seed": 0, "precision": "fp32"}}}
    runs = {"good": json.dumps(good), "truncated": json.dumps(good)[:30],
            "distilled": json.dumps({"rows": [{"stage": "student", "test_acc": 0.9}], "meta": {"config": {}}})}
    for name, text in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(text)
    bench = runpy.run_path(str(BENCH / "precision_pairs.py"), run_name="bench_under_test")
    for bad, said in (("truncated", "cannot read {}/results.json ("),
                      ("distilled", "{}/results.json holds no finished `still lm train` run's results "
                                    "(no valid_bpc or test_bpc in its first row)")):
        monkeypatch.setattr("sys.argv", ["precision_pairs.py", "--group", "g", f"{tmp_path / 'good'}:{tmp_path / bad}"])
        with pytest.raises(SystemExit) as exited:
            run_script(bench["main"])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith("error: " + said.format(tmp_path / bad)), err
    monkeypatch.setattr("sys.argv", ["precision_pairs.py", "--group", "g", f"{tmp_path / 'good'}:{tmp_path / 'good'}"])
    run_script(bench["main"])
    assert "valid_bpc: n 1, difference +0.0000" in capsys.readouterr().out


def test_the_fill_rows_benchmark_names_a_row_shorter_than_a_segment(monkeypatch, capsys):
    """A probe: --row-tokens below the segment length ended in "nothing to evaluate: the split has no
    targets", which does not name it."""
    bench = runpy.run_path(str(BENCH / "eval_fill_rows.py"), run_name="bench_under_test")
    monkeypatch.setattr("sys.argv", ["eval_fill_rows.py", "--preset", "reference", "--row-tokens", "100",
                                     "--tokens", "300", "--precision", "fp32", "--repeats", "1"])
    with pytest.raises(SystemExit) as exited:
        bench["main"]()
    assert exited.value.code == 2
    assert "--row-tokens must be at least the preset's segment length (128), got 100" in capsys.readouterr().err


def test_the_flop_counter_counts_pytorchs_cpu_attention(monkeypatch):
    """A probe: on the CPU `scaled_dot_product_attention` runs an operator torch's counter counted as
    0 FLOPs, so bench/compressive_peers.py's eval and generate counts left out QK^T and AV (ours' eval
    2.18 MFLOP/token where 2.97). `still.bench.flops.flop_counter` counts them as the same products
    written as matmuls (4 B H L_q L_k D), and a backward as torch counts its other flash attentions'
    (five products: the scores again, then the gradients); the script's eval count has them: one
    such call a layer, over the memories and the segment."""
    import dataclasses

    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    import still.bench.flops as flops

    b, h, lq, lk, d = 2, 4, 16, 48, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for n in (lq, lk, lk))
    mask = torch.randn(lq, lk)
    with torch.no_grad():
        with flops.flop_counter() as counted:
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with FlopCounterMode(display=False) as by_hand:
            (q @ k.transpose(-1, -2) + mask).softmax(-1) @ v
    assert counted.get_total_flops() == by_hand.get_total_flops() == 4 * b * h * lq * lk * d
    with flops.flop_counter() as counted:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
    assert counted.get_total_flops() == (4 + 10) * b * h * lq * lk * d

    bench = runpy.run_path(str(BENCH / "compressive_peers.py"), run_name="bench_under_test")
    cfg = bench["BenchConfig"](d_model=16, n_layers=2, n_heads=2, d_ff=32, segment_len=16, mem_len=16, c_mem_len=16,
                               compression_rate=4, batch_size=2, threads=1, warmup_segments=5, timed_steps=1)
    spec = {"impl": "ours", "measure": "eval", "seed": 0, "count_flops": True, "config": dataclasses.asdict(cfg)}
    threads = torch.get_num_threads()
    try:
        counts = [bench["run_worker"](spec)["flops"]]
        monkeypatch.setattr(flops, "CPU_ATTENTION", {})  # (torch's counter alone)
        counts.append(bench["run_worker"](spec)["flops"])
    finally:
        torch.set_num_threads(threads)
    keys = cfg.mem_len + cfg.c_mem_len + cfg.segment_len
    assert counts[0] - counts[1] == cfg.n_layers * 4 * cfg.batch_size * cfg.segment_len * keys * cfg.d_model


@pytest.mark.parametrize("argv, said", [
    (["--only", "ours+compile"], "--measures train: nothing for --only ours+compile to measure "
                                 "(ours+compile measures generate)"),
    (["--only", "ours+compile", "ours-bf16+compile", "--measures", "eval"],
     "--measures eval: nothing for --only ours+compile ours-bf16+compile to measure (ours+compile measures "
     "generate; ours-bf16+compile measures generate)"),
    (["--only", "ours-2shards", "--measures", "generate"],
     "--measures generate: nothing for --only ours-2shards to measure (ours-2shards measures train, eval)")])
def test_the_peer_benchmark_refuses_implementations_with_nothing_to_measure(argv, said, monkeypatch, capsys):
    """A probe: --only ours+compile --measures train ended in `ZeroDivisionError: integer modulo by
    zero` (exit 1), rotating an empty order of implementations."""
    with pytest.raises(SystemExit) as exited:
        _peer_benchmark(argv, monkeypatch, capsys)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert said in err and err.count("error:") == 1, err


def test_the_rounding_twin_refuses_a_change_that_moves_no_gradient(corpus, tmp_path, monkeypatch, capsys):
    """A probe: on an AMD EPYC (Zen 4) `HEADS_MAJOR_PROJECTION` off changed no gradient bit at any
    shape tried, so the twin trained bit for bit as the plain run and its floor read +0.0000. The
    script steps the run's model both ways first: a difference in the flag-off path's products is
    found, none where both ways take one path (`FUSED_SCORES` off); and where none is found it
    refuses in one line (exit 2), the folder not made."""
    import torch

    import still.compressive.attention as attention

    bench = runpy.run_path(str(BENCH / "fp32_rounding_twin.py"), run_name="bench_under_test")
    train = ["lm", "train", "--corpus", str(corpus), "--steps", "1", "--eval-every", "1", "--batch-size", "4",
             "--segment-len", "8", "--mem-len", "8", "--c-mem-len", "4", "--threads", "2", "--shards", "2",
             "--out", str(tmp_path / "twin")]
    shapes = bench["step_shapes"](bench["train_options"](train))
    assert shapes[1:] == (2, 8, 1, 0)  # a shard's rows, the segment, a shard's threads, the seed
    threads = torch.get_num_threads()
    plain = attention._LinearOverConstants

    class Rounded(plain):  # the flag-off path, its keys and values a rounding apart
        @staticmethod
        def apply(*args):
            return plain.apply(*args) * (1 + 2**-20)

    monkeypatch.setattr(attention, "_LinearOverConstants", Rounded)
    assert bench["gradients_move"](*shapes)
    monkeypatch.setattr(attention, "_LinearOverConstants", plain)
    monkeypatch.setattr(attention, "FUSED_SCORES", False)  # (both ways one path)
    assert not bench["gradients_move"](*shapes)
    assert attention.HEADS_MAJOR_PROJECTION and torch.get_num_threads() == threads

    monkeypatch.setattr("sys.argv", ["fp32_rounding_twin.py", *train])
    bench["main"].__globals__["gradients_move"] = lambda *shapes: False
    with pytest.raises(SystemExit) as exited:
        bench["main"]()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: HEADS_MAJOR_PROJECTION=False changes no gradient of this run's model here "
                          "(one step of 2 rows x 8 tokens, memories full, 1 thread)"), err
    assert not (tmp_path / "twin").exists()


def test_the_fill_rows_benchmark_refuses_a_document_too_short_for_its_cut_rows(monkeypatch, capsys):
    """A probe: the help says the cut reads --row-tokens a row, as the whole row does; at --preset
    quick --tokens 2048 --row-tokens 512 the whole row read 512 tokens and each of the 16 cut rows 128."""
    bench = runpy.run_path(str(BENCH / "eval_fill_rows.py"), run_name="bench_under_test")
    monkeypatch.setattr("sys.argv", ["eval_fill_rows.py", "--preset", "quick", "--row-tokens", "512",
                                     "--tokens", "2048", "--precision", "fp32", "--repeats", "1"])
    with pytest.raises(SystemExit) as exited:
        bench["main"]()
    assert exited.value.code == 2
    assert ("--tokens must be at least the preset's 16 rows x --row-tokens (8192) for each cut row to read "
            "--row-tokens, as the whole one does, got 2048") in capsys.readouterr().err
    monkeypatch.setattr("sys.argv", ["eval_fill_rows.py", "--preset", "quick", "--row-tokens", "64",
                                     "--precision", "fp32", "--repeats", "1"])  # (--tokens: 16 x 64)
    bench["main"]()
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:3]]
    assert [(row[1], row[3]) for row in rows] == [("1", "64"), ("16", str(16 * 64))], rows


def test_the_step_ab_benchmark_alternates_which_side_goes_first(tmp_path, monkeypatch, capsys):
    """A probe: its docstring said the rounds alternate old and new, but old always ran first; now
    round 0 runs old then new, round 1 new then old, and so on, for every measure."""
    for side in ("old", "new"):
        (tmp_path / side / "still").mkdir(parents=True)
        (tmp_path / side / "still" / "__init__.py").write_text("")
    bench = runpy.run_path(str(BENCH / "step_ab.py"), run_name="bench_under_test")
    ran = []

    def measure(src, mode, precision, steps, threads, size):
        ran.append((Path(src).name, mode))
        return 1.0

    bench["main"].__globals__["measure"] = measure
    monkeypatch.setattr("sys.argv", ["step_ab.py", str(tmp_path / "old"), str(tmp_path / "new"), "--rounds", "3",
                                     "--only", "train-fp32", "eval-fp32"])
    bench["main"]()
    assert ran == [("old", "train"), ("new", "train"), ("old", "eval"), ("new", "eval"),
                   ("new", "train"), ("old", "train"), ("new", "eval"), ("old", "eval"),
                   ("old", "train"), ("new", "train"), ("old", "eval"), ("new", "eval")]
    assert "| train fp32 | 1.0 | 1.0 | +0.0% |" in capsys.readouterr().out


def test_the_peer_setup_says_where_the_local_torch_wheel_was_looked_for(tmp_path):
    """A probe: `pip install --no-index torch==2.13.0` relies on pip's find-links, which nothing said;
    without the wheel there the script stopped on pip's own "no matching distribution". Here the
    venv's python stands in for .venv-bench's (torch there, but not the version asked), pip's config
    files are off and its find-links an empty folder: nothing is installed, and the one line says why."""
    import shutil
    import subprocess
    import sys

    (tmp_path / "bench").mkdir()
    shutil.copy(BENCH / "setup_peers.sh", tmp_path / "bench")
    (tmp_path / ".venv-bench" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-bench" / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (tmp_path / ".venv-bench" / "bin" / "python").chmod(0o755)
    (tmp_path / "wheels").mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable, "STILL_TORCH_VERSION": "0.0.1",
           "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(tmp_path / "wheels")}
    done = subprocess.run(["bash", str(tmp_path / "bench" / "setup_peers.sh")], capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"error: torch==0.0.1 not found in pip's find-links (PIP_FIND_LINKS={tmp_path / 'wheels'}, or find-links "
        "in pip.conf): set PIP_FIND_LINKS to a folder holding its CPU wheel (or STILL_TORCH_VERSION to the version "
        "of the wheel there)")
