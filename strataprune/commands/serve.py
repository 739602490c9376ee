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
    parser.add_argument("--threads", type=int, help="compute threads (per replica with --ray; default there: --replica-cpus)")
    scale = parser.add_argument_group("scaling out with Ray Serve (the ray-serve extra; docs/serve.md, Scaling out)")
    scale.add_argument(
        "--ray", action="store_true", help="serve as replicas of a Ray Serve deployment behind Ray Serve's proxy on --host/--port"
    )
    scale.add_argument("--replicas", type=int, default=1, help="model copies, each with its own scheduler (needs --ray)")
    scale.add_argument(
        "--replica-cpus", dest="replica_cpus", type=float, default=1.0, help="CPUs Ray reserves for each replica (default 1)"
    )
    scale.add_argument(
        "--ray-address",
        dest="ray_address",
        help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: start a local instance)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"`strataprune serve` needs {exc.name}: pip install 'strataprune[serve]'") from None
    from strataprune.serve.server import ServeSettings, serve

    if not args.ray:
        for flag, value, default in (
            ("--replicas", args.replicas, 1),
            ("--replica-cpus", args.replica_cpus, 1.0),
            ("--ray-address", args.ray_address, None),
        ):
            if value != default:
                raise ConfigError(
                    f"{flag} {value} needs --ray; allowed without it: one process (several processes behind a load balancer: "
                    "docs/serve.md, Scaling out)"
                )

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
    if args.ray:
        from strataprune.serve.ray_app import serve_on_ray

        return serve_on_ray(args.dir, settings, args.replicas, args.replica_cpus, args.ray_address)
    return serve(args.dir, settings)
