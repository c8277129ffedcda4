"""One worker process (one tensor-parallel rank): load, allocate the cache, run step plans.

It PULLs StepPlans from its own plan socket and PUSHes WorkerMsgs to the scheduler's
results socket. A heartbeat thread (its own socket: ZeroMQ sockets are not thread-safe)
tells the scheduler it is alive, also while weights load and while a long step runs, and
ends the process when the scheduler has gone: a rank may then be waiting for a plan that
will never come, or blocked in a collective with a rank that waits for one.

With --tp above 1 the ranks form a torch.distributed group (workers/parallel.py). All
ranks run every plan; only rank 0 samples and answers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import sys
import threading
import time
import traceback

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from vlmserve.shared.config import Config
from vlmserve.shared.logs import setup_logging
from vlmserve.shared.messages import (
    Heartbeat,
    SchedulerMsg,
    Shutdown,
    StepPlan,
    WorkerFailed,
    WorkerMsg,
    WorkerReady,
)
from vlmserve.shared.models import read_model_info
from vlmserve.shared.models import session_len as model_session_len
from vlmserve.shared.sockets import Codec, make_socket
from vlmserve.workers.attention.registry import attention_backend
from vlmserve.workers.cpu_threads import StepThreads
from vlmserve.workers.grammar import GrammarBackend, logits_width
from vlmserve.workers.kv_pool import KVPool, num_blocks_for
from vlmserve.workers.layers.linear import warm_gemms
from vlmserve.workers.loader import load_model
from vlmserve.workers.logits_processors import FACTORIES
from vlmserve.workers.model_runner import ModelRunner
from vlmserve.workers.parallel import join_group, local_rank
from vlmserve.workers.prompt_logprobs import ROWS_PER_PASS

HEARTBEAT_S = 0.5


def pick_device(config: Config) -> torch.device:
    """cuda:<local rank> (among CUDA_VISIBLE_DEVICES, when set), or cpu."""
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", local_rank(config) % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def pick_dtype(config: Config, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def heartbeat_loop(ctx: zmq.Context, config: Config, stop: threading.Event) -> None:
    """Send heartbeats; end the process once the scheduler has been gone for --worker-timeout.

    The scheduler's going is seen as the connection of this socket dropping and not coming
    back. The process ends with os._exit: the main thread may be blocked in a collective
    that no signal or exception reaches.
    """
    sock = make_socket(ctx, zmq.PUSH, config.address("results"), bind=False)
    monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    codec = Codec(WorkerMsg)
    instance = f"{os.getpid()}-{secrets.token_hex(4)}"
    lost_since: float | None = None
    while not stop.is_set():  # the first at once: from then on the scheduler watches us
        with contextlib.suppress(zmq.Again):  # a queue full of heartbeats: skip this one
            sock.send(codec.encode(Heartbeat(rank=config.rank, instance=instance)), zmq.NOBLOCK)
        stop.wait(HEARTBEAT_S)
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            lost_since = time.monotonic() if event == zmq.EVENT_DISCONNECTED else None
        if lost_since is not None and time.monotonic() - lost_since > config.worker_timeout:
            logging.getLogger("vlmserve.worker").error(
                "the scheduler has been gone for %.1fs; exiting", time.monotonic() - lost_since
            )
            logging.shutdown()
            os._exit(1)
    sock.disable_monitor()
    monitor.close()
    sock.close()


def serve(config: Config) -> int:
    """Run until told to shut down (0), stopped by a signal (0), or something fails (1)."""
    log = setup_logging(f"worker{config.rank}", config.log_level, config.log_format)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: sys.exit(0))
    device = pick_device(config)
    dtype = pick_dtype(config, device)
    log.info(
        "worker rank %d/%d pid %d: model %s on %s (%s), plans %s, results %s",
        config.rank, config.tp, os.getpid(), config.model, device, dtype,
        config.plan_address(config.rank), config.address("results"),
    )  # fmt: skip
    ctx = zmq.Context()
    stop = threading.Event()
    threading.Thread(target=heartbeat_loop, args=(ctx, config, stop), daemon=True).start()
    results = make_socket(ctx, zmq.PUSH, config.address("results"), bind=False)
    plans = make_socket(ctx, zmq.PULL, config.plan_address(config.rank), bind=False)
    codec = Codec(WorkerMsg)
    plan_codec = Codec(SchedulerMsg)
    group = None
    try:
        backend = attention_backend(config.attention_backend)  # refused before loading
        group = join_group(config, device)  # before the model: layers shard by the group
        model = load_model(config.model, dtype, device, config.cpu_gemm)
        # oneDNN's kernels for every step size now, not as the load brings new sizes (linear.py)
        logit_rows = min(config.max_batched_tokens, max(config.max_batch_size, ROWS_PER_PASS))
        began = time.monotonic()
        if built := warm_gemms(model, config.max_batched_tokens, logit_rows):
            log.info("oneDNN GEMMs for %d shapes built in %.1f s", built, time.monotonic() - began)
        info = read_model_info(config.model)
        factories = FACTORIES
        if config.rank == 0:  # reads the vocabulary in a thread while the cache is allocated
            grammars = GrammarBackend(config.model, logits_width(model), info.eos_token_ids)
            factories = (*FACTORIES, grammars.processor_for)
        session_len = model_session_len(config.session_len, info)
        num_blocks = num_blocks_for(config, model, dtype, device, session_len)
        pool = KVPool.for_model(model, num_blocks, config.block_size, dtype, device)
        # Every rank runs the plan (the layers' collectives need all of them); the whole
        # vocabulary's logits are gathered to rank 0 alone. Only rank 0 samples and answers: no
        # broadcast of sampled tokens, and seeded draws happen in one place. The others
        # learn the tokens from the next plan like any other.
        runner = ModelRunner(
            model,
            backend(pool),
            info.eos_token_ids,
            device,
            config.encoder_cache_mb << 20,
            samples=config.rank == 0,
            processor_factories=factories,
        )
        threads = StepThreads(model, device)
        if built := threads.warm(model, logit_rows):
            log.info(
                "steps of up to %d tokens run on one thread; its oneDNN GEMMs for %d shapes built",
                threads.small_tokens, built,
            )  # fmt: skip
        results.send(codec.encode(WorkerReady(config.rank, num_blocks, str(device))))
        while True:
            head, *frames = plans.recv_multipart()
            msg = plan_codec.decode(head)
            match msg:
                case StepPlan():
                    threads.set_for(sum(step.num_tokens for step in msg.seqs))
                    result = runner.execute(msg, frames)
                    if config.rank == 0:
                        if runner.images is not None:
                            result.encoder_cache_queries = runner.images.cache.queries
                            result.encoder_cache_hits = runner.images.cache.hits
                        results.send(codec.encode(result))
                case Shutdown(reason=reason):
                    log.info("shutting down: %s", reason)
                    return 0
    except Exception as exc:  # any failure ends the group: tell the scheduler why, then exit
        log.error("worker failed: %s", traceback.format_exc())
        results.send(codec.encode(WorkerFailed(config.rank, f"{type(exc).__name__}: {exc}")))
        return 1
    finally:
        stop.set()
        if group is not None:
            group.close()
        results.close(linger=1000)
        plans.close()
