"""Serve a deployed model over HTTP, OpenAI-compatible, with continuous batching (``strataprune serve``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from strataprune.contract.errors import ConfigError


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("serve", help="serve a deployed model over HTTP (OpenAI-compatible, continuous batching)")
    parser.add_argument("dir", help="output folder of `strataprune deploy` (or of `strataprune run`, or a saved model)")
    parser.add_argument("--backend", help="backend name, NAME:key=value to set parameters (default: deploy.json's, else torch)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    parser.add_argument("--max-running", dest="max_running", type=int, default=8, help="sequences decoded together")
    parser.add_argument(
        "--max-batched-tokens",
        dest="max_batched_tokens",
        type=int,
        default=2048,
        help="tokens per scheduler step (decode + prefill)",
    )
    parser.add_argument(
        "--prefill-chunk", dest="prefill_chunk", type=int, default=256, help="most prompt tokens prefilled per step"
    )
    parser.add_argument("--max-queue", dest="max_queue", type=int, default=64, help="waiting requests before 429")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take, queueing included (then 504)")
    parser.add_argument(
        "--max-body-bytes", dest="max_body_bytes", type=int, default=1 << 20, help="request body limit (then 413)"
    )
    parser.add_argument("--api-key", dest="api_key", help="require Authorization: Bearer KEY (default: $STRATAPRUNE_API_KEY)")
    parser.add_argument("--model-name", dest="model_name", help="the model id clients send (default: the folder's name)")
    parser.add_argument("--threads", type=int, help="compute threads")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"`strataprune serve` needs {exc.name}: pip install 'strataprune[serve]'") from None
    from strataprune.serve.server import ServeSettings, serve

    settings = ServeSettings(
        backend=args.backend,
        host=args.host,
        port=args.port,
        max_running=args.max_running,
        max_batched_tokens=args.max_batched_tokens,
        max_queue=args.max_queue,
        timeout=args.timeout,
        api_key=args.api_key if args.api_key is not None else (os.environ.get("STRATAPRUNE_API_KEY") or None),
        prefill_chunk=args.prefill_chunk,
        max_body_bytes=args.max_body_bytes,
        threads=args.threads,
        model_name=args.model_name,
    )
    return serve(args.dir, settings)
