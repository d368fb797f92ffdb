import pytest
import torch

from still.train.optim import OptimConfig, build_optimizer


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


def test_a_state_saved_by_the_default_loop_resumes_in_the_fused_optimizer():
    config = OptimConfig(name="adamw", lr=0.01)
    params = [torch.nn.Parameter(torch.ones(4))]
    loop = torch.optim.AdamW(params, lr=0.01, foreach=False)
    params[0].grad = torch.full((4,), 0.5)
    loop.step()
    resumed = build_optimizer(params, config)
    resumed.load_state_dict(loop.state_dict())
    torch.testing.assert_close(resumed.state[params[0]]["exp_avg"], loop.state[params[0]]["exp_avg"])
    resumed.step()  # runs, fused or not
    assert torch.isfinite(params[0]).all()
