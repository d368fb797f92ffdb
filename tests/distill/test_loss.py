import math

import pytest
import torch
import torch.nn.functional as F

from still.distill.loss import MAX_TEMPERATURE, distillation_loss, logit_matching_loss, soft_dtype, soft_target_loss
from still.distill.teachers import combine_log_probs
from still.errors import StillError

LN3 = math.log(3)


def kl_hand(temperature: float) -> float:
    """KL(softmax([ln 3, 0] / T) || softmax([0, 0] / T)), worked out by hand."""
    a = 3 ** (1 / temperature)  # exp(ln 3 / T)
    p0, p1 = a / (a + 1), 1 / (a + 1)
    return p0 * math.log(p0 / 0.5) + p1 * math.log(p1 / 0.5)


def test_kl_matches_hand_computed_values():
    z = torch.zeros(1, 2)
    v = torch.tensor([[LN3, 0.0]])
    # T = 1: p = (3/4, 1/4), q = (1/2, 1/2)
    assert kl_hand(1.0) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    got = distillation_loss(z, None, v, temperature=1.0, alpha=1.0)
    assert got.item() == pytest.approx(0.1308120, abs=1e-6)
    # T = 2 with the T^2 factor
    got = distillation_loss(z, None, v, temperature=2.0, alpha=1.0)
    assert got.item() == pytest.approx(4 * kl_hand(2.0), rel=1e-5)
    assert got.item() == pytest.approx(0.1453631, abs=1e-6)  # p = (sqrt3, 1) / (sqrt3 + 1)


def test_mixture_with_hard_labels_and_batchmean():
    z = torch.zeros(2, 2)
    v = torch.tensor([[LN3, 0.0], [0.0, 0.0]])  # second example: identical distributions, KL 0
    y = torch.tensor([0, 1])
    alpha = 0.25
    got = distillation_loss(z, y, v, temperature=1.0, alpha=alpha)
    # batchmean: (0.1308 + 0) / 2; cross entropy of uniform over 2 classes: ln 2
    expected = alpha * (kl_hand(1.0) / 2) + (1 - alpha) * math.log(2)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_batchmean_is_the_mean_of_per_example_losses():
    z, v = torch.randn(8, 10), torch.randn(8, 10)
    whole = soft_target_loss(z, F.log_softmax(v / 3, -1), 3.0)
    parts = torch.stack([soft_target_loss(z[i : i + 1], F.log_softmax(v[i : i + 1] / 3, -1), 3.0) for i in range(8)])
    assert whole.item() == pytest.approx(parts.mean().item(), rel=1e-5)


def test_identical_logits_give_zero_kl():
    z = torch.randn(16, 10) * 5
    for temperature in (0.5, 1.0, 20.0):
        assert (distillation_loss(z, None, z.clone(), temperature=temperature, alpha=1.0).item()
                == pytest.approx(0, abs=1e-6))


def test_alpha_endpoints():
    z, v, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    assert distillation_loss(z, y, v, temperature=4.0, alpha=0.0).item() == pytest.approx(F.cross_entropy(z, y).item())
    soft = soft_target_loss(z, F.log_softmax(v / 4, -1), 4.0)
    assert distillation_loss(z, None, v, temperature=4.0, alpha=1.0).item() == pytest.approx(soft.item())


def _soft_grad_norm(temperature: float, scaled: bool) -> float:
    torch.manual_seed(1)
    z = (torch.randn(64, 10) * 2).requires_grad_()
    v = torch.randn(64, 10) * 2
    loss = soft_target_loss(z, F.log_softmax(v / temperature, -1), temperature)
    if not scaled:
        loss = loss / temperature**2
    loss.backward()
    return z.grad.norm().item()


def test_t_squared_keeps_gradient_scale_about_constant():
    temperatures = (2.0, 4.0, 8.0, 20.0)
    scaled = [_soft_grad_norm(t, True) for t in temperatures]
    unscaled = [_soft_grad_norm(t, False) for t in temperatures]
    assert max(scaled) / min(scaled) < 1.6
    # without T^2 the gradient shrinks about as 1/T^2: a factor of ~100 from T = 2 to T = 20
    assert unscaled[0] / unscaled[-1] > 50


def test_logit_matching_is_the_high_temperature_limit():
    # T = 100: within 0.2% of the limit on 50 seeds (the O(1/T) term of the expansion)
    z, v = torch.randn(32, 10), torch.randn(32, 10)
    high_t = soft_target_loss(z, F.log_softmax(v.double() / 100, -1), 100.0)
    assert high_t.item() == pytest.approx(logit_matching_loss(z, v).item(), rel=1e-2)
    via_api = distillation_loss(z, None, v, temperature=1.0, alpha=1.0, soft_loss="logit_matching")
    assert via_api.item() == pytest.approx(logit_matching_loss(z, v).item())


def _kl_exact(z: torch.Tensor, v: torch.Tensor, temperature: float) -> float:
    """T^2 KL(softmax(v / T) || softmax(z / T)), batchmean, in 40-digit arithmetic (mpmath)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(40):
        total = mpmath.mpf(0)
        for zs, vs in zip(z.tolist(), v.tolist()):
            a = [mpmath.mpf(x) / temperature for x in vs]
            b = [mpmath.mpf(x) / temperature for x in zs]
            la, lb = mpmath.log(mpmath.fsum(map(mpmath.exp, a))), mpmath.log(mpmath.fsum(map(mpmath.exp, b)))
            total += mpmath.fsum(mpmath.exp(x - la) * ((x - la) - (y - lb)) for x, y in zip(a, b))
        return float(total / len(z) * temperature**2)


@pytest.mark.parametrize("spread", [5.0, 0.01])
def test_high_temperatures_keep_the_soft_term_exact(spread):
    """Above T = 20 the soft term is computed in float64. In float32 it was 2% off at T = 1e4 and
    negative at 1e5: the KL of two nearly uniform distributions, times T^2, was float32's rounding.
    Checked against 40-digit arithmetic to 1e-6 (absolute; the loss is about 10 for a student far from
    its teacher, 4e-5 for one 0.01 from it); the gradient is T (q - p) / B."""
    torch.manual_seed(0)
    v = torch.randn(50, 10) * 5
    z = (v + torch.randn(50, 10) * spread).requires_grad_()
    for temperature in (1e3, 1e4, 1e5):
        z.grad = None
        loss = distillation_loss(z, None, v, temperature=temperature, alpha=1.0)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(_kl_exact(z.detach(), v, temperature), rel=1e-6, abs=1e-6)
        loss.backward()
        zd, vd = z.detach().double(), v.double()
        expected = temperature * (F.softmax(zd / temperature, -1) - F.softmax(vd / temperature, -1)) / 50
        torch.testing.assert_close(z.grad.double(), expected, rtol=1e-5, atol=1e-12)
        # an ensemble's soft targets (float64 from combine_log_probs) give the same loss
        targets = combine_log_probs(v[None], temperature)
        assert targets.dtype == torch.float64
        via_targets = distillation_loss(z, None, teacher_log_probs=targets, temperature=temperature, alpha=1.0)
        assert via_targets.item() == pytest.approx(loss.item(), rel=1e-9)
    # at and below T = 20, float32: its rounding (`test_the_soft_terms_value_at_low_temperatures_is_within_its_
    # documented_rounding`; the near student's 5.06e-5 read 5.46e-5)
    assert soft_dtype(20.0) == torch.float32 and combine_log_probs(v[None], 20.0).dtype == torch.float32
    loss = distillation_loss(z, None, v, temperature=20.0, alpha=1.0)
    assert loss.item() == pytest.approx(_kl_exact(z.detach(), v, 20.0), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("classes", [2, 10, 1000])
def test_the_soft_terms_value_at_low_temperatures_is_within_its_documented_rounding(classes):
    """At T <= 20 in float32 the value carries the log-normalisers' rounding times T^2, about
    1e-7 T^2 (log C + the logits' range / T) (a probe read 9.7e-5 of a near student's 4.7e-3 at
    T = 20 over 1000 classes, against a docstring that said 1e-5); the gradient is T (q - p) / B to
    1e-5; float64 logits give the float64 value (they were computed in float32)."""
    generator = torch.Generator().manual_seed(classes)
    for spread, scale in ((0.1, 1.0), (0.01, 5.0), (3.0, 5.0)):
        v = torch.randn(8, classes, generator=generator) * scale
        z = (v + spread * torch.randn(8, classes, generator=generator)).requires_grad_()
        for temperature in (1.0, 4.0, 20.0):
            z.grad = None
            loss = distillation_loss(z, None, v, temperature=temperature, alpha=1.0)
            zd, vd = z.detach().double(), v.double()
            exact = temperature**2 * F.kl_div(F.log_softmax(zd / temperature, -1), F.log_softmax(vd / temperature, -1),
                                              log_target=True, reduction="batchmean").item()
            spread_of_logits = max(float(zd.max() - zd.min()), float(vd.max() - vd.min()))
            bound = 2e-7 * temperature**2 * (math.log(classes) + spread_of_logits / temperature)
            assert loss.dtype == torch.float32 and abs(loss.item() - exact) <= bound, (spread, temperature)
            loss.backward()
            expected = temperature * (F.softmax(zd / temperature, -1) - F.softmax(vd / temperature, -1)) / 8
            torch.testing.assert_close(z.grad.double(), expected, rtol=1e-4, atol=1e-6)
            wide = distillation_loss(zd, None, vd, temperature=temperature, alpha=1.0)
            assert wide.dtype == torch.float32 and wide.item() == pytest.approx(exact, rel=1e-7, abs=1e-12)


def test_temperatures_above_the_limit_are_refused_naming_logit_matching():
    z, v = torch.randn(4, 10), torch.randn(4, 10)
    distillation_loss(z, None, v, temperature=MAX_TEMPERATURE, alpha=1.0)
    for call in (lambda: distillation_loss(z, None, v, temperature=2e5, alpha=1.0),
                 lambda: soft_target_loss(z, F.log_softmax(v, -1), 2e5),
                 lambda: combine_log_probs(v[None], 2e5)):
        with pytest.raises(StillError, match=r"temperature 200000.0 is above 100000.*soft_loss='logit_matching'"):
            call()


def test_temperatures_below_the_limit_or_beyond_floats_are_refused():
    """Below MIN_TEMPERATURE the soft term's gradient is at most 2T: a student distilled at 1e-30
    kept its initial weights, and one at 1e-300 stopped as 'diverged' (NaN: the logits over T
    overflow float32). An int beyond float's range raised Python's OverflowError."""
    from still.distill.loss import MIN_TEMPERATURE, check_temperature

    z, v = torch.randn(4, 10), torch.randn(4, 10)
    assert torch.isfinite(distillation_loss(z, None, v, temperature=MIN_TEMPERATURE, alpha=1.0))
    check_temperature(torch.tensor(MIN_TEMPERATURE))  # (in float32: 0.009999999776, the limit as given)
    for temperature in (1e-3, 1e-30, 1e-300, 5e-324):
        with pytest.raises(StillError, match=f"temperature {temperature!r} is below 0.01"):
            distillation_loss(z, None, v, temperature=temperature, alpha=1.0)
    with pytest.raises(StillError, match="temperature must be a finite number > 0, got 1148130695"):
        check_temperature(2**2000)


def test_logit_matching_ignores_a_constant_shift():
    z, v = torch.randn(4, 10), torch.randn(4, 10)
    assert logit_matching_loss(z + 5, v).item() == pytest.approx(logit_matching_loss(z, v).item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan")])
def test_bad_temperature_is_named(temperature):
    with pytest.raises(StillError, match="temperature must be"):
        distillation_loss(torch.zeros(1, 3), None, torch.zeros(1, 3), temperature=temperature, alpha=1.0)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_bad_alpha_is_named(alpha):
    with pytest.raises(StillError, match=rf"alpha .* must be in \[0, 1\], got {alpha}"):
        distillation_loss(torch.zeros(1, 3), torch.tensor([0]), torch.zeros(1, 3), temperature=1.0, alpha=alpha)


def test_class_count_mismatch_is_named():
    with pytest.raises(StillError, match="teacher has 12 classes but the student has 10"):
        distillation_loss(torch.zeros(4, 10), None, torch.zeros(4, 12), temperature=2.0, alpha=1.0)


def test_labels_of_any_integer_dtype_and_no_other():
    z, v, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 4, 2, -100])
    expected = distillation_loss(z, y, v, temperature=2.0, alpha=0.5)
    for dtype in (torch.int8, torch.int16, torch.int32):
        torch.testing.assert_close(distillation_loss(z, y.to(dtype), v, temperature=2.0, alpha=0.5), expected)
    for bad in (y.float(), y > 0, y.to(torch.complex64)):
        with pytest.raises(StillError, match=f"labels must be class numbers \\(integers\\), got {bad.dtype}"):
            distillation_loss(z, bad, v, temperature=2.0, alpha=0.5)


@pytest.mark.parametrize("soft_loss", ["kl", "logit_matching"])
def test_an_empty_batch_gives_zero_not_nan(soft_loss):
    z = torch.zeros(0, 5, requires_grad=True)
    for alpha, labels in ((1.0, None), (0.5, torch.zeros(0, dtype=torch.int64))):
        loss = distillation_loss(z, labels, torch.zeros(0, 5), temperature=4.0, alpha=alpha, soft_loss=soft_loss)
        assert loss.item() == 0.0
        loss.backward()


def test_labels_required_below_alpha_one():
    with pytest.raises(StillError, match="labels are needed"):
        distillation_loss(torch.zeros(2, 3), None, torch.zeros(2, 3), temperature=2.0, alpha=0.5)


def test_loss_is_float32_for_bf16_logits():
    z = torch.randn(4, 10).bfloat16()
    v = torch.randn(4, 10).bfloat16()
    loss = distillation_loss(z, torch.tensor([1, 2, 3, 4]), v, temperature=2.0, alpha=0.5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_a_class_the_teacher_rules_out_adds_nothing():
    """A teacher logit of -inf (a masked class: p = 0) contributes 0 log 0 = 0 to the KL, not nan."""
    torch.manual_seed(0)
    z, v = torch.randn(3, 5), torch.randn(3, 5)
    v[:, 0] = float("-inf")
    p, log_q = F.softmax(v / 2, -1), F.log_softmax(z / 2, -1)
    expected = 4 * (p[:, 1:] * (p[:, 1:].log() - log_q[:, 1:])).sum(-1).mean()
    got = distillation_loss(z, None, v, temperature=2.0, alpha=1.0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_infinite_teacher_output_is_not_dropped_from_the_loss(bad):
    """A teacher row holding NaN (or +inf) made that example's soft term 0, silently: the loss was
    the hard term alone, finite, and no finite-loss check could see the teacher had gone wrong (a
    probe). A masked class (-inf) still adds nothing."""
    torch.manual_seed(0)
    z, v, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    v[1, 2] = bad
    for alpha in (1.0, 0.9):
        assert not torch.isfinite(distillation_loss(z, y, v, temperature=20.0, alpha=alpha))
        log_p = torch.full((4, 5), bad)  # soft targets given directly, as a cache gives them
        assert not torch.isfinite(distillation_loss(z, y, temperature=4.0, alpha=alpha, teacher_log_probs=log_p))


def test_labels_outside_the_classes_are_named():
    """A label past the class count, or negative other than -100, raised PyTorch's IndexError."""
    z, v = torch.randn(3, 5), torch.randn(3, 5)
    for labels, bad in (([1, 5, 0], 5), ([1, -1, 0], -1), ([7, 2, -3], 7)):
        with pytest.raises(StillError, match=f"label {bad} is not a class number: the logits have 5 classes"):
            distillation_loss(z, torch.tensor(labels, dtype=torch.int16), v, temperature=2.0, alpha=0.5)
    assert torch.isfinite(distillation_loss(z, torch.tensor([-100, 4, 0]), v, temperature=2.0, alpha=0.5))


def test_no_gradient_reaches_the_teacher():
    z = torch.randn(4, 6, requires_grad=True)
    v = torch.randn(4, 6, requires_grad=True)
    for soft_loss in ("kl", "logit_matching"):
        distillation_loss(z, torch.tensor([0, 1, 2, 3]), v, temperature=3.0, alpha=0.7, soft_loss=soft_loss).backward()
        assert v.grad is None and z.grad.abs().sum() > 0


def test_temperature_and_alpha_as_numpy_or_tensor_scalars():
    import numpy as np

    z, v, y = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    expected = distillation_loss(z, y, v, temperature=2.0, alpha=0.25)
    for t, a in ((np.float32(2.0), np.float64(0.25)), (torch.tensor(2.0), torch.tensor(0.25)),
                 (torch.tensor(2), torch.tensor(0.25))):  # (an integer tensor was "not a finite number > 0")
        torch.testing.assert_close(distillation_loss(z, y, v, temperature=t, alpha=a), expected)
    for bad in (True, torch.tensor(True), torch.tensor([2.0, 3.0])):
        with pytest.raises(StillError, match="temperature must be a finite number > 0"):
            distillation_loss(z, y, v, temperature=bad, alpha=0.25)


def test_inputs_that_are_not_tensors_are_named():
    """Probes: labels as a list or a NumPy array, NumPy teacher logits: Python's AttributeError."""
    z, v, y = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    for kwargs, message in (({"labels": [0, 1, 2, 3]}, "labels must be a tensor, got a list"),
                            ({"labels": y.numpy()}, "labels must be a tensor, got a ndarray"),
                            ({"teacher_logits": v.numpy()}, "teacher_logits must be a tensor, got a ndarray"),
                            ({"student_logits": z.tolist()}, "student_logits must be a tensor, got a list")):
        args = {"student_logits": z, "labels": y, "teacher_logits": v} | kwargs
        with pytest.raises(StillError, match=message):
            distillation_loss(**args, temperature=2.0, alpha=0.5)
    with pytest.raises(StillError, match="student_logits must be a tensor, got a NoneType"):
        distillation_loss(None, y, v, temperature=2.0, alpha=0.5)
    # the losses and the ensemble's soft targets on their own (they were an AttributeError)
    log_p = F.log_softmax(v, -1)
    for loss, args, message in ((soft_target_loss, (z.tolist(), log_p, 2.0), "student_logits .* got a list"),
                                (soft_target_loss, (z, log_p.numpy(), 2.0), "teacher_log_probs .* got a ndarray"),
                                (logit_matching_loss, (z.numpy(), v), "student_logits .* got a ndarray"),
                                (logit_matching_loss, (z, v.tolist()), "teacher_logits .* got a list"),
                                (combine_log_probs, (v[None].numpy(), 2.0), "member_logits .* got a ndarray")):
        with pytest.raises(StillError, match=f"{message} \\(torch.as_tensor makes one\\)"):
            loss(*args)


def test_unlabelled_examples_drop_out_of_the_hard_term():
    """Label -100 (no label) drops an example from the hard term; a batch with no labelled example
    has a hard term of 0, not 0/0 = nan, and keeps the soft term's gradient."""
    torch.manual_seed(0)
    z, v = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5)
    soft = distillation_loss(z, None, v, temperature=2.0, alpha=1.0)
    none = distillation_loss(z, torch.full((4,), -100), v, temperature=2.0, alpha=0.5)
    assert torch.isfinite(none) and none.item() == pytest.approx(0.5 * soft.item(), rel=1e-6)
    none.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    some = torch.tensor([0, -100, 2, -100])
    got = distillation_loss(z, some, v, temperature=2.0, alpha=0.5)
    expected = 0.5 * soft + 0.5 * F.cross_entropy(z[[0, 2]], some[[0, 2]])  # the mean over the labelled two
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("soft_loss, temperature", [("kl", 1.0), ("kl", 3.0), ("logit_matching", 1.0)])
def test_log_probabilities_stand_for_logits(soft_loss, temperature):
    """A student and a teacher that end in log_softmax: the same loss, and the same gradient
    reaching the logits before it."""
    torch.manual_seed(0)
    z, v, y = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10), torch.randint(0, 10, (8,))
    losses, grads = [], []
    for ending in (lambda t: t, lambda t: F.log_softmax(t, -1)):
        loss = distillation_loss(ending(z), y, ending(v), temperature=temperature, alpha=0.7, soft_loss=soft_loss)
        (grad,) = torch.autograd.grad(loss, z)
        losses.append(loss.item())
        grads.append(grad)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_teacher_log_probs_that_are_not_log_probabilities_are_named():
    """Raw logits given as `teacher_log_probs` gave a loss (64.1) unsaid (a probe). Log-probabilities
    in bf16 pass, as do masked classes (-inf) and a NaN row (left to the finite-loss check)."""
    z, v = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(StillError, match=r"teacher_log_probs must be log-probabilities .* row 0's sums to"):
        distillation_loss(z, None, temperature=2.0, alpha=1.0, teacher_log_probs=v)
    log_p = F.log_softmax(v / 2.0, -1)
    distillation_loss(z, None, temperature=2.0, alpha=1.0, teacher_log_probs=log_p.bfloat16())
    masked = F.log_softmax((v / 2.0).masked_fill(torch.arange(5) == 0, float("-inf")), -1)
    assert torch.isfinite(distillation_loss(z, None, temperature=2.0, alpha=1.0, teacher_log_probs=masked))
    log_p[1] = float("nan")
    assert torch.isnan(distillation_loss(z, None, temperature=2.0, alpha=1.0, teacher_log_probs=log_p))
