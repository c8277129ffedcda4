"""The scheduler process: the sockets around the Scheduler policy, and worker liveness.

It binds every engine socket (frontends and workers connect), waits for all ranks to be
ready, then loops: take requests, plan a step when none is in flight, publish tokens.
One step is in flight at a time, so a block freed by an abort is never reused by a step
that runs concurrently with the one that still writes it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import defaultdict
from dataclasses import dataclass

import msgspec
import zmq

from vlmserve.scheduler.admission import QueueLimits
from vlmserve.scheduler.scheduler import Scheduler
from vlmserve.shared.config import Config
from vlmserve.shared.logs import setup_logging
from vlmserve.shared.messages import (
    ERROR,
    STATUS_TOPIC,
    Abort,
    EngineMsg,
    EngineStatus,
    FrontendMsg,
    Heartbeat,
    Hello,
    HelloAck,
    RequestOutput,
    SchedulerMsg,
    Shutdown,
    StepResult,
    Submit,
    TokenBatch,
    WorkerFailed,
    WorkerMsg,
    WorkerReady,
)
from vlmserve.shared.models import checkpoint_spec, read_model_info
from vlmserve.shared.models import session_len as model_session_len
from vlmserve.shared.sockets import Codec, make_socket

STATUS_EVERY_S = 0.5
EXPIRE_EVERY_S = 0.1
# How long a loading worker may be silent: imports, weight loading and the tokenizer built
# for grammars hold Python's GIL in stretches that a busy host stretches past seconds (a
# worker starved this way failed a gemma-3 server's start at load 7 on 2 cores).
LOADING_SILENCE_S = 60.0

log = logging.getLogger("vlmserve.scheduler")


class WorkerLost(Exception):
    """A worker failed or went silent; the whole group must restart."""


class Stopped(Exception):
    """SIGINT or SIGTERM arrived."""


@dataclass
class StepStats:
    """Where the scheduler's time goes: its own work versus waiting for the workers."""

    steps: int = 0
    scheduler_s: float = 0.0
    step_s: float = 0.0
    encoder_cache_queries: int = 0  # rank 0's latest cumulative counts (StepResult)
    encoder_cache_hits: int = 0


class SchedulerService:
    """The scheduler process's sockets, publishing and worker liveness around one Scheduler."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.ctx = zmq.Context()
        self.requests = make_socket(self.ctx, zmq.PULL, config.address("requests"), bind=True)
        self.tokens = make_socket(self.ctx, zmq.PUB, config.address("tokens"), bind=True)
        self.results = make_socket(self.ctx, zmq.PULL, config.address("results"), bind=True)
        self.plans = [
            make_socket(self.ctx, zmq.PUSH, config.plan_address(rank), bind=True)
            for rank in range(config.tp)
        ]
        self.frontend_codec = Codec(FrontendMsg)
        self.engine_codec = Codec(EngineMsg)
        self.worker_codec = Codec(WorkerMsg)
        self.plan_codec = Codec(SchedulerMsg)
        self.topic_seq: dict[str, int] = defaultdict(int)
        self.last_seen: dict[int, float] = {}
        self.instances: dict[int, str] = {}  # each rank's process, from its heartbeats
        self.scheduler: Scheduler | None = None
        self.in_flight: float | None = None  # when the step in flight was sent
        self.stats = StepStats()
        self.stopping = False
        self.instance = f"{os.getpid()}-{time.time_ns()}"
        self.poller = zmq.Poller()
        self.poller.register(self.requests, zmq.POLLIN)
        self.poller.register(self.results, zmq.POLLIN)

    # ---- publishing ----

    def publish(self, frontend_id: str, msg: EngineMsg) -> None:
        self.tokens.send_multipart([frontend_id.encode(), self.engine_codec.encode(msg)])

    def publish_outputs(self, outputs: dict[str, list[RequestOutput]]) -> None:
        """One TokenBatch per frontend: every token its requests got in this step."""
        for frontend_id, items in outputs.items():
            self.topic_seq[frontend_id] += 1
            self.publish(frontend_id, TokenBatch(self.topic_seq[frontend_id], items))

    def publish_status(self, alive: bool) -> None:
        s = self.scheduler
        status = EngineStatus(
            workers_alive=alive,
            instance=self.instance,
            num_running=s.num_running if s else 0,
            num_waiting=s.num_waiting if s else 0,
            free_blocks=s.num_free_blocks if s else 0,
            steps=self.stats.steps,
            preemptions=s.num_preemptions if s else 0,
            scheduler_s=self.stats.scheduler_s,
            step_s=self.stats.step_s,
            total_blocks=s.block_manager.num_blocks if s else 0,
            prefix_cache_queries=s.prefix_cache_queries if s else 0,
            prefix_cache_hits=s.prefix_cache_hits if s else 0,
            encoder_cache_queries=self.stats.encoder_cache_queries,
            encoder_cache_hits=self.stats.encoder_cache_hits,
            queue_time_counts=list(s.queue_time_counts) if s else [],
            queue_time_sum=s.queue_time_sum if s else 0.0,
        )
        self.tokens.send_multipart([STATUS_TOPIC, self.engine_codec.encode(status)])

    # ---- workers ----

    def handle_worker(self, msg: WorkerMsg) -> WorkerReady | None:
        match msg:
            case Heartbeat(rank=rank, instance=instance):
                known = self.instances.setdefault(rank, instance)
                if known != instance:  # restarted by its supervisor before it was missed
                    raise WorkerLost(f"worker rank {rank} restarted (a new process)")
                self.last_seen[rank] = time.monotonic()
            case WorkerReady(rank=rank):
                self.last_seen[rank] = time.monotonic()
                return msg
            case WorkerFailed(rank=rank, error=error):
                raise WorkerLost(f"worker rank {rank} failed: {error}")
            case StepResult():
                self.finish_step(msg)
        return None

    def check_liveness(self, timeout: float) -> None:
        now = time.monotonic()
        for rank in range(self.config.tp):
            seen = self.last_seen.get(rank)
            if seen is not None and now - seen > timeout:
                raise WorkerLost(f"worker rank {rank} sent nothing for {now - seen:.1f}s")

    def wait_for_workers(self) -> int:
        """Block until every rank is ready; return the KV blocks all of them have."""
        ready: dict[int, WorkerReady] = {}
        deadline = time.monotonic() + self.config.worker_startup_timeout
        while len(ready) < self.config.tp:
            if self.results.poll(100):
                msg = self.handle_worker(self.worker_codec.decode(self.results.recv()))
                if msg is not None:
                    ready[msg.rank] = msg
                    log.info(
                        "worker rank %d ready on %s: %d KV blocks",
                        msg.rank,
                        msg.device,
                        msg.num_blocks,
                    )
            self.drain_requests()  # answer hellos so frontends can start while we load
            self.check_liveness(max(self.config.worker_timeout, LOADING_SILENCE_S))
            if self.stopping:
                raise Stopped("stopped before the workers were ready")
            if time.monotonic() > deadline:
                raise WorkerLost(
                    f"workers not ready after {self.config.worker_startup_timeout:.0f}s"
                )
        return min(r.num_blocks for r in ready.values())

    # ---- frontends ----

    def drain_requests(self) -> None:
        while self.requests.poll(0):
            head, *frames = self.requests.recv_multipart()
            try:
                msg = self.frontend_codec.decode(head)
            except msgspec.DecodeError:  # with tcp, anyone may connect: never die of it
                log.error("dropped an undecodable message on the requests socket")
                continue
            match msg:
                case Hello(frontend_id=frontend_id):
                    self.topic_seq[frontend_id] = 0
                    self.publish(frontend_id, HelloAck(0))
                case Submit():
                    self.submit(msg, frames)
                case Abort(request_id=request_id):
                    if self.scheduler is not None:
                        self.scheduler.abort(request_id)

    def submit(self, msg: Submit, frames: list[bytes]) -> None:
        expected = sum(len(image.arrays) for image in msg.images)
        if self.scheduler is None:
            problem = "the engine is starting"
            error = RequestOutput(msg.request_id, [], finish_reason=ERROR, error=problem)
        elif len(frames) != expected:
            problem = f"expected {expected} image array frames, got {len(frames)}"
            error = RequestOutput(msg.request_id, [], finish_reason=ERROR, error=problem)
        else:
            error = self.scheduler.add(msg, frames)
        if error is not None:
            self.publish_outputs({msg.frontend_id: [error]})

    # ---- steps ----

    def start_step(self) -> None:
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        if plan is None:
            return
        message = [self.plan_codec.encode(plan), *self.scheduler.plan_frames(plan)]
        for sock in self.plans:
            sock.send_multipart(message)
        self.in_flight = time.perf_counter()
        self.stats.scheduler_s += self.in_flight - started

    def finish_step(self, result: StepResult) -> None:
        received = time.perf_counter()
        self.stats.step_s += received - (self.in_flight or received)
        self.stats.steps += 1
        self.stats.encoder_cache_queries = result.encoder_cache_queries
        self.stats.encoder_cache_hits = result.encoder_cache_hits
        self.in_flight = None
        self.publish_outputs(self.scheduler.update(result))
        self.stats.scheduler_s += time.perf_counter() - received

    def run(self) -> None:
        num_blocks = self.wait_for_workers()
        info = read_model_info(self.config.model)
        session_len = model_session_len(self.config.session_len, info)
        self.scheduler = Scheduler(
            num_blocks=num_blocks,
            block_size=self.config.block_size,
            max_batch_size=self.config.max_batch_size,
            max_batched_tokens=self.config.max_batched_tokens,
            session_len=session_len,
            eos_token_ids=info.eos_token_ids,
            seed=self.config.seed,
            limits=QueueLimits(
                self.config.max_queued_requests,
                self.config.max_queued_tokens,
                self.config.queue_timeout,
            ),
            bidirectional_images=checkpoint_spec(self.config.model).bidirectional_images,
        )
        log.info("engine ready: %d KV blocks, session length %d", num_blocks, session_len)
        next_status = next_expiry = 0.0
        while not self.stopping:
            idle = self.in_flight is None and not self.scheduler.has_unfinished
            events = dict(self.poller.poll(50 if idle or self.in_flight else 0))
            if self.results in events:
                while self.results.poll(0):
                    self.handle_worker(self.worker_codec.decode(self.results.recv()))
            self.drain_requests()
            self.check_liveness(self.config.worker_timeout)
            if time.monotonic() >= next_expiry:  # --queue-timeout, checked a few times a second
                self.publish_outputs(self.scheduler.expire(time.monotonic()))
                next_expiry = time.monotonic() + EXPIRE_EVERY_S
            if self.in_flight is None:
                self.start_step()
            if time.monotonic() >= next_status:
                self.publish_status(alive=True)
                next_status = time.monotonic() + STATUS_EVERY_S

    def fail_everything(self, reason: str) -> None:
        if self.scheduler is not None:
            self.publish_outputs(self.scheduler.fail_all(reason))
        self.publish_status(alive=False)

    def shutdown_workers(self, reason: str) -> None:
        data = self.plan_codec.encode(Shutdown(reason))
        for sock in self.plans:
            try:
                sock.send(data, zmq.NOBLOCK)
            except zmq.Again:  # that worker is gone already (or never came)
                pass

    def close(self) -> None:
        time.sleep(0.2)  # let the last publications leave before the sockets close
        for sock in [self.requests, self.tokens, self.results, *self.plans]:
            sock.close(linger=500)
        self.ctx.term()
        for name in [
            "requests",
            "tokens",
            "results",
            *[f"plans{r}" for r in range(self.config.tp)],
        ]:
            address = self.config.address(name)
            if address.startswith("ipc://") and os.path.exists(address[len("ipc://") :]):
                os.unlink(address[len("ipc://") :])


def serve(config: Config) -> int:
    """Run the scheduler; 0 after SIGINT/SIGTERM, 1 when a worker is lost."""
    setup_logging("scheduler", config.log_level, config.log_format)
    service = SchedulerService(config)
    log.info(
        "scheduler pid %d: model %s, tp %d, requests %s, tokens %s, results %s, block size %d, "
        "max batch %d, step budget %d tokens",
        os.getpid(), config.model, config.tp, config.address("requests"),
        config.address("tokens"), config.address("results"), config.block_size,
        config.max_batch_size, config.max_batched_tokens,
    )  # fmt: skip

    def stop(signum: int, _frame: object) -> None:
        service.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        service.run()
        service.fail_everything("server is shutting down")
        service.shutdown_workers("scheduler stopped")
        return 0
    except Stopped as exc:
        log.info("%s", exc)
        service.shutdown_workers(str(exc))
        return 0
    except WorkerLost as exc:
        log.error("%s; failing all requests and exiting", exc)
        service.fail_everything(f"engine failure: {exc}")
        service.shutdown_workers(str(exc))
        return 1
    except Exception as exc:  # a bug: still fail the requests and stop the group, then exit
        log.exception("scheduler failed; failing all requests and exiting")
        service.fail_everything(f"engine failure: scheduler error {type(exc).__name__}: {exc}")
        service.shutdown_workers("scheduler failed")
        return 1
    finally:
        service.close()
