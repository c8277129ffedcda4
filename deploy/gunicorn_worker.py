"""Gunicorn's native asgi worker, draining on SIGTERM before it stops.

Gunicorn's own graceful stop closes the listening socket at once (new clients are refused
rather than told 503) and then waits for every connection, idle keep-alive ones included.
This worker first drains the app (frontend/admission.py: new requests and /health get 503,
requests in flight finish, for at most --drain-timeout), closes the app's scheduler
connection, and then stops without waiting for idle connections: none of them holds a
request any more. A second SIGTERM changes nothing; SIGINT and SIGQUIT still stop at once.
"""

from __future__ import annotations

from gunicorn.workers.gasgi import ASGIWorker


class DrainingWorker(ASGIWorker):
    draining = False

    def handle_exit_signal(self) -> None:
        drain = getattr(getattr(self, "asgi", None), "drain", None)
        if drain is None:  # not loaded yet, or an app that cannot drain
            super().handle_exit_signal()
            return
        if not self.draining:
            self.draining = True
            self.loop.create_task(self._drain_then_stop(drain))

    async def _drain_then_stop(self, drain) -> None:  # noqa: ANN001 - the app's coroutine fn
        try:
            await drain()
            if self.lifespan is not None:
                await self.lifespan.shutdown()
                self.lifespan = None  # done: the worker's own shutdown skips it
        except Exception:
            self.log.exception("draining failed; stopping now")
        finally:
            self._quick_shutdown = True  # only idle keep-alive connections are left
            self.alive = False
