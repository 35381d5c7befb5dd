"""When a speed lever fails, the plain path takes over: one line says what failed and what it costs.

Compiled, captured and custom-kernel paths depend on the GPU, the compiler, Triton and the host's C toolchain;
most have run only on GPUs newer than a T4. A failure there must not stop a learner's notebook: the caller
catches it, calls `fall_back`, and runs the plain PyTorch path, which computes the same numbers. The model
remembers the failure (`has_failed`), so the lever is not tried again in this process. Running out of memory is
not a lever's failure and is raised as it is.
"""

from __future__ import annotations

import torch

FAILED = "_htmlgen_failed_levers"


def fall_back(model, lever: str, error: BaseException, cost: str) -> None:
    """Record that `lever` failed on `model` and print one line: the lever, the error's first line, what the plain
    path costs instead. Re-raises an out-of-memory error (the plain path would not fix it)."""
    if isinstance(error, torch.OutOfMemoryError):
        raise error
    model.__dict__.setdefault(FAILED, set()).add(lever)
    first_line = (str(error).strip().splitlines() or [""])[0][:160]
    print(f"{lever} failed ({type(error).__name__}: {first_line}); continuing on the plain path: {cost}", flush=True)


def has_failed(model, lever: str) -> bool:
    """Whether `lever` already failed on `model` in this process."""
    return lever in model.__dict__.get(FAILED, ())
