"""TeamLoRA's inference update as one compiled CPU call, for generation.

A decode step runs every adapted layer on a handful of tokens. On a CPU each small PyTorch op then
costs 5-20 us, more than its arithmetic, and the routing tail of TeamLoRA's inference form
(softmax, the (k x r) mix, the norm, two elementwise ops) costs 5-10% of the step.
`csrc/teamlora_route.cpp` has `route`, that tail in one pass over float32 token rows, and
`add_update`, a layer's whole update (both GEMMs around `route`) in one call from Python, so
TeamLoRA decodes as fast as LoRA. It is built on first use with torch's extension loader (about
45 s on 2 cores, once per source, torch and Python version; under TORCH_EXTENSIONS_DIR, default
~/.cache/mm_teamlora/torch_extensions). Where it cannot be built (no C++ compiler) the PyTorch ops
run instead, after one warning. `MM_TEAMLORA_CPU_KERNEL=0` turns it off, `pytorch_ops_only()` for
the forwards inside a block (comparisons, debugging). GPUs always run the PyTorch ops.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
import warnings
from contextvars import ContextVar
from pathlib import Path

import torch

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).parent / "csrc" / "teamlora_route.cpp"
_lock = threading.Lock()
_state: dict = {}  # "module": the built extension or None once a build was tried
_ops_only: ContextVar[bool] = ContextVar("mm_teamlora_ops_only", default=False)


def cpu_route_kernel():
    """The compiled module (`route`, `add_update`), or None where it is turned off or cannot be
    built. Built at most once per process."""
    if _ops_only.get():
        return None
    if "module" not in _state:
        with _lock:
            if "module" not in _state:
                _state["module"] = _build() if os.environ.get("MM_TEAMLORA_CPU_KERNEL", "1") != "0" else None
    return _state["module"]


@contextlib.contextmanager
def pytorch_ops_only():
    """TeamLoRA inference plans built inside the block run PyTorch ops instead of the kernel (a
    plan lasts as long as its routing context, so open the context inside the block)."""
    token = _ops_only.set(True)
    try:
        yield
    finally:
        _ops_only.reset(token)


def _build():
    # importing the loader logs "No CUDA runtime is found" on CPU machines: beside the point for
    # a CPU-only kernel, so that one import runs with its logger at ERROR
    loader_log = logging.getLogger("torch.utils.cpp_extension")
    level = loader_log.level
    loader_log.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        loader_log.setLevel(level)

    start = time.perf_counter()
    try:
        folder = _build_directory()
        folder.mkdir(parents=True, exist_ok=True)
        built = any(folder.glob("mm_teamlora_route*.so")) or any(folder.glob("mm_teamlora_route*.pyd"))
        if built:
            _log.info("loading TeamLoRA's CPU routing kernel from %s", folder)
        else:
            _log.warning("building TeamLoRA's CPU routing kernel in %s (once, about 45 s)", folder)
        module = load(name="mm_teamlora_route", sources=[str(_SOURCE)], build_directory=str(folder),
                      extra_cflags=["-O3"])
    except Exception as error:  # no compiler, no ninja, a read-only cache: the ops still work
        warnings.warn(f"TeamLoRA's CPU routing kernel could not be built ({type(error).__name__}: {error}); "
                      "generation uses PyTorch ops (up to 10% slower on CPU). Set MM_TEAMLORA_CPU_KERNEL=0 "
                      "to skip the attempt.", stacklevel=3)
        return None
    _log.info("TeamLoRA's CPU routing kernel ready after %.1f s", time.perf_counter() - start)
    return module


def _build_directory() -> Path:
    """One folder per source, torch and Python version: torch's loader rebuilds when the source
    changes but not when torch does, and a folder per source tells whether a build is due."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "mm_teamlora" / "torch_extensions"
    source = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]
    return Path(root) / f"mm_teamlora_route-{source}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
