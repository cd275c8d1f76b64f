"""`python -m mm_teamlora.train RUN.yaml [key=value ...] [--resume auto|PATH] [--overwrite]`: the
entry DeepSpeed's launcher and torchrun start on every rank (`--local_rank=N`, which the DeepSpeed
launcher inserts, is accepted; the rank comes from the environment)."""

from __future__ import annotations

import argparse
import sys

from ..data import DataError, WriteError
from .config import RunConfig, RunConfigError
from .progress import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mm_teamlora.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--resume", default=None, help="auto (the run folder's latest checkpoint) or a checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run folder first")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)  # overrides may come after --resume or --overwrite
    rank = setup_logging()
    try:
        run = RunConfig.from_yaml(args.config, args.overrides)
        from .run import train

        result = train(run, resume=args.resume, overwrite=args.overwrite)
    except (RunConfigError, ValueError, FileNotFoundError, DataError, WriteError) as e:
        # one line per rank, as `mm-teamlora train` prints it: 1 for a bad record, 2 for what the user must fix
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, DataError) else 2
    if rank == 0:
        print(f"{'finished' if result.finished else 'stopped'} after {result.steps} of {result.total_steps} steps; "
              f"checkpoint: {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
