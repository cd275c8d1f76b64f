"""What a training process shows: log records through tqdm (so they do not break its bar), rank 0
at INFO, the other ranks at WARNING with their rank in front; DeepSpeed's own chatter quietened."""

from __future__ import annotations

import logging
import os
import sys
import warnings

from tqdm import tqdm


class TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(level: int = logging.INFO) -> int:
    """Configure the `mm_teamlora` loggers for this process; returns its rank (from the launcher's env)."""
    rank = int(os.environ.get("RANK", "0"))
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(message)s"))
    package = logging.getLogger("mm_teamlora")
    package.handlers[:] = [handler]
    package.setLevel(level if rank == 0 else logging.WARNING)
    package.propagate = False
    for name in ("DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # torch's collectives announce their own renames on every call
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)")
    return rank
