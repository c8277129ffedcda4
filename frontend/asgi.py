"""The ASGI entry point Gunicorn loads in each worker: `frontend.asgi:app`.

Settings come from the environment (VLMSERVE_*), as for every other process.
"""

from vlmserve.frontend.app import create_app
from vlmserve.shared.config import config_from_env
from vlmserve.shared.logs import setup_logging

_config = config_from_env()
setup_logging("frontend", _config.log_level, _config.log_format)
app = create_app(_config)
