import copy
import math

import pytest
import torch

from still.distill.models import MLP, VGG, VGG_STUDENT, VGG_TEACHER, MLPConfig, VGGConfig
from still.errors import StillError


def test_mlp_shapes_and_every_parameter_gets_a_gradient():
    net = MLP(MLPConfig(hidden=(32, 16), dropout_input=0.2, dropout_hidden=0.5))
    x = torch.rand(4, 28, 28)
    out = net(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    out.sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mlp_drops_inputs_and_hidden_units_at_their_rates_with_stills_masks():
    """In training the inputs are dropped at dropout_input and the hidden units at dropout_hidden,
    the rest scaled by 1 / (1 - p), with `still.layers`' masks (one draw from the generator a layer,
    where PyTorch's `bernoulli_` draws one an element); in eval mode nothing is dropped."""
    from still import layers

    torch.manual_seed(0)  # (the weights decide which hidden units are live: seeded, as the masks)
    net = MLP(MLPConfig(in_features=4096, hidden=(4096,), classes=3, dropout_input=0.2, dropout_hidden=0.5))
    drops = [m for m in net.net if isinstance(m, layers.Dropout)]
    assert [m.p for m in drops] == [0.2, 0.5]
    seen = []
    for m in drops:
        m.register_forward_hook(lambda mod, inputs, out: seen.append((inputs[0], out)))
    x = torch.rand(8, 4096) + 0.5
    net.train()(x)
    for (inp, out), p in zip(seen, (0.2, 0.5)):
        kept = out != 0
        live = inp != 0
        assert abs(1 - kept[live].float().mean().item() - p) < 0.01
        torch.testing.assert_close(out[kept], inp[kept] / (1 - p))
    seen.clear()
    net.eval()(x)
    assert all(torch.equal(inp, out) for inp, out in seen)


def test_max_norm_projects_incoming_weights():
    net = MLP(MLPConfig(in_features=8, hidden=(6,), classes=3, max_norm=0.5))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(10)
    net.apply_max_norm()
    for layer in net.net:
        if isinstance(layer, torch.nn.Linear):
            assert (layer.weight.norm(dim=1) <= 0.5 + 1e-5).all()


def test_max_norm_leaves_small_weights_alone():
    net = MLP(MLPConfig(in_features=8, hidden=(6,), classes=3, max_norm=100.0))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.apply_max_norm()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_vgg_paper_shapes():
    for config in (VGG_TEACHER, VGG_STUDENT):
        net = VGG(config).eval()
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_teacher_and_student_are_labmls():
    """A probe, against labml-nn 0.5.1's `distillation/large.py` and `small.py`: labml's teacher has a
    Dropout(0.1) before each of its 13 convolutions (the first on the input image); still's had one
    after each of its 5 max-pools. Its student has none. Their parameters are labml's (14,728,266 and
    437,034) less the convolutions' biases, which still leaves out before a batch norm."""
    for config, labml, dropouts in ((VGG_TEACHER, 14_728_266, 13), (VGG_STUDENT, 437_034, 0)):
        layers = list(VGG(config).features)
        convs = [i for i, m in enumerate(layers) if isinstance(m, torch.nn.Conv2d)]
        drops = [i for i, m in enumerate(layers) if isinstance(m, torch.nn.Dropout)]
        assert len(drops) == dropouts and all(m.p == 0.1 for m in layers if isinstance(m, torch.nn.Dropout))
        assert [i + 1 for i in drops] == (convs if dropouts else [])  # each right before a convolution
        params = sum(p.numel() for p in VGG(config).parameters())
        assert params + sum(m.out_channels for m in layers if isinstance(m, torch.nn.Conv2d)) == labml
    pooled = list(VGG(VGGConfig(blocks=((4, 4), (8,)), dropout=0.1)).features)  # the default: after each pool
    assert [type(m).__name__ for m in pooled] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU",
                                                  "MaxPool2d", "Dropout", "Conv2d", "BatchNorm2d", "ReLU",
                                                  "MaxPool2d", "Dropout"]


def test_vgg_keeps_its_convolutions_channels_last():
    """The weights, the activations between convolutions and the gradients are NHWC; an NCHW copy of
    the same weights computes the same logits and gradients; a state dict loads into the layout."""
    net = VGG(VGGConfig(blocks=((4, 4), (8,)), dropout=0.0))
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) and not c.weight.is_contiguous()
               for c in convs)
    seen = []
    convs[1].register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(3, 3, 32, 32)  # NCHW in
    nchw = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    out, ref = net(x), nchw(x)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.logsumexp(-1).sum().backward()
    ref.logsumexp(-1).sum().backward()
    assert convs[0].weight.grad.is_contiguous(memory_format=torch.channels_last)
    for (name, p), q in zip(net.named_parameters(), nchw.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    fresh = VGG(VGGConfig(blocks=((4, 4), (8,)), dropout=0.0))
    fresh.load_state_dict(nchw.state_dict())
    assert fresh.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fresh.features[0].weight, nchw.features[0].weight)


def test_vgg_eval_uses_running_statistics():
    """An image's logits in eval mode must not depend on the other images in the batch."""
    net = VGG(VGGConfig(blocks=((8,), (8,)), dropout=0.1))
    net.train()
    for _ in range(3):
        net(torch.randn(16, 3, 32, 32))  # update running statistics
    net.eval()
    x = torch.randn(4, 3, 32, 32)
    alone = net(x[:1])
    together = net(torch.cat([x[:1], x[1:] * 10 + 3]))[:1]
    assert torch.allclose(alone, together, atol=1e-5)


def test_vgg_every_parameter_gets_a_gradient():
    net = VGG(VGGConfig(blocks=((4, 4), (8,)), dropout=0.1))
    net(torch.randn(3, 3, 32, 32)).logsumexp(-1).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden": (0,)}, "hidden sizes must be > 0"),
    ({"dropout_hidden": 1.0}, "dropout_hidden must be in"),
    ({"max_norm": -1.0}, "max_norm must be a finite number > 0 or None"),
    ({"max_norm": math.inf}, "max_norm must be a finite number > 0 or None \\(no constraint\\), got inf"),
    ({"classes": 1}, "classes must be > 1"),
    ({"hidden": (8, 2**40)}, "hidden\\[1\\] must be at most 2147483647"),  # (was an allocator's error)
    ({"in_features": 10**30}, "in_features must be at most 2147483647"),  # (an overflow TypeError)
])
def test_mlp_config_rejects_bad_values(kwargs, message):
    with pytest.raises(StillError, match=message):
        MLPConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [({"in_channels": 0}, "in_channels must be > 0"),
                                             ({"in_channels": -4}, "in_channels must be > 0"),
                                             ({"in_channels": 2**40}, "in_channels must be at most 2147483647"),
                                             ({"blocks": ((4,), (8, 10**30))}, "blocks\\[1\\]\\[1\\] must be at most"),
                                             ({"classes": 2**63}, "classes must be at most 2147483647")])
def test_vgg_config_rejects_bad_values(kwargs, message):
    with pytest.raises(StillError, match=message):
        VGGConfig(**kwargs)


def test_recipe_configs_refuse_models_their_data_cannot_feed():
    """An MLP of other than 784 inputs or 10 classes met MNIST's data as a PyTorch error mid-run (a
    teacher of 5 classes at its first label above 4), a VGG of other than 3 input channels or of
    more than 5 blocks (pooled below 1x1) CIFAR-10's, each after writing its run folder's settings."""
    from still.recipes.cifar10 import Cifar10Config
    from still.recipes.mnist import MnistConfig

    for kwargs, message in (
            (dict(teacher=MLPConfig(in_features=100)), "the teacher's in_features must be 784"),
            (dict(teacher=MLPConfig(classes=5), student=MLPConfig(classes=5)), "the teacher's classes must be 10"),
    ):
        with pytest.raises(StillError, match=message):
            MnistConfig(**kwargs)
    for kwargs, message in (
            (dict(teacher=VGGConfig(in_channels=1)), "the teacher's in_channels must be 3"),
            (dict(student=VGGConfig(blocks=((4,),) * 6)), "the student has 6 blocks"),
            (dict(teacher=VGGConfig(classes=5), student=VGGConfig(classes=5)), "the teacher's classes must be 10"),
    ):
        with pytest.raises(StillError, match=message):
            Cifar10Config(**kwargs)
