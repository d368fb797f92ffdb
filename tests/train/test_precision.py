import pytest
import torch
import torch.nn.functional as F

from still.compressive.model import CompressiveConfig, CompressiveTransformer
from still.errors import StillError
from still.train import precision as precision_module
from still.train.loop import IndexBatches, Trainer
from still.train.optim import OptimConfig, build_optimizer
from still.train.precision import autocast, bf16_slower, check_precision, this_threads_modes


def test_bad_precision_is_named():
    with pytest.raises(StillError, match="precision must be one of fp32, bf16, got 'fp16'"):
        check_precision("fp16")


def test_bf16_slower_names_cpus_without_bf16_instructions(monkeypatch):
    """bf16 on a CPU without bf16 matrix instructions (oneDNN's reading) is said to be slower; not
    fp32, not where the CPU has them or PyTorch cannot say, not on CUDA."""
    monkeypatch.setattr(precision_module, "_cpu_has_bf16", lambda: False)
    assert "no bf16 matrix instructions" in bf16_slower("bf16", "cpu")
    assert bf16_slower("fp32", "cpu") is None
    assert bf16_slower("bf16", "cuda") is None
    for answer in (True, None):
        monkeypatch.setattr(precision_module, "_cpu_has_bf16", lambda answer=answer: answer)
        assert bf16_slower("bf16", torch.device("cpu")) is None
    monkeypatch.undo()
    assert precision_module._cpu_has_bf16() in (True, False, None)


def test_autocast_computes_matmuls_in_bf16_and_fp32_is_untouched():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with autocast("bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("fp32"):
        assert layer(x).dtype == torch.float32


def test_bf16_trainer_keeps_float32_weights_and_optimizer_state():
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    optimizer = build_optimizer(model.parameters(), OptimConfig(name="adam", lr=1e-2))
    losses = []

    def loss_fn(m, idx):
        logits = m(x[idx])
        assert logits.dtype == torch.bfloat16  # the forward pass really runs in bf16
        loss = F.cross_entropy(logits.float(), y[idx])
        losses.append(loss.item())
        return loss

    def full_loss():
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    before = full_loss()
    Trainer(model, loss_fn, optimizer, precision="bf16").fit(IndexBatches(64, 16), epochs=20)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for s in optimizer.state.values() for v in s.values() if v.is_floating_point())
    assert full_loss() < 0.7 * before  # it learns


def test_trainer_rejects_a_bad_precision():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(StillError, match="'half'"):
        Trainer(model, lambda m, b: m(b).sum(), torch.optim.SGD(model.parameters(), lr=0.1), precision="half")


def test_bf16_model_matches_fp32_closely_and_keeps_fp32_memories():
    torch.manual_seed(0)
    model = CompressiveTransformer(CompressiveConfig(vocab_size=20, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                                     mem_len=8, c_mem_len=4, compression_rate=2)).eval()
    tokens = torch.randint(0, 20, (2, 24))
    with torch.no_grad():
        ref_state = state = None
        for chunk in tokens.split(8, dim=1):
            ref = model(chunk, ref_state)
            ref_state = ref.state
            with autocast("bf16"):
                out = model(chunk, state)
            state = out.state
            ref_loss = F.cross_entropy(ref.logits.flatten(0, 1), chunk.flatten())
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), chunk.flatten())
            assert abs(loss.item() - ref_loss.item()) < 0.02 * ref_loss.item()
    assert all(m.dtype == torch.float32 for m in state.memory + state.compressed)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_another_thread_computes_under_this_threads_modes(grad, precision):
    import threading

    seen = {}

    def worker(enter):
        with enter():
            seen["grad"], seen["autocast"] = torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")
            seen["product"] = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype

    with torch.set_grad_enabled(grad), autocast(precision):
        enter = this_threads_modes("cpu")
    # entered later, in a fresh thread (which starts with gradients on and no autocast)
    thread = threading.Thread(target=worker, args=(enter,))
    thread.start()
    thread.join()
    assert seen == {"grad": grad, "autocast": precision == "bf16",
                    "product": torch.bfloat16 if precision == "bf16" else torch.float32}
