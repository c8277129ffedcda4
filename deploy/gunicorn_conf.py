"""Gunicorn settings for the frontends: the native asgi worker on uvloop.

Bind address and worker count come from the same VLMSERVE_* settings as everything else.
Loaded by the master before it forks, so it also prepares what the workers share: the
prometheus-client multiprocess directory (every worker writes its counters and histograms
there; /metrics, on whichever worker answers, adds them up) and the log format.
"""

import os
import shutil

from gunicorn import glogging

from vlmserve.shared.config import Config, config_from_env
from vlmserve.shared.logs import make_formatter, setup_logging

_config = config_from_env()

bind = f"{_config.server_name}:{_config.server_port}"
workers = _config.frontend_workers
# The asgi worker, draining on SIGTERM (deploy/gunicorn_worker.py).
worker_class = "vlmserve.deploy.gunicorn_worker.DrainingWorker"
asgi_loop = "uvloop"
asgi_lifespan = "on"
# Streams can stay open for minutes while tokens trickle out.
timeout = 0
# The master SIGKILLs workers this long after its SIGTERM: past their --drain-timeout.
graceful_timeout = int(_config.drain_timeout) + 10
keepalive = 75
# Gunicorn's control socket has one fixed path per user: two servers on a host would clash.
control_socket_disable = True


def metrics_dir(config: Config) -> str:
    """PROMETHEUS_MULTIPROC_DIR when the environment names one, else one per launch (the run id
    keeps two servers on a host apart)."""
    named = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return named or os.path.join(config.ipc_dir, f"vlmserve-{config.run_id}-metrics")


def fresh_metrics_dir(path: str) -> None:
    """Empty it: files of an earlier run's workers would be added to this run's counts."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


_inherited_env = dict(os.environ)
_metrics_dir = metrics_dir(_config)
fresh_metrics_dir(_metrics_dir)
# Set before any worker imports prometheus_client: it picks its value class at import time.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir


def child_exit(server: object, worker: object) -> None:
    """A worker that exits leaves its gauge files behind; its counts stay in the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: object) -> None:
    if "PROMETHEUS_MULTIPROC_DIR" not in _inherited_env:  # ours alone: leave nothing behind
        shutil.rmtree(_metrics_dir, ignore_errors=True)


class JsonLogger(glogging.Logger):
    """Gunicorn's own error (and access) log lines as JSON, like every other line."""

    def setup(self, cfg: object) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(make_formatter("frontend", "json"))


if _config.log_format == "json":
    setup_logging("frontend", _config.log_level, "json")  # the master's own records
    logger_class = JsonLogger
