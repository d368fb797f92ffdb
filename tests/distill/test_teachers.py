import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from still.data.augment import shift
from still.distill.loss import distillation_loss
from still.distill.models import MLP, MLPConfig
from still.distill.teachers import CachedTeacher, EnsembleTeacher, ShiftEnsembleTeacher, Teacher, combine_log_probs
from still.errors import StillError


def small_net(seed: int, dropout: float = 0.3) -> MLP:
    torch.manual_seed(seed)
    return MLP(MLPConfig(in_features=12, hidden=(16,), classes=5, dropout_hidden=dropout))


def test_teacher_stays_frozen_while_a_student_trains():
    teacher = Teacher(small_net(0))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = small_net(1, dropout=0.0)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    teacher.train()  # a teacher ignores requests to train
    student.train()
    for _ in range(5):
        x = torch.randn(8, 12)
        targets = teacher.log_probs(x, 4.0)
        assert not targets.requires_grad
        loss = distillation_loss(student(x), None, temperature=4.0, alpha=1.0, teacher_log_probs=targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_teacher_is_deterministic_despite_dropout():
    teacher = Teacher(small_net(0, dropout=0.5))
    x = torch.randn(6, 12)
    assert torch.equal(teacher.logits(x), teacher.logits(x))


def test_ensemble_arithmetic_mean_of_distributions():
    members = [small_net(s) for s in range(3)]
    ensemble = EnsembleTeacher(members, combine="arithmetic")
    x = torch.randn(7, 12)
    temperature = 3.0
    with torch.no_grad():
        probs = torch.stack([F.softmax(m.eval()(x) / temperature, -1) for m in members]).mean(0)
    assert torch.allclose(ensemble.log_probs(x, temperature).exp(), probs, atol=1e-6)
    assert torch.allclose(ensemble.log_probs(x, temperature).exp().sum(-1), torch.ones(7), atol=1e-6)


def test_ensemble_geometric_mean_of_distributions():
    members = [small_net(s) for s in range(3)]
    ensemble = EnsembleTeacher(members, combine="geometric")
    x = torch.randn(7, 12)
    with torch.no_grad():
        probs = torch.stack([F.softmax(m.eval()(x) / 2.0, -1) for m in members])
    geometric = probs.prod(0) ** (1 / 3)
    geometric = geometric / geometric.sum(-1, keepdim=True)
    assert torch.allclose(ensemble.log_probs(x, 2.0).exp(), geometric, atol=1e-6)


def test_one_member_ensemble_is_the_single_teacher():
    """An ensemble of one, by either mean, is its member: the soft targets are its own log-softmax,
    to the bit (no second log-softmax or log-sum-exp over the one member)."""
    net = small_net(0)
    x = torch.randn(5, 12)
    single = Teacher(net).log_probs(x, 5.0)
    with torch.no_grad():
        assert torch.equal(single, F.log_softmax(net.eval()(x) / 5.0, dim=-1))
    for how in ("arithmetic", "geometric"):
        assert torch.equal(EnsembleTeacher([net], combine=how).log_probs(x, 5.0), single)


def test_combine_rejects_bad_input():
    with pytest.raises(StillError, match="combination must be"):
        combine_log_probs(torch.zeros(2, 3, 4), 1.0, "median")
    with pytest.raises(StillError, match="temperature must be a finite number > 0, got -1"):
        combine_log_probs(torch.zeros(2, 3, 4), -1.0)
    with pytest.raises(StillError, match="at least one member"):
        EnsembleTeacher([])


def test_ensemble_members_must_agree_on_classes():
    a = small_net(0)
    torch.manual_seed(1)
    b = MLP(MLPConfig(in_features=12, hidden=(16,), classes=7))
    with pytest.raises(StillError, match="disagree on the output shape"):
        EnsembleTeacher([a, b]).log_probs(torch.randn(2, 12), 2.0)


@pytest.mark.parametrize("ensemble", [False, True])
def test_cached_teacher_gives_the_online_teachers_loss(ensemble):
    teacher = EnsembleTeacher([small_net(0), small_net(1)]) if ensemble else Teacher(small_net(0))
    inputs = torch.randn(50, 12)
    cached = CachedTeacher.build(teacher, inputs, batch_size=16)
    student = small_net(2, dropout=0.0)
    idx = torch.tensor([3, 17, 42, 0, 49])
    labels = torch.randint(0, 5, (5,))
    online = distillation_loss(student(inputs[idx]), labels, temperature=4.0, alpha=0.7,
                               teacher_log_probs=teacher.log_probs(inputs[idx], 4.0))
    from_cache = distillation_loss(student(inputs[idx]), labels, temperature=4.0, alpha=0.7,
                                   teacher_log_probs=cached.log_probs(idx, 4.0))
    assert torch.allclose(online, from_cache, atol=1e-6)



def test_cached_teacher_moves_to_the_students_device():
    """`to(device)` keeps the logits on the student's device, where the soft targets are then made,
    whichever device the indices are on (the meta device stands in for a GPU)."""
    cached = CachedTeacher.build(EnsembleTeacher([small_net(0), small_net(1)]), torch.randn(30, 12))
    idx = torch.tensor([4, 0, 29])
    want = cached.log_probs(idx, 3.0)
    assert cached.device == torch.device("cpu")
    assert cached.to("meta") is cached and cached.device == torch.device("meta")
    for indices in (idx, idx.to("meta")):
        got = cached.log_probs(indices, 3.0)
        assert got.device == torch.device("meta") and got.shape == want.shape
        assert cached.logits(indices).device == torch.device("meta")
    back = CachedTeacher.build(EnsembleTeacher([small_net(0), small_net(1)]), torch.randn(30, 12)).to("cpu")
    assert back.log_probs(idx, 3.0).device == torch.device("cpu")

def test_disk_cache_is_keyed_by_weights_and_data(tmp_path, monkeypatch):
    net = small_net(0)
    inputs = torch.randn(20, 12)
    first = CachedTeacher.build(Teacher(net), inputs, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("teacher-logits-*.safetensors"))) == 1

    calls = []
    teacher = Teacher(net)
    original = teacher.member_logits
    monkeypatch.setattr(teacher, "member_logits", lambda x: calls.append(1) or original(x))
    second = CachedTeacher.build(teacher, inputs, cache_dir=tmp_path)
    assert calls == []  # loaded from disk, the teacher did not run
    assert torch.equal(first.member_logits_all, second.member_logits_all)

    CachedTeacher.build(Teacher(small_net(1)), inputs, cache_dir=tmp_path)  # other weights
    CachedTeacher.build(Teacher(net), inputs + 1, cache_dir=tmp_path)  # other data
    assert len(list(tmp_path.glob("teacher-logits-*.safetensors"))) == 3


def test_disk_cache_is_keyed_by_the_modules_and_checked_by_its_digest(tmp_path):
    """Probes: a teacher of the same weights but another module (a ReLU made a Tanh) read the other's
    logits from the cache; a byte flipped in an entry was read as a logit of 1e37; a cache_dir that
    could not be made was a NotADirectoryError after the teacher's whole pass."""
    first, second = torch.nn.Linear(12, 8), torch.nn.Linear(8, 5)
    inputs = torch.randn(20, 12)
    relu = CachedTeacher.build(Teacher(torch.nn.Sequential(first, torch.nn.ReLU(), second)), inputs, cache_dir=tmp_path)
    tanh_model = torch.nn.Sequential(first, torch.nn.Tanh(), second)
    tanh = CachedTeacher.build(Teacher(tanh_model), inputs, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert torch.equal(tanh.member_logits_all, Teacher(tanh_model).member_logits(inputs))
    assert not torch.equal(tanh.member_logits_all, relu.member_logits_all)
    for entry in tmp_path.glob("*.safetensors"):  # a byte of every entry's last logit flipped
        data = bytearray(entry.read_bytes())
        data[-2] ^= 0x7F
        entry.write_bytes(bytes(data))
    again = CachedTeacher.build(Teacher(tanh_model), inputs, cache_dir=tmp_path)
    assert torch.equal(again.member_logits_all, tanh.member_logits_all)
    (tmp_path / "file").write_text("")
    calls = []
    teacher = Teacher(tanh_model)
    teacher.member_logits = lambda x: calls.append(1)
    with pytest.raises(StillError, match="cannot make cache_dir .*file/logits: Not a directory"):
        CachedTeacher.build(teacher, inputs, cache_dir=tmp_path / "file" / "logits")
    assert calls == []  # before the teacher's pass


def test_disk_cache_keys_hold_unsaved_buffers_and_state_that_is_no_tensor(tmp_path):
    """Probes: two teachers differing only in a buffer left out of the state dict (an input mean)
    shared one key, the second served the first's logits; a teacher with a module's extra state (a dict in
    its state dict, as a quantized module's packed parameters) was an AttributeError."""
    class Centred(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)
            self.register_buffer("mean", torch.zeros(4), persistent=False)

        def forward(self, x):
            return self.linear(x - self.mean)

    torch.manual_seed(0)
    inputs = torch.randn(8, 4)
    a, b = Centred(), Centred()
    b.load_state_dict(a.state_dict())
    b.mean.fill_(5.0)
    for net in (a, b):
        cached = CachedTeacher.build(Teacher(net), inputs, cache_dir=tmp_path / "plain")
        assert torch.equal(cached.member_logits_all[0], Teacher(net).logits(inputs))
    assert len(list((tmp_path / "plain").glob("*.safetensors"))) == 2

    class Scaled(torch.nn.Module):  # extra state: a dict in the state dict, as a packed or quantized module's
        def __init__(self, scale):
            super().__init__()
            self.linear, self.scale = torch.nn.Linear(4, 3), scale

        def get_extra_state(self):
            return {"scale": self.scale}

        def set_extra_state(self, state):
            self.scale = state["scale"]

        def forward(self, x):
            return self.linear(x) * self.scale

    torch.manual_seed(1)
    first = Scaled(1.0)
    second = Scaled(3.0)
    second.linear.load_state_dict(first.linear.state_dict())
    scaled = [first, second]
    for net in scaled:
        cached = CachedTeacher.build(Teacher(net), inputs, cache_dir=tmp_path / "extra")
        assert torch.equal(cached.member_logits_all[0], Teacher(net).logits(inputs))
    assert len(list((tmp_path / "extra").glob("*.safetensors"))) == 2  # another extra state, another key
    again = CachedTeacher.build(Teacher(scaled[0]), inputs, cache_dir=tmp_path / "extra")
    assert torch.equal(again.member_logits_all[0], Teacher(scaled[0]).logits(inputs))
    assert len(list((tmp_path / "extra").glob("*.safetensors"))) == 2  # found again


def test_a_teachers_rows_must_be_its_inputs_and_its_classes_two_or_more():
    """Probes: a teacher whose output had other rows than its inputs (a reshape) was cached as it
    came, the examples then served other examples' logits; a one-class model distilled to a loss of
    0 with a gradient of 0."""
    class Reshaping(torch.nn.Module):
        def __init__(self, rows):
            super().__init__()
            self.linear, self.rows = torch.nn.Linear(4, 5), rows

        def forward(self, x):
            return self.linear(x.reshape(self.rows, -1)[:, :4])

    inputs = torch.randn(6, 8)
    with pytest.raises(StillError, match="returned 12 rows of logits for a batch of 6 inputs; expected one row an"):
        CachedTeacher.build(Teacher(Reshaping(12)), inputs)
    with pytest.raises(StillError, match="returned 1 rows of logits for a batch of 6 inputs"):
        Teacher(Reshaping(1)).logits(inputs)
    with pytest.raises(StillError, match="logits of 1 class: a softmax over one class is constant"):
        Teacher(torch.nn.Linear(8, 1)).logits(inputs)
    z, v = torch.randn(3, 1, requires_grad=True), torch.randn(3, 1)
    with pytest.raises(StillError, match="student logits of 1 class: a softmax over one class is constant"):
        distillation_loss(z, torch.zeros(3, dtype=torch.long), v, temperature=4.0, alpha=0.9)


def test_cached_teacher_checks_shape():
    with pytest.raises(StillError, match="must be \\(members, examples, classes\\)"):
        CachedTeacher(torch.zeros(3, 4))
    assert math.isclose(CachedTeacher(torch.zeros(1, 3, 4)).log_probs(torch.tensor([0]), 1.0).exp().sum().item(), 1.0,
                        rel_tol=1e-6)


def test_shift_on_known_values():
    image = torch.arange(1, 10, dtype=torch.float32).view(1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    assert shift(image, 1, 0, size=3)[0].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]
    assert shift(image, 0, -1, size=3)[0].tolist() == [[2, 3, 0], [5, 6, 0], [8, 9, 0]]
    assert shift(image.view(1, 9), -1, 2, size=3).view(3, 3).tolist() == [[0, 0, 4], [0, 0, 7], [0, 0, 0]]
    assert torch.equal(shift(image, 0, 0, size=3), image)
    with pytest.raises(ValueError, match="out of its frame"):
        shift(image, 3, 0, size=3)


def shift_net(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP(MLPConfig(in_features=16, hidden=(8,), classes=3))


def test_shift_ensemble_is_the_ensemble_of_the_shifted_inputs():
    """Members: the model on every shift by up to s pixels; soft targets: their geometric mean."""
    net = shift_net(0)
    x = torch.randn(5, 16)  # 4x4 images, flattened
    teacher = ShiftEnsembleTeacher(net, max_shift=1, size=4)
    members = teacher.member_logits(x)
    assert members.shape == (9, 5, 3)
    shifted = torch.cat([shift(x, dy, dx, size=4) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    with torch.no_grad():
        expected = net.eval()(shifted).view(9, 5, 3)
    torch.testing.assert_close(members, expected)
    torch.testing.assert_close(teacher.log_probs(x, 3.0), F.log_softmax(expected.mean(0) / 3.0, -1))
    assert all(not p.requires_grad for p in teacher.parameters())
    # no shift: the teacher alone
    torch.testing.assert_close(ShiftEnsembleTeacher(net, 0, size=4).log_probs(x, 2.0), Teacher(net).log_probs(x, 2.0))
    with pytest.raises(StillError, match=re.escape("max_shift must be an integer in [0, 4), got 4")):
        ShiftEnsembleTeacher(net, 4, size=4)


def test_a_shift_ensemble_names_a_bad_shift_size_or_image_shape():
    """A float shift or size was taken and failed at first use; images not size x size met a reshape."""
    net = shift_net(0)
    for kwargs, message in (({"max_shift": 1.5, "size": 4}, "max_shift must be an integer in [0, 4), got 1.5"),
                            ({"max_shift": True, "size": 4}, "max_shift must be an integer in [0, 4), got True"),
                            ({"max_shift": 1, "size": 4.0}, "size (the images' side in pixels) must be an integer"),
                            ({"max_shift": 0, "size": 0}, "size (the images' side in pixels) must be an integer >= 1, "
                                                          "got 0")):
        with pytest.raises(StillError, match=re.escape(message)):
            ShiftEnsembleTeacher(net, **kwargs)
    teacher = ShiftEnsembleTeacher(net, max_shift=np.int64(1), size=np.int64(4))  # NumPy's integers are integers
    assert teacher.member_logits(torch.randn(2, 16)).shape == (9, 2, 3)
    for shape in ((2, 25), (2, 3, 4, 4), (16,)):
        with pytest.raises(StillError, match=re.escape(f"images of shape {shape} are not 4x4 (size=4)")):
            teacher.log_probs(torch.zeros(shape), 2.0)


def test_cache_tells_a_shift_ensemble_from_its_model(tmp_path):
    net, inputs = shift_net(0), torch.randn(6, 16)
    CachedTeacher.build(Teacher(net), inputs, cache_dir=tmp_path)
    cached = CachedTeacher.build(ShiftEnsembleTeacher(net, 1, size=4), inputs, cache_dir=tmp_path)
    assert cached.member_logits_all.shape == (9, 6, 3) and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_cached_teacher_names_bad_indices():
    cached = CachedTeacher(torch.randn(2, 10, 3))
    torch.testing.assert_close(cached.logits([1, 2]), cached.logits(torch.tensor([1, 2])))
    for bad, message in ((torch.tensor([-1]), "index -1 is outside the cached transfer set (examples 0 to 9)"),
                         (torch.tensor([3, 10]), "index 10 is outside"),
                         (torch.tensor(3), "indices must be a 1-D tensor"),
                         (torch.tensor([0.0]), "indices must be a 1-D tensor"),
                         (torch.tensor([1, 0], dtype=torch.uint8), "got torch.uint8"),  # a mask, to PyTorch
                         (torch.tensor([True, False]), "got torch.bool"),
                         (torch.tensor([1j]), "got torch.complex64"),
                         (torch.tensor([12], dtype=torch.int8), "index 12 is outside")):
        with pytest.raises(StillError, match=re.escape(message)):
            cached.log_probs(bad, 2.0)
    # example numbers of any other integer dtype
    for dtype in (torch.int8, torch.int16, torch.int32):
        torch.testing.assert_close(cached.log_probs(torch.tensor([3, 1], dtype=dtype), 2.0),
                                   cached.log_probs(torch.tensor([3, 1]), 2.0), rtol=0, atol=0)
    with pytest.raises(StillError, match="ensemble combination must be"):
        CachedTeacher(torch.randn(2, 10, 3), combine="median")


def test_a_teacher_is_in_eval_mode_from_the_start():
    teachers = (Teacher(small_net(0)), EnsembleTeacher([small_net(1), small_net(2)]),
                ShiftEnsembleTeacher(shift_net(0), 1, size=4))
    for teacher in teachers:
        assert not teacher.training
        assert not any(m.training for m in teacher.modules())
        teacher.train()
        assert not teacher.training and not any(m.training for m in teacher.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_teacher_in_another_precision_gets_its_inputs_in_that_precision(dtype):
    """A bf16 or float64 teacher is fed float32 inputs in its own dtype; its logits come back float32."""
    net = small_net(0).to(dtype)
    x = torch.randn(6, 12)
    with torch.no_grad():
        want = net.eval()(x.to(dtype)).float()
    for teacher in (Teacher(net), EnsembleTeacher([net, small_net(1)])):
        logits = teacher.member_logits(x)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits[0], want)
        assert teacher.log_probs(x, 2.0).dtype == torch.float32
    cached = CachedTeacher.build(Teacher(net), x, batch_size=4)
    torch.testing.assert_close(cached.logits(torch.arange(6)), want)
    assert ShiftEnsembleTeacher(shift_net(0).to(dtype), 1, size=4).log_probs(torch.randn(3, 16), 2.0).dtype \
        == torch.float32


class Wrapped(torch.nn.Module):
    """A model whose forward puts its logits inside a structure, as Hugging Face models do."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net, self.kind = small_net(0), kind

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "tuple":
            return logits, x
        if self.kind == "list":
            return [logits]
        if self.kind == "dict":
            return {"loss": None, "logits": logits}
        if self.kind == "attribute":  # transformers' ModelOutput: a dict with attributes
            from collections import OrderedDict

            class ModelOutput(OrderedDict):
                @property
                def logits(self):
                    return self["logits"]

            return ModelOutput(logits=logits)
        return {"scores": logits}


@pytest.mark.parametrize("kind", ["tuple", "list", "dict", "attribute"])
def test_a_teacher_returning_a_structure_gives_its_logits(kind):
    x = torch.randn(5, 12)
    want = Teacher(small_net(0)).logits(x)
    torch.testing.assert_close(Teacher(Wrapped(kind)).logits(x), want)
    torch.testing.assert_close(EnsembleTeacher([Wrapped(kind)]).logits(x), want)
    torch.testing.assert_close(CachedTeacher.build(Teacher(Wrapped(kind)), x).logits(torch.arange(5)), want)


def test_a_teacher_returning_something_else_is_named():
    with pytest.raises(StillError, match="the teacher's model returned a dict; expected its logits"):
        Teacher(Wrapped("scores")).log_probs(torch.randn(2, 12), 2.0)
    with pytest.raises(StillError, match="returned a dict"):
        CachedTeacher.build(EnsembleTeacher([Wrapped("scores")]), torch.randn(2, 12))


class _Ending(torch.nn.Module):
    """small_net(0), its logits passed through `ending` (log_softmax, softmax)."""

    def __init__(self, ending):
        super().__init__()
        self.net, self.ending = small_net(0), ending

    def forward(self, x):
        return self.ending(self.net(x), dim=-1)


def test_a_teacher_ending_in_log_softmax_gives_its_logits_soft_targets():
    x = torch.randn(6, 12)
    for temperature in (1.0, 4.0):
        want = Teacher(small_net(0)).log_probs(x, temperature)
        for teacher in (Teacher(_Ending(F.log_softmax)), EnsembleTeacher([_Ending(F.log_softmax), small_net(0)])):
            torch.testing.assert_close(teacher.log_probs(x, temperature), want, atol=1e-6, rtol=0)
        cached = CachedTeacher.build(Teacher(_Ending(F.log_softmax)), x)
        torch.testing.assert_close(cached.log_probs(torch.arange(6), temperature), want, atol=1e-6, rtol=0)


def test_a_teacher_returning_probabilities_is_refused():
    x = torch.randn(6, 12)
    for teacher in (Teacher(_Ending(F.softmax)), EnsembleTeacher([small_net(1), _Ending(F.softmax)])):
        with pytest.raises(StillError, match="returns probabilities .* not logits"):
            teacher.log_probs(x, 2.0)
    with pytest.raises(StillError, match="returns probabilities"):
        CachedTeacher.build(Teacher(_Ending(F.softmax)), x)
    # in bf16 a softmax sums to 1 within its rounding only (about 0.002 at 10 classes): refused all the same
    for classes in (2, 10, 100):
        in_bf16 = torch.nn.Sequential(torch.nn.Linear(12, classes), torch.nn.Softmax(-1)).bfloat16()
        if classes == 2:  # (two probabilities in bf16 sum to 1 +- 2^-9: beyond float32's 1e-3)
            assert (in_bf16(x.bfloat16()).float().sum(-1) - 1).abs().max() > 1e-3
        with pytest.raises(StillError, match="returns probabilities"):
            Teacher(in_bf16).log_probs(x, 2.0)
    # logits that happen to lie in [0, 1] are not mistaken for them (one class's are refused as one class)
    torch.testing.assert_close(Teacher(torch.nn.Identity()).logits(torch.full((3, 4), 0.2)), torch.full((3, 4), 0.2))
    with pytest.raises(StillError, match="logits of 1 class"):
        Teacher(torch.nn.Identity()).logits(torch.ones(3, 1))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_a_teacher_returning_logits_that_are_not_floating_is_refused(dtype):
    """Whole-number scores crashed in the probability check; complex ones lost their imaginary part."""
    class Scores(torch.nn.Module):
        def forward(self, x):
            return torch.ones(len(x), 3).to(dtype)

    for teacher in (Teacher(Scores()), EnsembleTeacher([small_net(0), Scores()])):
        with pytest.raises(StillError, match=re.escape(f"returned {dtype} logits; logits must be floating point")):
            teacher.log_probs(torch.zeros(2, 12), 2.0)


def test_edge_cases_of_the_cache_and_ensembles_are_named(tmp_path):
    """No members, an empty transfer set, batch_size 0 and a cache_dir that is a file raised raw
    errors (a math domain error, ValueError, FileExistsError); an empty list of indices read as
    float32 and was refused; a cache entry of another number of examples was used as it was."""
    with pytest.raises(StillError, match=r"of one member or more, got \(0, 4, 5\)"):
        combine_log_probs(torch.zeros(0, 4, 5), 2.0)
    with pytest.raises(StillError, match=r"of one member or more, got \(0, 4, 5\)"):
        CachedTeacher(torch.zeros(0, 4, 5))
    teacher, inputs = Teacher(small_net(0)), torch.randn(6, 12)
    with pytest.raises(StillError, match="the transfer set is empty"):
        CachedTeacher.build(teacher, inputs[:0])
    # (a probe: AttributeErrors, "has no attribute 'to'" / "'list' object has no attribute 'ndim'")
    with pytest.raises(StillError, match="inputs must be a tensor .*got a ndarray"):
        CachedTeacher.build(teacher, inputs.numpy())
    with pytest.raises(StillError, match="cached logits must be a tensor .*got a list"):
        CachedTeacher([[[1.0, 2.0]]])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(StillError, match=f"batch_size must be an int >= 1, got {bad!r}"):
            CachedTeacher.build(teacher, inputs, batch_size=bad)
    (tmp_path / "file").write_text("")
    with pytest.raises(StillError, match="cache_dir .*file is a file, not a folder"):
        CachedTeacher.build(teacher, inputs, cache_dir=tmp_path / "file")
    cached = CachedTeacher.build(teacher, inputs, cache_dir=tmp_path)
    assert cached.log_probs([], 2.0).shape == (0, 5)
    (entry,) = tmp_path.glob("teacher-logits-*.safetensors")
    from safetensors.torch import save_file

    save_file({"member_logits": torch.zeros(1, 2, 5)}, str(entry))  # of 2 examples, under this key
    again = CachedTeacher.build(teacher, inputs, cache_dir=tmp_path)
    assert again.num_examples == 6 and torch.equal(again.member_logits_all, cached.member_logits_all)


def test_what_is_not_a_model_or_not_logits_is_named_and_ensembles_take_any_iterable():
    """A non-Module raised AttributeError ('eval'), a generator of members TypeError (no len), and a
    model of 1-D outputs was refused later as "member logits must be (members, batch, classes)",
    which did not point at the model (a probe)."""
    for bad in (lambda x: x, "model"):
        with pytest.raises(StillError, match="a teacher's model must be a torch.nn.Module, got"):
            Teacher(bad)
        with pytest.raises(StillError, match="a teacher's model must be a torch.nn.Module, got"):
            EnsembleTeacher([small_net(0), bad])
    x = torch.randn(6, 12)
    ensemble = EnsembleTeacher(small_net(seed) for seed in (0, 1))
    torch.testing.assert_close(ensemble.logits(x), (small_net(0).eval()(x) + small_net(1).eval()(x)) / 2)
    flat = torch.nn.Sequential(small_net(0), torch.nn.Flatten(0))
    for call in (Teacher(flat).logits, lambda x: Teacher(flat).log_probs(x, 2.0), lambda x: CachedTeacher.build(
            Teacher(flat), x)):
        with pytest.raises(StillError, match=r"the teacher's model returned logits of shape \(30,\); expected"):
            call(x)


def test_a_teachers_model_put_back_in_training_mode_is_evaluated_in_eval_mode():
    """The model's own train() (not the teacher's), or a student's that shares a module with it,
    made the teacher's outputs draw dropout masks (probes); the modes are the caller's, and stay."""
    net = small_net(0, dropout=0.5)
    teacher, x = Teacher(net), torch.randn(6, 12)
    first = teacher.logits(x)
    net.train()
    torch.testing.assert_close(teacher.logits(x), first, rtol=0, atol=0)
    assert all(m.training for m in net.modules())
    backbone = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Dropout(0.5))
    teacher = Teacher(torch.nn.Sequential(backbone, torch.nn.Linear(16, 5)))
    student = torch.nn.Sequential(backbone, torch.nn.Linear(16, 5)).train()
    torch.testing.assert_close(teacher.logits(x), teacher.logits(x), rtol=0, atol=0)
    assert all(m.training for m in student.modules())


def test_one_model_given_as_an_ensemble_is_refused():
    """A probe: EnsembleTeacher(nn.Sequential(a, b)) took the layers for members."""
    with pytest.raises(StillError, match="give an ensemble's members as a list of models, not one Sequential"):
        EnsembleTeacher(torch.nn.Sequential(small_net(0), small_net(1)))
    members = torch.nn.ModuleList([small_net(0), small_net(1)])
    assert len(EnsembleTeacher(members).members) == 2


def test_a_probability_model_is_refused_after_a_first_empty_batch():
    """An empty first batch had the model marked as looked at: its later probabilities went through."""
    teacher = Teacher(torch.nn.Sequential(small_net(0), torch.nn.Softmax(dim=-1)))
    assert teacher.logits(torch.randn(0, 12)).shape == (0, 5)
    with pytest.raises(StillError, match="returns probabilities"):
        teacher.logits(torch.randn(4, 12))
