import pytest
import torch

from still.compressive.compression import Compressor, Decoder


def test_pooling_on_known_values():
    old = torch.arange(8, dtype=torch.float32).view(1, 8, 1).repeat(1, 1, 2)  # (1, 8, 2)
    assert Compressor("max", 2, 4)(old)[0, :, 0].tolist() == [3, 7]
    assert Compressor("mean", 2, 4)(old)[0, :, 0].tolist() == [1.5, 5.5]


def test_conv_has_no_bias_and_sees_exactly_its_group():
    comp = Compressor("conv", 3, 4)
    assert comp.conv.bias is None
    old = torch.randn(2, 12, 3)
    out = comp(old)
    assert out.shape == (2, 3, 3)
    changed = old.clone()
    changed[:, 4:8] += 1  # only the second group
    diff = (comp(changed) - out).abs().sum(-1)
    assert diff[:, 0].max() == 0 and diff[:, 2].max() == 0 and diff[:, 1].min() > 0


def test_dilated_shape_and_causality():
    comp = Compressor("dilated", 3, 4)
    old = torch.randn(1, 16, 3)
    out = comp(old)
    assert out.shape == (1, 4, 3)
    changed = old.clone()
    changed[:, -1] += 1  # the newest memory can only affect the last compressed slot
    assert (comp(changed) - out)[:, :3].abs().max() == 0
    # each window reads its own group only: a group's last memory moves its slot and no other
    changed = old.clone()
    changed[:, 3] += 1
    diff = (comp(changed) - out).abs().sum(-1)
    assert diff[0, 0] > 0 and diff[0, 1:].max() == 0
    # and the memories it reads (offsets 2k - 3 of the group, k = 0..3: the 2nd and 4th) are the only ones seen
    for i, seen in enumerate([False, True, False, True]):
        changed = old.clone()
        changed[:, 4 + i] += 1
        assert bool((comp(changed) - out).abs().max() > 0) == seen, i


def test_most_used_keeps_the_most_attended_in_order():
    old = torch.arange(8, dtype=torch.float32).view(1, 8, 1)
    received = torch.tensor([[0.1, 5.0, 0.2, 0.3, 0.0, 0.1, 7.0, 0.2]])
    out = Compressor("most_used", 1, 4)(old, received)
    assert out.flatten().tolist() == [1.0, 6.0]


def test_errors():
    with pytest.raises(ValueError, match="multiple of the rate 4"):
        Compressor("mean", 2, 4)(torch.randn(1, 6, 2))
    with pytest.raises(ValueError, match="needs the attention"):
        Compressor("most_used", 2, 4)(torch.randn(1, 8, 2))
    with pytest.raises(ValueError, match="compression must be one of"):
        Compressor("zip", 2, 4)


def test_decoder_inverts_shapes():
    assert Decoder(3, 4)(torch.randn(2, 5, 3)).shape == (2, 20, 3)


@pytest.mark.parametrize("rate", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["conv", "dilated", "max", "mean"])
def test_matches_the_torch_convolution_and_pooling(kind, rate):
    """The compressors run as matrix products over windows; they must equal the torch ops they stand for."""
    import torch.nn.functional as F

    torch.manual_seed(rate)
    f = Compressor(kind, 8, rate)
    old = torch.randn(2, 4 * rate, 8)
    x = old.transpose(1, 2)  # (B, d, n)
    groups = F.pad(x.reshape(2, 8, 4, rate).transpose(1, 2).reshape(8, 8, rate), (rate - 1, 0))  # (B*n/c, d, 2c-1)
    expected = {"conv": lambda: f.conv(x),
                "dilated": lambda: f.conv(groups).view(2, 4, 8).transpose(1, 2),  # each group padded on its own
                "max": lambda: F.max_pool1d(x, rate, rate), "mean": lambda: F.avg_pool1d(x, rate, rate)}[kind]()
    torch.testing.assert_close(f(old), expected.transpose(1, 2))


@pytest.mark.parametrize("rate", [1, 2, 4])
def test_decoder_matches_the_transposed_convolution(rate):
    torch.manual_seed(rate)
    decoder = Decoder(8, rate)
    z = torch.randn(2, 3, 8)
    torch.testing.assert_close(decoder(z), decoder.deconv(z.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("rate", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["conv", "dilated"])
def test_one_window_as_a_sum_over_taps(kind, rate):
    """What the one-token decoder computes: c memories compressed as a sum of per-tap products."""
    torch.manual_seed(rate)
    f = Compressor(kind, 8, rate)
    old = torch.randn(2, rate, 8)
    rows, weights = f.one_window()
    assert weights.shape == (len(rows), 8, 8) and all(0 <= r < rate for r in rows)
    by_taps = sum(old[:, r] @ w.T for r, w in zip(rows, weights))  # (B, d)
    torch.testing.assert_close(by_taps[:, None], f(old))


@pytest.mark.parametrize("kind", ["conv", "dilated"])
def test_inference_under_autocast_casts_the_weight_once_while_it_is_unchanged(kind):
    f = Compressor(kind, 8, 2)
    old = torch.randn(2, 6, 8)
    with torch.autocast("cpu", torch.bfloat16):
        trained = f(old)  # with gradients: autocast's own cast of the weight
        with torch.no_grad():
            first = f(old)
            cast = f._cast
            again = f(old)
            assert f._cast is cast and cast.dtype == torch.bfloat16  # kept
            torch.testing.assert_close(first, trained.detach(), atol=0, rtol=0)
            assert torch.equal(again, first)
            f.conv.weight.mul_(2)  # an optimizer's in-place step: cast again
            torch.testing.assert_close(f(old), 2 * first, atol=0.05, rtol=0.02)
            assert f._cast is not cast
    with torch.no_grad():  # no autocast: the fp32 weight itself
        assert f(old).dtype == torch.float32


@pytest.mark.parametrize("kind", ["conv", "dilated", "max", "mean"])
def test_runs_compressed_in_one_call_are_each_compressed_on_its_own(kind):
    f = Compressor(kind, 8, 2)
    old = torch.randn(2, 12, 8)
    lengths = [4, 0, 2, 6]
    want = torch.cat([f(run) for run in old.split(lengths, dim=1) if run.shape[1]], dim=1)
    torch.testing.assert_close(f(old), want, atol=1e-6, rtol=0)  # f_c of them all: each window reads its group
