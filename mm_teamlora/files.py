"""Files written so that a reader never sees half of one, and where the package keeps its caches.

The lowest room of the package (the standard library, and PyYAML for `read_yaml`): every other room
writes files through it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from typing import Callable, Iterator

COMPLETE_MARKER = ".complete"


def cache_root(*parts: str) -> str:
    """`$MM_TEAMLORA_CACHE`, else `$XDG_CACHE_HOME/mm_teamlora`, else `~/.cache/mm_teamlora`,
    joined with `parts` (e.g. `cache_root("data")` for tokenised sources)."""
    root = os.environ.get("MM_TEAMLORA_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "mm_teamlora")
    return os.path.join(root, *parts)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` then rename over `path`: a reader sees the old file or the new one, never half.
    The file gets the mode an ordinary new file gets (0666 less the umask): safetensors creates its
    files 0600, which would hide a checkpoint from the rest of a shared cluster group."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


@functools.cache
def _umask() -> int:
    try:  # Linux shows it; setting it to read it would briefly change it for every thread
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def read_yaml(path: str, what: str, error: type[Exception]):
    """The YAML document at `path`; `error` names the file and the problem (`what` it was meant to be)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None


def is_complete(folder: str | os.PathLike) -> bool:
    """A folder written by `atomic_folder` (it carries the marker written last)."""
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


@contextlib.contextmanager
def atomic_folder(folder: str) -> Iterator[str]:
    """Yield a temporary folder beside `folder`; on success it is marked complete and renamed into
    place in one step, so a reader never sees a half-written folder. The leftover of an interrupted
    write is replaced; a concurrent writer that finished first wins (its result is kept)."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        yield tmp
        open(os.path.join(tmp, COMPLETE_MARKER), "w").close()
        if os.path.isdir(folder) and not is_complete(folder):
            shutil.rmtree(folder)
        if not os.path.isdir(folder):
            os.replace(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
