"""Where converted pretrained assets are cached, and how a cache folder is written safely."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

COMPLETE_MARKER = ".complete"


def cache_root() -> str:
    """`$MM_TEAMLORA_CACHE`, else `$XDG_CACHE_HOME/mm_teamlora`, else `~/.cache/mm_teamlora`."""
    if os.environ.get("MM_TEAMLORA_CACHE"):
        return os.environ["MM_TEAMLORA_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mm_teamlora")


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


@contextlib.contextmanager
def building(folder: str) -> Iterator[str]:
    """Yield a temporary folder beside `folder`; on success it is marked complete and renamed into
    place in one step, so a reader never sees a half-written cache entry."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        yield tmp
        open(os.path.join(tmp, COMPLETE_MARKER), "w").close()
        if os.path.isdir(folder) and not is_complete(folder):
            shutil.rmtree(folder)  # the leftover of an interrupted build
        if not os.path.isdir(folder):  # else a concurrent build finished first: keep its result
            os.replace(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
