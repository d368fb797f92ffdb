import torch

from still.train import compile as compile_module
from still.train.compile import MaybeCompiled


def double(x):
    return 2 * x


def test_falls_back_with_a_message_when_compiling_fails(monkeypatch, capsys):
    def broken_compile(fn, **options):
        def run(*args, **kwargs):
            raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("InvalidCxxCompiler: no cl.exe"), None)
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    f = MaybeCompiled(double, "the test function")
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0)) and not f.active
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
    err = capsys.readouterr().err
    assert err.count("--compile: cannot compile the test function") == 1 and "running without torch.compile" in err


def test_unsupported_platform_is_said_up_front(monkeypatch, capsys):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    f = MaybeCompiled(double, "the test function")
    assert not f.active and torch.equal(f(torch.ones(1)), torch.full((1,), 2.0))
    assert "does not support this Python or platform" in capsys.readouterr().err


def test_errors_of_the_computation_itself_are_not_swallowed():
    def bad(x):
        raise RuntimeError("shape mismatch in the user's code")

    f = MaybeCompiled(bad, "bad")
    f.compiled = bad  # as if compiled: a plain RuntimeError must propagate
    try:
        f(torch.ones(1))
    except RuntimeError as e:
        assert "shape mismatch" in str(e)
    else:
        raise AssertionError("the error was swallowed")
    assert compile_module._is_compile_error(RuntimeError("CppCompileError: g++ failed"))
