"""One worker process (one tensor-parallel rank): load, allocate the cache, run step plans.

It PULLs StepPlans from its own plan socket and PUSHes WorkerMsgs to the scheduler's
results socket. A heartbeat thread (its own socket: ZeroMQ sockets are not thread-safe)
tells the scheduler it is alive, also while weights load and while a long step runs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback

import torch
import zmq

from shared.config import Config
from shared.logs import setup_logging
from shared.messages import (
    Heartbeat,
    SchedulerMsg,
    Shutdown,
    StepPlan,
    WorkerFailed,
    WorkerMsg,
    WorkerReady,
)
from shared.model_info import read_model_info
from shared.sockets import Codec, make_socket
from workers.kv_cache import allocate_kv_cache, num_blocks_for
from workers.loader import load_model
from workers.model_runner import ModelRunner

HEARTBEAT_S = 0.5


def pick_device(config: Config) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", config.rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def pick_dtype(config: Config, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def heartbeat_loop(ctx: zmq.Context, config: Config, stop: threading.Event) -> None:
    sock = make_socket(ctx, zmq.PUSH, config.address("results"), bind=False)
    codec = Codec(WorkerMsg)
    while not stop.wait(HEARTBEAT_S):
        sock.send(codec.encode(Heartbeat(rank=config.rank)))
    sock.close()


def serve(config: Config) -> int:
    """Run until told to shut down (0), stopped by a signal (0), or something fails (1)."""
    log = setup_logging(f"worker{config.rank}", config.log_level)
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
    try:
        model = load_model(config.model, dtype, device)
        info = read_model_info(config.model)
        session_len = config.session_len or info.max_position_embeddings
        num_blocks = num_blocks_for(config, model, dtype, device, session_len)
        allocate_kv_cache(model, num_blocks, config.block_size, dtype, device)
        runner = ModelRunner(
            model, config.block_size, info.eos_token_ids, device, config.encoder_cache_mb << 20
        )
        results.send(codec.encode(WorkerReady(config.rank, num_blocks, str(device))))
        while True:
            head, *frames = plans.recv_multipart()
            msg = plan_codec.decode(head)
            match msg:
                case StepPlan():
                    result = runner.execute(msg, frames)
                    if config.rank == 0:
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
        results.close(linger=1000)
        plans.close()
