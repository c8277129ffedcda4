"""Gunicorn settings for the frontends: the native asgi worker on uvloop.

Bind address and worker count come from the same VLMSERVE_* settings as everything else.
"""

from vlmserve.shared.config import config_from_env

_config = config_from_env()

bind = f"{_config.server_name}:{_config.server_port}"
workers = _config.frontend_workers
worker_class = "asgi"
asgi_loop = "uvloop"
asgi_lifespan = "on"
# Streams can stay open for minutes while tokens trickle out.
timeout = 0
graceful_timeout = 10
keepalive = 75
# Gunicorn's control socket has one fixed path per user: two servers on a host would clash.
control_socket_disable = True
