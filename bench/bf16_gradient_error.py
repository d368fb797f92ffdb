"""How far a bf16 training step's gradient lies from the fp32 step's, and which rounding puts it there.

    .venv/bin/python bench/bf16_gradient_error.py RUN_DIR [--step 1750] [--steps 2] [--threads 2]

RUN_DIR is a `still lm train` run (its newest checkpoint is loaded, with its optimizer state). From
training step `--step`, the memories are filled by three segments in fp32 (no gradients), then for
each of `--steps` steps the training loss (LM cross entropy + the compression loss) is
differentiated from the same memories in

    fp32                 the reference
    bf16, bf16 scores    `--precision bf16` (autocast; fp32 master weights and loss) on PyTorch's
                         path: the attention's scores rounded to bf16 (`attention.NATIVE_SCORES`
                         off), the position table W_r R in bf16 (`EXACT_POSITION_GRADIENT` off)
    bf16, fp32 position  the same with `attention.FP32_POSITION_SCORES`: the training attention's
                         position scores as an fp32 product of the bf16 operands, the scores' sum
                         and softmax in fp32
    bf16, native         where `native_attention.cpp` runs (`NATIVE_SCORES`): every score in fp32
                         (session 23's default; printed only where the kernel runs)
    bf16, exact position as bf16 trains today: the above (where the kernel runs) and
                         `EXACT_POSITION_GRADIENT`, the position table in fp32 and its gradient
                         centred over the distances

and the distance of each gradient from fp32's is printed, ||g - g_fp32|| / ||g_fp32|| over all
parameters and per part of the model (summed over layers), with two checks of a bias over all
parameters: the projection <g, g_fp32> / ||g_fp32||^2 and the norm ratio ||g|| / ||g_fp32|| (1 and 1
for a gradient that is fp32's plus noise that averages out). Then the same distances in Adam's
units, which is what moves the weights: every entry divided by the RMS of its gradient that the
checkpoint's Adam state holds (sqrt(v) + eps), so that a part whose gradient is small but whose
error is not (W_r's low-frequency columns, session 24) shows as the large distance it is. Dropout is
off (its masks would differ between the passes), so the differences are the rounding's alone.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from still.bench import at_least_one, at_least_zero, run_script  # noqa: E402
from still.compressive import attention  # noqa: E402
from still.compressive.model import CompressiveTransformer  # noqa: E402
from still.config import replace  # noqa: E402
from still.data.encoded import load_encoded  # noqa: E402
from still.recipes.lm import TrainStream, load_run  # noqa: E402
from still.train.precision import autocast  # noqa: E402
from still.train.results import format_table  # noqa: E402

FLAGS = ("NATIVE_SCORES", "FP32_POSITION_SCORES", "EXACT_POSITION_GRADIENT")


@contextlib.contextmanager
def flags(*values: bool) -> Iterator[None]:
    """`attention`'s FLAGS set to `values` for the block."""
    before = [getattr(attention, name) for name in FLAGS]
    for name, value in zip(FLAGS, values):
        setattr(attention, name, value)
    try:
        yield
    finally:
        for name, value in zip(FLAGS, before):
            setattr(attention, name, value)


def part(name: str) -> str:
    """A parameter's part of the model: `layers.3.attention.query.weight` -> `attention`, and W_r
    (`layers.3.attention.position.weight`) -> `W_r`."""
    pieces = name.split(".")
    if pieces[0] != "layers":
        return pieces[0]
    return "W_r" if pieces[2:4] == ["attention", "position"] else pieces[2]


def distance(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], names: list[str]) -> float:
    """||grads - ref|| / ||ref|| over the parameters `names`."""
    diff = sum(float((grads[n] - ref[n]).double().pow(2).sum()) for n in names)
    norm = sum(float(ref[n].double().pow(2).sum()) for n in names)
    return (diff / norm) ** 0.5 if norm else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a `still lm train` run directory")
    parser.add_argument("--step", type=at_least_zero, default=1750,  # (-5: `max() arg is an empty sequence`)
                        help="the training step whose data is used")
    parser.add_argument("--steps", type=at_least_one, default=2,
                        help="steps differentiated (each from the same memories)")
    parser.add_argument("--threads", type=at_least_one, default=None, help="CPU threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config, vocab, trained, checkpoint = load_run(args.run)
    model = CompressiveTransformer(replace(config.model, dropout=0.0))
    model.load_state_dict(trained.state_dict())
    # Adam's RMS of each gradient entry (the optimizer holds the parameters in model order); a
    # parameter that has had no gradient yet (the compressor's, before any memory was compressed)
    # has no Adam state, and is left out of Adam's units
    eps = checkpoint.state["optimizer"]["param_groups"][0]["eps"]
    rms = {n: checkpoint.tensors[f"optimizer/{i}/exp_avg_sq"].sqrt() + eps
           for i, (n, _) in enumerate(model.named_parameters()) if f"optimizer/{i}/exp_avg_sq" in checkpoint.tensors}
    model.train()
    corpus = load_encoded(config.corpus, byte_level=config.byte_level, splits=("train",), vocab=vocab)
    stream = TrainStream(corpus.split("train")[0], config)
    state = None
    with torch.no_grad():  # memories (and compressed ones) from three segments, in fp32
        for s in range(args.step, args.step + 3):
            segment = stream.segment(s)
            state = model(segment.inputs, state, reset=segment.reset).state.detach()

    def gradients(precision: str, step: int) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        segment = stream.segment(step)
        with autocast(precision):
            out = model(segment.inputs, state, reset=segment.reset)
            nll = F.cross_entropy(out.logits.flatten(0, 1).float(), segment.targets.flatten(), ignore_index=-100)
            loss = nll if out.compression_loss is None else nll + out.compression_loss
        loss.backward()
        return float(nll.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                     if p.grad is not None}

    from still.compressive import native

    variants = {"bf16, bf16 scores": (False, False, False), "bf16, fp32 position": (False, True, False)}
    if native.attention_library() is not None:
        variants["bf16, native"] = (True, False, False)
    variants["bf16, exact position"] = (True, False, True)
    rows, adam_rows = [], []
    for step in range(args.step + 3, args.step + 3 + args.steps):
        with flags(False, False, False):  # (fp32 is the same with any of them)
            ref_nll, ref = gradients("fp32", step)
        names = list(ref)
        parts = sorted({part(n) for n in ref})
        adam_names = [n for n in names if n in rms]
        adam_parts = sorted({part(n) for n in adam_names})
        ref_adam = {n: ref[n] / rms[n] for n in adam_names}
        ref_norm2 = sum(float(ref[n].double().pow(2).sum()) for n in names)
        for name, values in variants.items():
            with flags(*values):
                nll, grads = gradients("bf16", step)
            projection = sum(float((grads[n].double() * ref[n].double()).sum()) for n in names) / ref_norm2
            norm_ratio = (sum(float(grads[n].double().pow(2).sum()) for n in names) / ref_norm2) ** 0.5
            row = {"step": step, "variant": name, "nll - fp32": f"{nll - ref_nll:+.5f}",
                   "all": f"{distance(grads, ref, names):.4f}", "projection": f"{projection:.4f}",
                   "norm ratio": f"{norm_ratio:.4f}"}
            row.update({p: f"{distance(grads, ref, [n for n in ref if part(n) == p]):.3f}" for p in parts})
            rows.append(row)
            adam = {n: grads[n] / rms[n] for n in adam_names}
            adam_row = {"step": step, "variant": name, "all": f"{distance(adam, ref_adam, adam_names):.4f}"}
            adam_row.update({p: f"{distance(adam, ref_adam, [n for n in adam_names if part(n) == p]):.3f}"
                             for p in adam_parts})
            adam_rows.append(adam_row)
    print(f"run {args.run}: {config.preset} preset, training steps {args.step + 3}..{args.step + 2 + args.steps} "
          f"after three segments of memories; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("relative distance of each gradient from fp32's, ||g - g_fp32|| / ||g_fp32||:")
    print(format_table(rows))
    print("the same in Adam's units (each entry divided by its RMS in the checkpoint's Adam state):")
    if no_state := [n for n in ref if n not in rms]:
        print(f"(left out: {len(no_state)} parameters the checkpoint's Adam state does not hold yet, "
              f"{', '.join(sorted({part(n) for n in no_state}))})")
    print(format_table(adam_rows))


if __name__ == "__main__":
    run_script(main)
