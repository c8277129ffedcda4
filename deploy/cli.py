"""The `vlmserve` command: one subcommand per process kind, plus tools.

    vlmserve serve api_server MODEL     every process below, as one server (the usual way)
    vlmserve serve api_client URL       chat with a running server in the terminal
    vlmserve scheduler [flags]          the scheduler process
    vlmserve worker --rank R [flags]    one worker process (one device)
    vlmserve frontend [flags]           the Gunicorn frontends (HTTP), joining a scheduler
    vlmserve demo-checkpoint DIR        write a tiny random-weight checkpoint

Every process reads the same Config from flags or VLMSERVE_* environment variables;
`vlmserve COMMAND -h` lists them (`vlmserve serve api_server -h` for the server's).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from vlmserve.shared.config import (
    Config,
    add_config_flags,
    config_from_args,
    config_to_env,
    new_run_id,
)
from vlmserve.shared.logs import setup_logging


def _config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"vlmserve {prog}", description=description)
    add_config_flags(parser)
    return parser


def servable_model(model: str) -> str:
    """`model` resolved like `serve api_server`'s (a local directory, or a hub id fetched or
    found in the hub cache by huggingface_hub); exit with one line naming the problem when it
    is no checkpoint we serve (an unsupported architecture lists the supported ones)."""
    from vlmserve.deploy.launcher import resolve_model
    from vlmserve.shared.models import checkpoint_spec

    try:
        model_dir = resolve_model(model)
        checkpoint_spec(model_dir)
    except (OSError, ValueError) as exc:
        print(f"vlmserve: error: {model}: {exc}", file=sys.stderr)
        sys.exit(2)
    return model_dir


def process_config(args: argparse.Namespace, **overrides: object) -> Config:
    """The Config of one process, its model checked and resolved by `servable_model`. The
    model is served under the name it was given by (a hub id or a path as typed), as vLLM and
    LMDeploy list it, unless --model-name says otherwise; the resolved directory is
    `config.model`, which every process loads."""
    if not args.model:
        return config_from_args(args, model="", **overrides)
    name = args.model_name or args.model
    return config_from_args(args, model=servable_model(args.model), model_name=name, **overrides)


def checked_sampling_defaults(config: Config, log: bool) -> None:
    """Read the sampling defaults `--generation-config` gives (logged when `log`); exit with
    one line when the setting or the file is unusable."""
    from vlmserve.frontend.sampling_defaults import load_sampling_defaults, log_sampling_defaults

    try:
        (log_sampling_defaults if log else load_sampling_defaults)(
            config.generation_config, config.model
        )
    except (OSError, ValueError) as exc:
        print(f"vlmserve: error: {exc}", file=sys.stderr)
        sys.exit(2)


def run_scheduler(argv: list[str]) -> int:
    from vlmserve.scheduler.process import serve

    args = _config_parser("scheduler", "Run the scheduler process.").parse_args(argv)
    return serve(process_config(args))


def run_worker(argv: list[str]) -> int:
    from vlmserve.workers.process import serve

    args = _config_parser("worker", "Run one worker process (one rank).").parse_args(argv)
    return serve(process_config(args))


def run_frontend(argv: list[str]) -> int:
    """Replace this process with Gunicorn serving `frontend.asgi:app` on the same config."""
    args = _config_parser("frontend", "Run the HTTP frontends (Gunicorn).").parse_args(argv)
    config = process_config(args)
    config.address("requests")  # fail now, not in every worker, if the run id is missing
    setup_logging("frontend", config.log_level, config.log_format)
    checked_sampling_defaults(config, log=True)  # once per server, not once per worker
    os.environ.update(config_to_env(config))
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", "python:vlmserve.deploy.gunicorn_conf"]
    os.execv(sys.executable, [*gunicorn, "vlmserve.frontend.asgi:app"])
    return 1  # not reached


def run_serve(argv: list[str]) -> int:
    """`vlmserve serve api_server MODEL [flags]`: start everything, stop it all on a signal."""
    if argv and argv[0] == "api_client":
        from vlmserve.frontend.chat_cli import main as chat_main

        return chat_main(argv[1:])
    from vlmserve.deploy.launcher import server

    if not argv or argv[0] != "api_server":
        print(
            "usage: vlmserve serve api_server MODEL [flags] | "
            "vlmserve serve api_client URL [--api-key KEY]",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(
        prog="vlmserve serve api_server",
        description="Serve MODEL behind an OpenAI-compatible API: scheduler, workers, frontends.",
    )
    parser.add_argument("model", help="local checkpoint directory or Hugging Face hub id")
    add_config_flags(parser, skip=("model", "rank"))
    args = parser.parse_args(argv[1:])
    log = setup_logging("launcher", args.log_level, args.log_format)
    config = process_config(args, run_id=args.run_id or new_run_id())
    checked_sampling_defaults(config, log=False)  # before any process starts
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: stopping.append("SIGINT"))
    with server(config) as srv:
        log.info(
            "vlmserve ready at %s serving %r (tp %d, %d frontend workers, run id %s); "
            "API docs at %s/docs",
            srv["url"], config.served_name, config.tp, config.frontend_workers,
            config.run_id, srv["url"],
        )  # fmt: skip
        while not stopping:
            dead = [(n, p.returncode) for n, p in srv["procs"].items() if p.poll() is not None]
            if dead:
                log.error("%s exited with code %s; stopping the server", *dead[0])
                return 1
            time.sleep(0.5)
        log.info("%s received; stopping every process", stopping[0])
    return 0


def run_demo_checkpoint(argv: list[str]) -> int:
    from vlmserve.workers.demo_checkpoint import main as demo_main

    demo_main(argv)
    return 0


COMMANDS = {
    "serve": run_serve,
    "scheduler": run_scheduler,
    "worker": run_worker,
    "frontend": run_frontend,
    "demo-checkpoint": run_demo_checkpoint,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: vlmserve {{{names}}} ... (vlmserve --help for more)", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[argv[0]](argv[1:]))


if __name__ == "__main__":
    main()
