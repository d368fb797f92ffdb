"""Where a training step's time goes: every operator of the recipe's step, fp32 beside bf16.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/step_profile.py [--model reference] [--rows 8] [--steps 5]

The step of `still lm train` (`still.train.loop.Trainer` with the recipe's loss: memories carried,
cross entropy + the reconstruction loss, backward, the two clip groups, Adam) on one thread over
`--rows` rows: with 8 at the reference preset, one shard of the default two-shard step. Per
precision (in one process, one after the other): --warmup steps, --steps timed steps without the
profiler (their median is "step"), then --steps steps under `torch.profiler`, whose operators' own
(self) times are put in categories:

    products            aten::mm, addmm, bmm, baddbmm, addmv (PyTorch's matrix products), with their
                        FLOPs counted from the recorded shapes and their rate against this core's
                        matmul peak measured in the same run (one thread, `still.bench.peak`)
    attention kernels   still's autograd functions whose work is a hand-written kernel (the training
                        attention and the reconstruction loss's attention and squared error: their
                        products, softmax and packing, out of PyTorch's sight)
    dropout kernels     still's dropout, ReLU-dropout and dropout-add passes
    copies and casts    copy_, _to_copy, cat, clone and the like (autocast's casts among them)
    layer norms         forward and backward
    optimizer, clipping fused Adam, the gradient norms and their sums
    elementwise, other  every other operator
    allocation, views   empty tensors, views, reshapes, transposes, and the own time of wrappers
                        that call other operators (linear, matmul, to)
    outside operators   the profiled step's wall time less all the operators' own times: Python,
                        autograd's engine, the profiler's own cost

As the `still` command does, glibc's malloc keeps the memory it frees (`still.allocator`;
--glibc-default leaves glibc's defaults); the command's huge pages (`start_with_huge_pages`) need a
process started with them: run this under `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` for those.

Prints one table (ms a step, the share of the profiled step, fp32 time / bf16 time) and, with
--top N, each precision's N most expensive operators. `--out DIR` writes step_profile.json and .md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from still import allocator  # noqa: E402
from still.bench import at_least_one, at_least_zero, out_folder, run_script  # noqa: E402
from still.bench.peak import device_name, matmul_flops  # noqa: E402
from still.compressive.model import CompressiveTransformer  # noqa: E402
from still.config import replace  # noqa: E402
from still.recipes.lm import PRESETS  # noqa: E402
from still.train.loop import Trainer  # noqa: E402
from still.train.optim import build_optimizer  # noqa: E402
from still.train.results import format_table  # noqa: E402

VOCAB = 86  # Shakespeare's, as bench/reference_speed.py
MODELS = {"reference": {}, "peer": dict(d_model=128, n_layers=4, d_ff=512)}  # changes to the preset's model
PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv_", "aten::addmv")
COPIES = ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::clone", "aten::contiguous", "aten::stack",
          "aten::index_select", "aten::fill_", "aten::zero_", "aten::zeros_like")
VIEWS = ("aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::reshape",
         "aten::_reshape_alias", "aten::as_strided", "aten::transpose", "aten::t", "aten::expand", "aten::permute",
         "aten::slice",
         "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::unbind", "aten::split", "aten::narrow",
         "aten::flatten", "aten::unflatten", "aten::detach", "aten::detach_", "aten::alias", "aten::resize_",
         "aten::lift_fresh", "aten::_unsafe_view", "aten::chunk", "aten::split_with_sizes", "aten::view_as",
         "aten::set_", "aten::numpy_T", "aten::matrix_H", "aten::linear", "aten::matmul", "aten::to")
OPTIMIZER = ("aten::_fused_adam_", "aten::linalg_vector_norm", "aten::_foreach_norm", "aten::_foreach_mul_",
             "aten::clip_grad_norm_", "aten::_foreach_add_", "aten::norm")
CATEGORIES = ("products", "attention kernels", "dropout kernels", "copies and casts", "layer norms",
              "optimizer, clipping", "elementwise, other", "allocation, views", "outside operators")


def category(name: str) -> str:
    """The category of an operator or autograd function (by the name the profiler records)."""
    if name in PRODUCTS:
        return "products"
    if name.startswith("Optimizer.") or name in OPTIMIZER:
        return "optimizer, clipping"
    if name.startswith("autograd::") or name.startswith("torch::autograd::") or name.startswith("<"):
        return "outside operators"  # autograd's engine and Python frames the profiler names
    if name.startswith("aten::"):
        if name in COPIES:
            return "copies and casts"
        if name in VIEWS:
            return "allocation, views"
        if "layer_norm" in name:
            return "layer norms"
        return "elementwise, other"
    # still's autograd functions (and their backward nodes): what runs in their own time is theirs
    if "Dropout" in name:
        return "dropout kernels"
    if "Attention" in name or "SquaredError" in name:
        return "attention kernels"
    return "elementwise, other"


def product_flops(name: str, shapes: list) -> int:
    """FLOPs of one call of a product (2 per multiply-add) from its input shapes; 0 for others."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2 * m * k * n
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2 * m * k * n
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2 * b * m * k * n
        if name == "aten::baddbmm":
            (b, m, k), (_, _, n) = shapes[1], shapes[2]
            return 2 * b * m * k * n
        if name in ("aten::addmv_", "aten::addmv"):
            (m, k) = shapes[1]
            return 2 * m * k
    except (IndexError, TypeError, ValueError):
        pass
    return 0


def _inside_product(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in PRODUCTS:
            return True
        parent = parent.cpu_parent
    return False


def make_trainer(model_name: str, precision: str, rows: int, segments: int, seed: int = 0):
    """The recipe's step over `rows` rows of random tokens (vocabulary 86), unsharded: -> (trainer, a
    list holding the memories after the last step)."""
    config = PRESETS["reference"]
    torch.manual_seed(seed)
    model = CompressiveTransformer(replace(config.model, vocab_size=VOCAB, **MODELS[model_name]))
    optimizer = build_optimizer(model.parameters(), config.optim)
    length = config.segment_len
    tokens = torch.randint(VOCAB, (rows, segments * length + 1), generator=torch.Generator().manual_seed(seed))
    memory = [None]

    def loss_fn(net, i, shard=None):
        i %= segments
        inputs, targets = tokens[:, i * length : (i + 1) * length], tokens[:, i * length + 1 : (i + 1) * length + 1]
        out = net(inputs, memory[0])
        memory[0] = out.state.detach()
        lm = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
        return lm if out.compression_loss is None else lm + out.compression_loss

    groups = [model.model_parameters(), model.compressor_parameters()]
    trainer = Trainer(model, loss_fn, optimizer, grad_clip=config.optim.grad_clip, clip_groups=groups,
                      precision=precision, shards=1, log=lambda _: None)
    model.train()
    return trainer, memory


def profile_steps(trainer: Trainer, memory: list, warmup: int, steps: int) -> dict:
    """Warm-up, `steps` timed steps, then `steps` profiled: the step's median (s), the profiled wall
    time a step (s), the seconds and calls a step of each category and operator, the products' FLOPs.
    The warm-up must fill both memories (every step after it then runs the same shapes)."""
    i = 0
    for _ in range(warmup):
        trainer._step(i)
        i += 1
    config = trainer.model.config
    if memory[0].memory_len < config.mem_len or memory[0].compressed_len < config.c_mem_len:
        raise ValueError(f"--warmup {warmup} leaves the memories unfilled ({memory[0].memory_len} of {config.mem_len}, "
                         f"{memory[0].compressed_len} of {config.c_mem_len} compressed): give more")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer._step(i)
        times.append(time.perf_counter() - start)
        i += 1
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            trainer._step(i)
            i += 1
        wall = time.perf_counter() - start
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    operators = {e.key: (e.self_cpu_time_total / 1e6 / steps, e.count // steps) for e in prof.key_averages()}
    for name, (own, _) in operators.items():
        seconds[category(name)] += own
    flops: dict[str, int] = {}  # of each product, counted where it is not inside another (bmm calls bmm)
    for event in prof.events():
        if event.name in PRODUCTS and not _inside_product(event):
            flops[event.name] = flops.get(event.name, 0) + product_flops(event.name, event.input_shapes)
    flops = {name: n // steps for name, n in flops.items()}
    seconds["outside operators"] += max(0.0, wall / steps - sum(seconds.values()))
    return {"step": statistics.median(times), "profiled_step": wall / steps, "categories": seconds,
            "operators": operators, "product_flops": sum(flops.values()), "flops_by_product": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="reference",
                        help="reference: the reference preset (d_model 256, 6 layers); peer: the peer benchmark's "
                             "d_model 128, 4 layers (default reference)")
    parser.add_argument("--rows", type=at_least_one, default=8,
                        help="rows of the batch (default 8: one of two shards of 16)")
    parser.add_argument("--steps", type=at_least_one, default=5, help="steps timed, then as many profiled (default 5)")
    parser.add_argument("--warmup", type=int, default=6,
                        help="steps before them, which must fill both memories (default 6: the presets' fill in 5)")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                        help="precisions to profile, in this order (default fp32 bf16)")
    parser.add_argument("--top", type=at_least_zero, default=0,  # (0, the default: no list; -40 was taken: a probe)
                        help="also list each precision's N most expensive operators (default 0: no list)")
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's malloc as it is (default: keep freed memory, as the `still` command does)")
    parser.add_argument("--out", type=out_folder, help="write step_profile.json and .md into this folder")
    args = parser.parse_args()
    for name in ("rows", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:
        parser.error(f"--warmup must be >= 1, got {args.warmup}")

    kept = not args.glibc_default and allocator.keep_freed_memory()
    torch.set_num_threads(1)
    peaks = {p: matmul_flops(torch.float32 if p == "fp32" else torch.bfloat16, n=2048) for p in args.precisions}
    results = {}
    for precision in args.precisions:
        trainer, memory = make_trainer(args.model, precision, args.rows, args.warmup + 2 * args.steps + 1)
        try:
            results[precision] = profile_steps(trainer, memory, args.warmup, args.steps)
        except ValueError as error:  # a warm-up too short: the command line's fault (exit code 2)
            parser.error(str(error))
        print(f"{precision}: step {results[precision]['step'] * 1e3:.1f} ms, profiled "
              f"{results[precision]['profiled_step'] * 1e3:.1f} ms", flush=True)

    rows = []
    for name in CATEGORIES:
        row: dict = {"category": name}
        for precision, result in results.items():
            row[f"{precision} ms"] = round(result["categories"][name] * 1e3, 2)
            row[f"{precision} share"] = f"{result['categories'][name] / result['profiled_step']:.1%}"
        if len(results) == 2 and results["bf16"]["categories"][name] > 0:
            row["fp32 / bf16"] = f"{results['fp32']['categories'][name] / results['bf16']['categories'][name]:.2f}x"
        rows.append(row)
    total: dict = {"category": "profiled step"}
    for precision, result in results.items():
        total[f"{precision} ms"] = round(result["profiled_step"] * 1e3, 2)
        total[f"{precision} share"] = "100.0%"
    if len(results) == 2:
        total["fp32 / bf16"] = f"{results['fp32']['profiled_step'] / results['bf16']['profiled_step']:.2f}x"
    rows.append(total)
    lines = [f"{args.model} model, {args.rows} rows, one thread, {device_name(torch.device('cpu'))}, torch "
             f"{torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, still's malloc "
             f"settings {'set' if kept else 'not set'}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')}; ms a step "
             f"(the mean of {args.steps} profiled steps after {args.steps} timed ones)", "",
             format_table(rows)]
    for precision, result in results.items():
        rate = result["product_flops"] / result["categories"]["products"] if result["categories"]["products"] else 0
        lines.append(f"{precision}: step {result['step'] * 1e3:.1f} ms unprofiled (median), "
                     f"{result['profiled_step'] * 1e3:.1f} ms profiled; PyTorch's products "
                     f"{result['product_flops'] / 1e9:.2f} GFLOP a step at {rate / 1e9:.1f} GFLOP/s, "
                     f"{rate / peaks[precision]:.0%} of this core's {precision} matmul peak "
                     f"({peaks[precision] / 1e9:.1f} GFLOP/s)")
    for precision, result in results.items() if args.top else ():
        top = sorted(result["operators"].items(), key=lambda kv: -kv[1][0])[: args.top]
        lines += ["", format_table([{"operator": k[:60], "category": category(k), "ms": round(v[0] * 1e3, 2),
                                     "calls": v[1]} for k, v in top], title=f"{precision}: the {args.top} most "
                                                                             "expensive operators")]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step_profile.md").write_text(text + "\n")
        summary = {p: {k: v for k, v in r.items() if k != "operators"} | {"peak": peaks[p]} for p, r in results.items()}
        (args.out / "step_profile.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                "results": summary}, indent=1))
        print(f"wrote {args.out / 'step_profile.md'} and .json")


if __name__ == "__main__":
    run_script(main)
