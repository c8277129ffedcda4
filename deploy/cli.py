"""The `vlmserve` command: one subcommand per process kind, plus tools.

    vlmserve scheduler [flags]          the scheduler process
    vlmserve worker --rank R [flags]    one worker process (one device)
    vlmserve demo-checkpoint DIR        write a tiny random-weight checkpoint

Every process reads the same Config from flags or VLMSERVE_* environment variables.
"""

from __future__ import annotations

import argparse
import sys

from shared.config import add_config_flags, config_from_args


def _config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"vlmserve {prog}", description=description)
    add_config_flags(parser)
    return parser


def run_scheduler(argv: list[str]) -> int:
    from scheduler.process import serve

    args = _config_parser("scheduler", "Run the scheduler process.").parse_args(argv)
    return serve(config_from_args(args))


def run_worker(argv: list[str]) -> int:
    from workers.process import serve

    args = _config_parser("worker", "Run one worker process (one rank).").parse_args(argv)
    return serve(config_from_args(args))


def run_demo_checkpoint(argv: list[str]) -> int:
    from workers.demo_checkpoint import main as demo_main

    demo_main(argv)
    return 0


COMMANDS = {
    "scheduler": run_scheduler,
    "worker": run_worker,
    "demo-checkpoint": run_demo_checkpoint,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: vlmserve {{{names}}} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[argv[0]](argv[1:]))


if __name__ == "__main__":
    main()
