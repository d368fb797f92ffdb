"""`--compile`: torch.compile with a fallback to eager mode and a clear message where it fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from still.train.progress import log


class MaybeCompiled:
    """Calls `torch.compile(fn)`; if compiling fails (no C++ compiler, an unsupported Python or
    platform, an operator the compiler cannot handle), says why once and calls `fn` itself from then on."""

    def __init__(self, fn: Callable[..., Any], what: str, **options: Any) -> None:
        self.fn, self.what = fn, what
        self.compiled: Callable[..., Any] | None = None
        reason = None
        try:
            if not torch._dynamo.is_dynamo_supported():
                reason = "torch.compile does not support this Python or platform"
            else:
                self.compiled = torch.compile(fn, **options)
        except Exception as e:  # noqa: BLE001 - any failure means: run eagerly
            reason = f"{type(e).__name__}: {e}"
        if reason is not None:
            self._fall_back(reason)

    def _fall_back(self, reason: str) -> None:
        first_line = reason.strip().splitlines()[0] if reason.strip() else "unknown error"
        log(f"--compile: cannot compile {self.what} ({first_line[:300]}); running without torch.compile")
        self.compiled = None

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:
                if not _is_compile_error(e):
                    raise
                self._fall_back(f"{type(e).__name__}: {e}")
        return self.fn(*args, **kwargs)


def _is_compile_error(error: BaseException) -> bool:
    """Whether `error` came from the compiler rather than from the computation itself."""
    if isinstance(error, (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.InternalTorchDynamoError,
                          torch._dynamo.exc.Unsupported)):
        return True
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return any(s in text for s in ("inductor", "InvalidCxxCompiler", "C++ compiler", "CppCompileError", "dynamo"))
