"""The one settings object every process reads, from flags or `VLMSERVE_*` environment.

Every process (scheduler, each worker rank, each frontend) is started with the same
settings, whether by the CLI launcher, a Procfile line or a systemd unit; each derives
its own view with `msgspec.structs.replace(config, rank=i)`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
from typing import Any

import msgspec

ENV_PREFIX = "VLMSERVE_"
# Names of the frontend's output parsers (frontend/tool_parsers, frontend/reasoning; vLLM's).
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")
REASONING_PARSERS = ("deepseek_r1", "qwen3")

# One line of help per setting; the flag is the field name with dashes.
HELP: dict[str, str] = {
    "model": "local checkpoint directory (or a Hugging Face hub id when online)",
    "model_name": "name served in /v1/models and expected in requests (default: the model "
    "argument as given)",
    "generation_config": "sampling defaults of requests that set none: auto (the checkpoint's "
    "generation_config.json, as vLLM), vllm (ignore it: temperature 1, top_p 1, ...) or a "
    "directory holding a generation_config.json",
    "run_id": "per-launch suffix of every socket address, shared by all processes of one server",
    "ipc_dir": "directory for ipc:// sockets and the tensor-parallel rendezvous file",
    "engine_host": "host the scheduler binds (or frontends and workers connect to) over tcp",
    "engine_port": "first of the scheduler's tcp ports; 0 means ipc:// sockets on this host",
    "tp": "tensor-parallel size: number of worker processes",
    "rank": "this worker's tensor-parallel rank",
    "nnodes": "number of machines the tensor-parallel ranks span (--tp / --nnodes on each)",
    "node_rank": "this machine's index among --nnodes; it runs the --rank values (global) "
    "node_rank * tp / nnodes up to the next node's first",
    "master_addr": "address of rank 0's machine for the tensor-parallel rendezvous over tcp; "
    "empty: a file in --ipc-dir (one machine)",
    "master_port": "tcp port rank 0 serves the tensor-parallel rendezvous on (--master-addr)",
    "dist_timeout": "seconds a rank waits for the others, at the rendezvous and in a collective",
    "device": "cpu, cuda, or auto (cuda when available)",
    "dtype": "float32, bfloat16, float16, or auto (float32 on cpu, the checkpoint's on cuda)",
    "block_size": "tokens per KV cache block",
    "max_batch_size": "most sequences running at once",
    "max_batched_tokens": "token budget of one step; longer prompts are prefilled in chunks "
    "(smaller: first tokens sooner under concurrent load, as prompts are staggered over more "
    "steps)",
    "session_len": "most tokens (prompt + output) per request; 0 means the model's maximum",
    "cache_max_entry_count": "fraction of free device memory (on cpu: of --cpu-cache-gib) for KV",
    "cpu_cache_gib": "memory budget on cpu that --cache-max-entry-count is a fraction of",
    "num_kv_blocks": "exact number of KV blocks, overriding the memory-based size (0: off)",
    "attention_backend": "attention kernels the workers run over the KV cache: sdpa (torch's "
    "fused scaled-dot-product kernels, and on cpu compiled prefill and decode kernels that read "
    "the paged cache in place: the fast CPU path), sdpa_gather (sdpa without the compiled "
    "kernels: torch's SDPA for prefills, decodes gathering their blocks) or torch (the "
    "plain-torch reference every backend is tested against)",
    "cpu_gemm": "kernel of the linear layers on cpu: onednn (the default: weights prepacked once "
    "at load, ~1.3x faster than aten on AMD; its kernels for every step size are built at "
    "start-up) or aten (torch's F.linear, MKL's sgemm on x86)",
    "worker_timeout": "seconds without a heartbeat after which a serving worker counts as dead "
    "(a loading one gets at least 60); native calls that hold Python's GIL, such as building a "
    "tokenizer or a grammar, can silence a worker for seconds on a busy host",
    "worker_startup_timeout": "seconds the scheduler waits for every worker to load and report "
    "ready",
    "seed": "seed for requests that bring none",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "text (human-readable lines) or json (one JSON object per line, for log "
    "shippers); every process, gunicorn's own lines included",
    "log_requests": "put each request's prompt text in its completion log line (off: never logged)",
    "server_name": "address the HTTP server binds",
    "server_port": "port the HTTP server binds",
    "frontend_workers": "number of Gunicorn worker processes (frontends)",
    "start_timeout": "seconds `serve api_server` (and the test launcher) waits for /health",
    "api_keys": "comma-separated API keys; empty means no authentication",
    "max_body_mb": "largest request body the HTTP server accepts, in MiB (413 above)",
    "encoder_cache_mb": "memory for cached vision-encoder outputs per worker, in MiB (0: off)",
    "allowed_local_media_path": "images may be local paths or file:// URLs only under this "
    "directory; empty refuses them",
    "allowed_media_domains": "comma-separated hosts fetched even when they resolve to private, "
    "loopback or link-local addresses",
    "limit_mm_per_prompt": "most images in one request",
    "image_fetch_timeout": "seconds an image fetch may take in all (redirects and body included)",
    "image_max_bytes": "largest image accepted, in bytes (fetched, decoded data: URL or file)",
    "image_max_pixels": "largest image accepted, in pixels (width * height), before decoding",
    "image_max_redirects": "most HTTP redirects followed when fetching an image",
    "video_max_bytes": "largest video accepted, in bytes (fetched, decoded data: URL or file)",
    "video_max_seconds": "longest video accepted, in seconds (longer ones are refused)",
    "video_max_frames": "most frames sampled from one video; a request's `max_frames` may ask "
    "fewer",
    "video_fps": "frames sampled per second of video unless the request's video part sets `fps`",
    "mm_max_pixels": "ceiling, in pixels, on how large Qwen-VL images (and Qwen2/2.5-VL video "
    "frames) are resized to: a request's mm_processor_kwargs min_pixels / max_pixels above it "
    "are refused and the checkpoint's own max_pixels is lowered to it (0: the checkpoint's own "
    "max_pixels is the ceiling)",
    "tool_call_parser": "how the model writes tool calls, for `tool_choice: auto`: "
    + ", ".join(TOOL_CALL_PARSERS)
    + " (empty: auto tool choice is refused)",
    "reasoning_parser": "how the model writes its thinking (reasoning_content): "
    + ", ".join(REASONING_PARSERS)
    + " (empty: none)",
    "max_queued_requests": "most requests waiting for the engine (not yet running); past it a "
    "new request gets 503 with Retry-After at once (0: no cap)",
    "max_queued_tokens": "most prompt tokens of the requests waiting for the engine; past it a "
    "new request gets 503 with Retry-After at once (0: no cap)",
    "max_concurrent_requests": "most generation requests one frontend process serves at once; "
    "past it 503 with Retry-After at once (0: no cap)",
    "queue_timeout": "seconds a request may wait for its first token before it is aborted with "
    "503 (0: no limit)",
    "request_timeout": "seconds a request may take in all unless it sets its own `timeout`; "
    "past it the request ends with a 408 error (0: no limit)",
    "drain_timeout": "seconds a stopping frontend (SIGTERM) waits for its requests in flight to "
    "finish, answering 503 to new ones, before it exits",
}


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of one server; see HELP for what each field means."""

    model: str = ""
    model_name: str = ""
    generation_config: str = "auto"
    run_id: str = ""
    ipc_dir: str = tempfile.gettempdir()
    engine_host: str = "127.0.0.1"
    engine_port: int = 0
    tp: int = 1
    rank: int = 0
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = ""
    master_port: int = 0
    dist_timeout: float = 300.0
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    max_batch_size: int = 128
    # 1024, not vLLM's 2048: on the CPU benchmark (bench/serve_bench.py's q30m, 2026-12-03)
    # TTFT p50 fell 460 -> 300 ms at c=8 and 790 -> 575 ms at c=32 with output tok/s unchanged
    # within noise; 512 cut TTFT further but cost c=32 throughput in one of two runs.
    max_batched_tokens: int = 1024
    session_len: int = 0
    cache_max_entry_count: float = 0.8
    cpu_cache_gib: float = 4.0
    num_kv_blocks: int = 0
    attention_backend: str = "sdpa"
    cpu_gemm: str = "onednn"
    worker_timeout: float = 10.0
    worker_startup_timeout: float = 900.0
    seed: int = 0
    log_level: str = "INFO"
    log_format: str = "text"
    log_requests: bool = False
    server_name: str = "0.0.0.0"
    server_port: int = 23333
    frontend_workers: int = 1
    start_timeout: float = 900.0
    api_keys: str = ""
    max_body_mb: int = 32
    encoder_cache_mb: int = 1024
    allowed_local_media_path: str = ""
    allowed_media_domains: str = ""
    limit_mm_per_prompt: int = 8
    image_fetch_timeout: float = 10.0
    image_max_bytes: int = 20 * 2**20
    image_max_pixels: int = 40_000_000
    image_max_redirects: int = 3
    video_max_bytes: int = 64 * 2**20
    video_max_seconds: float = 600.0
    video_max_frames: int = 32
    video_fps: float = 2.0
    mm_max_pixels: int = 0
    tool_call_parser: str = ""
    reasoning_parser: str = ""
    max_queued_requests: int = 0
    max_queued_tokens: int = 0
    max_concurrent_requests: int = 0
    queue_timeout: float = 0.0
    request_timeout: float = 0.0
    drain_timeout: float = 30.0

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.tp <= 64, "--tp must be between 1 and 64"),
            (0 <= self.rank < self.tp, f"--rank must be in [0, {self.tp})"),
            (
                self.nnodes >= 1 and self.tp % self.nnodes == 0,
                "--nnodes must be at least 1 and divide --tp",
            ),
            (0 <= self.node_rank < self.nnodes, f"--node-rank must be in [0, {self.nnodes})"),
            (
                self.nnodes == 1 or (self.master_addr and self.engine_port),
                "--nnodes above 1 needs --master-addr and --master-port (the rendezvous) and "
                "--engine-port (the scheduler over tcp)",
            ),
            (
                not self.master_addr or 0 < self.master_port < 65536,
                "--master-addr needs --master-port (1..65535)",
            ),
            (self.dist_timeout > 0, "--dist-timeout must be positive"),
            (self.block_size >= 1, "--block-size must be at least 1"),
            (self.max_batch_size >= 1, "--max-batch-size must be at least 1"),
            (self.max_batched_tokens >= 1, "--max-batched-tokens must be at least 1"),
            (0 < self.cache_max_entry_count <= 1, "--cache-max-entry-count must be in (0, 1]"),
            (self.session_len >= 0, "--session-len must be positive (or 0 for the model's)"),
            (self.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
            (
                self.dtype in ("auto", "float32", "bfloat16", "float16"),
                "--dtype must be auto, float32, bfloat16 or float16",
            ),
            (self.cpu_gemm in ("onednn", "aten"), "--cpu-gemm must be onednn or aten"),
            (self.frontend_workers >= 1, "--frontend-workers must be at least 1"),
            (
                self.tool_call_parser in ("", *TOOL_CALL_PARSERS),
                f"--tool-call-parser must be one of {', '.join(TOOL_CALL_PARSERS)}",
            ),
            (
                self.reasoning_parser in ("", *REASONING_PARSERS),
                f"--reasoning-parser must be one of {', '.join(REASONING_PARSERS)}",
            ),
            (self.log_format in ("text", "json"), "--log-format must be text or json"),
            (self.worker_startup_timeout > 0, "--worker-startup-timeout must be positive"),
            (self.start_timeout > 0, "--start-timeout must be positive"),
            (self.max_queued_requests >= 0, "--max-queued-requests must be 0 (off) or more"),
            (self.max_queued_tokens >= 0, "--max-queued-tokens must be 0 (off) or more"),
            (
                self.max_concurrent_requests >= 0,
                "--max-concurrent-requests must be 0 (off) or more",
            ),
            (self.queue_timeout >= 0, "--queue-timeout must be 0 (off) or positive"),
            (self.request_timeout >= 0, "--request-timeout must be 0 (off) or positive"),
            (self.drain_timeout >= 0, "--drain-timeout must be 0 or positive"),
            (self.video_max_seconds > 0, "--video-max-seconds must be positive"),
            (self.video_max_frames >= 1, "--video-max-frames must be at least 1"),
            (self.video_fps > 0, "--video-fps must be positive"),
            (self.mm_max_pixels >= 0, "--mm-max-pixels must be 0 (the checkpoint's) or more"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def served_name(self) -> str:
        """--model-name, else the model as given (vLLM's and LMDeploy's default name)."""
        return self.model_name or self.model

    def address(self, name: str) -> str:
        """The ZeroMQ address of one of the engine's sockets (see ADDRESS_SLOTS)."""
        if not self.run_id:
            raise ValueError("set --run-id (or VLMSERVE_RUN_ID) so the processes find each other")
        if self.engine_port:
            return f"tcp://{self.engine_host}:{self.engine_port + ADDRESS_SLOTS[name]}"
        return f"ipc://{os.path.join(self.ipc_dir, f'vlmserve-{self.run_id}-{name}')}"

    def plan_address(self, rank: int) -> str:
        return self.address(f"plans{rank}")


# Offsets from --engine-port for tcp; plan sockets follow, one per rank.
ADDRESS_SLOTS: dict[str, int] = {"requests": 0, "tokens": 1, "results": 2} | {
    f"plans{rank}": 3 + rank for rank in range(64)
}


def new_run_id() -> str:
    return secrets.token_hex(4)


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per Config field, its default taken from `VLMSERVE_<FIELD>` if set."""
    defaults = Config()
    for field in msgspec.structs.fields(Config):
        if field.name in skip:
            continue
        env = os.environ.get(ENV_PREFIX + field.name.upper())
        default = getattr(defaults, field.name) if env is None else env
        # A bool flag alone means true (`--log-requests`); `--log-requests false` also works.
        flag = {"nargs": "?", "const": "true"} if field.type is bool else {}
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            default=default,
            **flag,
            help=f"{HELP[field.name]} (env {ENV_PREFIX}{field.name.upper()})",
        )


def config_from_args(args: argparse.Namespace, **overrides: Any) -> Config:
    """Build and validate the Config from parsed flags (strings are converted by type)."""
    names = [field.name for field in msgspec.structs.fields(Config)]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values.update(overrides)
    return msgspec.convert(values, Config, strict=False)


def config_to_env(config: Config) -> dict[str, str]:
    """The environment that makes a child process read the same Config."""
    return {
        ENV_PREFIX + field.name.upper(): str(getattr(config, field.name))
        for field in msgspec.structs.fields(Config)
    }


def config_from_env() -> Config:
    """The Config of a process started with no flags (a Gunicorn worker): environment only."""
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return config_from_args(parser.parse_args([]))
