import math
import re

import pytest
import torch

from still.errors import StillError
from still.train.optim import OptimConfig, build_optimizer, build_scheduler, lr_factor


def _run(optimizer_of, steps: int = 12) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40, 30)), torch.nn.Parameter(torch.randn(30))]
    optimizer = optimizer_of(params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_cpu_optimizers_are_fused_and_update_as_the_default_loop(name):
    config = OptimConfig(name=name, lr=0.01, weight_decay=0.05)
    built = build_optimizer([torch.nn.Parameter(torch.zeros(3))], config)
    assert built.param_groups[0]["fused"] is True
    fused = _run(lambda params: build_optimizer(params, config))
    defaults = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.05,
                                                  foreach=False),
                "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.05, foreach=False),
                "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.05, foreach=False)}
    loop = _run(defaults[name])
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused[0], _run(lambda params: build_optimizer(params, config), steps=0)[0])


@pytest.mark.parametrize(("name", "dtype"), [("sgd", torch.bfloat16), ("sgd", torch.float16),
                                             ("adam", torch.bfloat16), ("adamw", torch.bfloat16)])
def test_half_precision_parameters_move_as_the_default_loop_moves_them(name, dtype):
    """PyTorch 2.13's fused CPU SGD leaves bf16 and fp16 parameters unchanged: not used for them.
    (fp16 Adam overflows in the loop as fused: its eps, 1e-8, is 0 in fp16.)"""
    config = OptimConfig(name=name, lr=0.1, betas=(0.9, 0.99))
    start = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    moved = []
    for make in (lambda ps: build_optimizer(ps, config),
                 {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, foreach=False),
                  "adam": lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.9, 0.99), foreach=False),
                  "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.1, betas=(0.9, 0.99), foreach=False)}[name]):
        param = torch.nn.Parameter(start.clone())
        optimizer = make([param])
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            param.grad = torch.randn(64, 64, generator=gen).to(dtype)
            optimizer.step()
        moved.append(param.detach().float() - start.float())
    assert moved[1].abs().mean() > 0.05
    assert (moved[0] - moved[1]).abs().max() <= 0.02  # one bf16 rounding of weights near 1-2


@pytest.mark.parametrize(("name", "loop_of", "key"), [
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=False), "exp_avg"),
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, nesterov=True, foreach=False), "momentum_buffer"),
])
def test_a_state_saved_by_the_default_loop_resumes_in_the_fused_optimizer(name, loop_of, key):
    """Checkpoints written before an optimizer was fused (SGD's before session 46) load into
    `build_optimizer`'s optimizer with their state, and the next step is the loop's. (PyTorch's
    `load_state_dict` takes every group setting from the checkpoint, `fused` among them: such a
    run goes on in the loop.)"""
    config = OptimConfig(name=name, lr=0.01, momentum=0.9)
    params, twin = [torch.nn.Parameter(torch.ones(4))], [torch.nn.Parameter(torch.ones(4))]
    loop, loop_twin = loop_of(params), loop_of(twin)
    for p in params + twin:
        p.grad = torch.full((4,), 0.5)
    loop.step()
    loop_twin.step()
    resumed = build_optimizer(params, config)
    resumed.load_state_dict(loop.state_dict())
    torch.testing.assert_close(resumed.state[params[0]][key], loop.state[params[0]][key])
    for p in params + twin:
        p.grad = torch.full((4,), 0.25)
    resumed.step()
    loop_twin.step()
    torch.testing.assert_close(params[0], twin[0])


def test_a_fused_step_bumps_the_parameters_versions():
    """Inference caches key on parameter versions, which PyTorch's fused kernels leave unchanged."""
    params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(2))]
    optimizer = build_optimizer(params, OptimConfig(name="adamw", lr=0.01))
    before = [p._version for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(p._version > v for p, v in zip(params, before))


def test_compressive_evaluation_after_a_fused_step_sees_the_new_weights():
    """The position projection cached by one evaluation is not reused after an optimizer step."""
    from still.compressive import CompressiveConfig, CompressiveTransformer

    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=16,
                                                     mem_len=4, c_mem_len=4, dropout=0.0))
    optimizer = build_optimizer(model.parameters(), OptimConfig(name="adamw", lr=0.1))
    tokens = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(1))

    def evaluate():
        model.eval()
        with torch.no_grad():
            return model(tokens).logits

    evaluate()  # fills the caches
    model.train()
    out = model(tokens)
    torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens.flatten()).backward()
    optimizer.step()
    after = evaluate()
    for layer in model.layers:
        layer.attention._positions = None  # what a fresh evaluation computes
    torch.testing.assert_close(after, evaluate(), rtol=0, atol=0)


@pytest.mark.parametrize("changes, message", [
    ({"name": "rmsprop"}, "OptimConfig.name: 'rmsprop' is not one of 'sgd', 'adam', 'adamw'"),
    ({"name": "Adam"}, "OptimConfig.name: 'Adam' is not one of"),
    ({"schedule": "linear"}, "OptimConfig.schedule: 'linear' is not one of 'constant', 'cosine', 'onecycle'"),
    ({"betas": (0.9,)}, r"OptimConfig.betas: expected 2 items, got 1"),
    ({"betas": (0.9, "0.99")}, r"OptimConfig.betas\[1\]: expected a number, got '0.99'"),
])
def test_bad_names_and_betas_are_refused_when_built_in_python(changes, message):
    with pytest.raises(StillError, match=message):
        OptimConfig(**changes)


def test_build_optimizer_refuses_an_unknown_name_rather_than_building_adamw():
    config = OptimConfig(name="adam")
    object.__setattr__(config, "name", "rmsprop")  # past the config's own check
    with pytest.raises(StillError, match="unknown optimizer 'rmsprop'; known: 'sgd', 'adam', 'adamw'"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], config)


def test_an_optimizer_or_schedule_that_cannot_be_built_is_named():
    """Probes: no trainable parameters, a dict for the config, 0 or 2.5 steps (PyTorch's ValueErrors,
    an AttributeError; the cosine schedule took 0 steps)."""
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    for params, message in (([], "no trainable parameters to optimize: none were given"),
                            ([frozen, frozen], "all 2 given are frozen (requires_grad=False)")):
        with pytest.raises(StillError, match=re.escape(message)):
            build_optimizer(params, OptimConfig(name="adam"))
    with pytest.raises(StillError, match="the optimizer's config must be an OptimConfig, got a dict"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2))], {"name": "sgd"})
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimConfig())
    for schedule in ("onecycle", "cosine", "constant"):
        for total_steps in (0, -5, 2.5, True):
            with pytest.raises(StillError, match=re.escape(f"total_steps must be an int >= 1, got {total_steps!r}")):
                build_scheduler(optimizer, OptimConfig(schedule=schedule), total_steps)


def _rates(config: OptimConfig, total_steps: int) -> list[float]:
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = build_optimizer(params, config)
    scheduler = build_scheduler(optimizer, config, total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("warmup_fraction, total_steps", [(0.1, 10), (0.05, 20), (0.25, 4), (0.05, 10), (0.1, 15)])
def test_one_cycle_warm_up_spans_at_least_two_steps(warmup_fraction, total_steps):
    """OneCycleLR divides by zero where the warm-up is exactly one step, and has no rise below one:
    a warm-up asked for lasts two steps, lr / 25 then the peak."""
    rates = _rates(OptimConfig(lr=1.0, schedule="onecycle", warmup_fraction=warmup_fraction), total_steps)
    assert rates[0] == pytest.approx(1 / 25) and rates[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] == pytest.approx(1 / 25e4)


def test_one_cycle_keeps_a_longer_warm_up_and_honours_none():
    rates = _rates(OptimConfig(lr=1.0, schedule="onecycle", warmup_fraction=0.3), 10)  # the peak at step 2
    assert rates[:4] == pytest.approx([0.04, 0.52, 1.0, 0.95], abs=1e-3)
    none = _rates(OptimConfig(lr=1.0, schedule="onecycle", warmup_fraction=0.0), 10)  # not PyTorch's 0.3
    assert none[0] == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)), rel=1e-3)  # 1/10 of the way down
    assert all(a > b for a, b in zip(none, none[1:]))
    two_steps = _rates(OptimConfig(lr=1.0, schedule="onecycle", warmup_fraction=0.5), 2)  # no room for a warm-up
    assert two_steps[0] == pytest.approx(0.5, rel=1e-4)
    # one step (a stage of one batch) at the peak: OneCycleLR put it at the decay's end, lr / 25e4,
    # and the stage's weights moved by 2e-8 (a probe: --train-subset 100 of a batch of 128)
    for warmup_fraction in (0.0, 0.3):
        assert _rates(OptimConfig(lr=1.0, schedule="onecycle", warmup_fraction=warmup_fraction), 1) == [1.0]


def test_the_cosine_schedule_is_as_documented():
    """lr_factor's docstring: the warm-up rounds down and starts at 1 / warmup; the cosine reaches
    min_lr_ratio one step past the last."""
    factors = [lr_factor(s, 4, OptimConfig(lr=1.0, warmup_fraction=0.5)) for s in range(4)]
    assert factors == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert lr_factor(0, 10, OptimConfig(lr=1.0, warmup_fraction=0.05)) == 1.0  # int(0.5): no warm-up
    assert lr_factor(4, 5, OptimConfig(lr=1.0, min_lr_ratio=0.1)) > 0.1
