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
def test_cpu_adam_is_fused_and_every_optimizer_updates_as_the_default_loop(name):
    config = OptimConfig(name=name, lr=0.01, weight_decay=0.05)
    built = build_optimizer([torch.nn.Parameter(torch.zeros(3))], config)
    assert built.param_groups[0]["fused"] is (True if name != "sgd" else None)
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
