"""Load on `strataprune serve` over loopback: request and token throughput, TTFT / TPOT / ITL, errors.

    python benchmarks/serve.py MODEL_DIR [--backend torch] [--concurrency 1,4,16] [--requests 32]
                               [--prompt-tokens 64] [--max-tokens 64] [--threads 2] [--label tiny]

For each setting of the server (continuous batching with --max-running 16, and the same server
serving one sequence at a time, --max-running 1, as the baseline measured in the same run) the
script starts the real server on 127.0.0.1 (a free port), waits for /health, then at each
concurrency C keeps C streaming requests in flight until ``--requests`` have finished (greedy,
``ignore_eos``, so every request generates exactly ``--max-tokens`` tokens). Per request: TTFT
(send to first text chunk), ITL (gaps between chunks), TPOT ((end - first) / (tokens - 1)), end to
end; per level: requests/s and generated tokens/s over the wall clock, the server's process CPU
time (user + system, from /proc), errors by kind. Every request has a timeout; a level stops at
``--level-timeout`` seconds. Writes benchmarks/results/serve-<label>-<UTC>.json and .md with the
CPU model, its ISA flags, the load average before and after and the clock.

Comparison with llama.cpp's own OpenAI-compatible server (``llama-cpp-python``'s ``llama_cpp.server``, which
needs ``sse-starlette starlette-context pydantic-settings fastapi`` beside ``llama-cpp-python``; not part of
strataprune's install)::

    python benchmarks/serve.py smollm2-135m --no-baseline --serve /path/to/run#sparse-cpu \
        --llama-cpp Q8_0.gguf,Q4_0.gguf --threads 1 --concurrency 1,4 --requests 8 --label llamacpp

Scaling out with Ray Serve (docs/serve.md, Scaling out): ``--ray-replicas 1,2`` adds ``strataprune serve --ray
--replicas N`` (a local Ray instance it starts) for each N beside the single process, with ``--threads`` split over
the replicas (``--threads 2 --ray-replicas 2``: two replicas of one thread and one CPU each); its CPU time is that of
the whole process tree (Ray's GCS, raylet, proxy and controller included). ``--url NAME=URL`` measures a server that
is already running (a Ray Serve deployment on a cluster, a load balancer), without CPU time::

    python benchmarks/serve.py tiny --no-baseline --threads 2 --ray-replicas 1,2 --concurrency 4,16 --label ray-tiny
    python benchmarks/serve.py tiny --no-baseline --no-local --url cluster=http://10.0.0.5:8000 --label cluster

``--serve DIR[#BACKEND]`` adds more of our servers to the same table; ``--llama-cpp`` starts llama.cpp's server
on each GGUF with the same threads and sends the same requests. It has no ``ignore_eos``, so the end-of-text
token gets a -100 logit bias instead (llama.cpp's own way to ban a token), and its stream reports no usage, so
its generated tokens are counted as streamed chunks (one per token); throughput is per generated token either way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from results_files import (  # benchmarks/ is on sys.path when this script runs
    ResultFiles,
    cpu_flags,
    cpu_model,
    cpuinfo_values,
    utc_stamp,
)

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the quick brown fox jumps over the lazy dog while a model learns to predict the next word".split()


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    flags = cpu_flags()
    if flags is not None:  # Linux x86, where /proc/cpuinfo names the model, the flags and the clocks
        info["cpu"] = cpu_model()
        info["isa"] = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
        info["mhz"] = sorted({round(float(m)) for m in cpuinfo_values("cpu MHz")})
    return info


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def stop_on_sigterm(signum: int, frame: Any) -> None:  # noqa: ARG001 -- the signal-handler signature
    raise KeyboardInterrupt


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and every process below it (a Ray server's replicas, proxy, raylet and GCS)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
        except (OSError, IndexError, ValueError):  # it exited meanwhile
            continue
        todo.extend(children.get(current, []))
    return total


class RunningServer:
    """A server started elsewhere (``--url``): measured over HTTP only, no CPU time."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.proc = None

    def stop(self) -> None:
        pass


class Server:
    def __init__(self, folder: str, flags: list[str]) -> None:
        command = [sys.executable, "-m", "strataprune", "serve", folder, "--port", "0", *flags]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.url = ""
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 300  # a Ray Serve deployment starts Ray, then loads every replica
        for line in self.proc.stderr:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.url = found.group(1)
                break
            if time.monotonic() > deadline:
                break
        if not self.url:
            self.stop()
            raise SystemExit("error: the server did not start")
        while time.monotonic() < deadline + 300:
            try:
                if httpx.get(self.url + "/health", timeout=5).json().get("status") == "ok":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit("error: the server did not become healthy")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class LlamaCppServer:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python) on one GGUF, on 127.0.0.1, killed at the end."""

    def __init__(self, gguf: str, threads: int, context: int) -> None:
        with socket.socket() as probe:  # a free port: its server cannot be told to pick one and report it
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port)]
        command += ["--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(context)]
        # it serves one request at a time (a lock); without this a waiting request would cut off the streaming one
        command += ["--interrupt_requests", "False", "--verbose", "False"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"error: llama.cpp's server did not start on {Path(gguf).name} (is llama_cpp.server installed?)")

    def stop(self) -> None:
        Server.stop(self)  # type: ignore[arg-type]


def model_folder(name: str) -> str:
    """A folder as given, else a model name strataprune knows (``smollm2-135m``) as its cached folder."""
    if Path(name).is_dir():
        return name
    sys.path.insert(0, str(ROOT))
    from strataprune.models.loading import resolve_model

    try:
        return str(resolve_model(name)[0])
    except Exception as exc:  # noqa: BLE001 - any failure to resolve is a bad argument, reported in one line
        print(f"error: {name!r} is neither a folder nor a model strataprune knows ({exc})", file=sys.stderr)
        sys.exit(2)


def eos_token(gguf: str) -> int:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=gguf, vocab_only=True, verbose=False)
    return int(vocab.token_eos())


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    start = time.perf_counter()
    stamps: list[float] = []
    usage = None
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                await response.aread()
                return {"error": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"].get("code") or "error"}
                if chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
                if chunk["choices"][0].get("finish_reason") is None:
                    chunks += 1
                usage = chunk.get("usage") or usage
    except httpx.HTTPError as exc:
        return {"error": type(exc).__name__}
    end = time.perf_counter()
    tokens = (usage or {}).get("completion_tokens") or chunks  # llama.cpp's stream has no usage: one chunk a token
    return {
        "ttft": stamps[0] - start if stamps else None,
        "itl": [b - a for a, b in zip(stamps, stamps[1:])],
        "tpot": (end - stamps[0]) / (tokens - 1) if stamps and tokens > 1 else None,
        "e2e": end - start,
        "tokens": tokens,
    }


async def level(url: str, body: dict[str, Any], concurrency: int, requests: int, timeout: float, level_timeout: float) -> dict:
    results: list[dict[str, Any]] = []
    issued = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests:
            issued += 1
            results.append(await one_request(client, url, body, timeout))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(concurrency))), level_timeout)
        except asyncio.TimeoutError:
            results.append({"error": "level_timeout"})
        wall = time.perf_counter() - start
    done = [r for r in results if "error" not in r]
    errors: dict[str, int] = {}
    for r in results:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    itl = [gap for r in done for gap in r["itl"]]

    def stats(values: list[float]) -> dict[str, float | None]:
        values = [v for v in values if v is not None]
        return {
            "median_ms": 1e3 * statistics.median(values) if values else None,
            "p99_ms": 1e3 * percentile(values, 99) if values else None,
        }

    return {
        "concurrency": concurrency,
        "requests_done": len(done),
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": len(done) / wall,
        "output_tokens": sum(r["tokens"] for r in done),
        "output_tokens_per_s": sum(r["tokens"] for r in done) / wall,
        "ttft": stats([r["ttft"] for r in done]),
        "tpot": stats([r["tpot"] for r in done]),
        "itl": stats(itl),
        "e2e": stats([r["e2e"] for r in done]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt words (about one token each)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--level-timeout", type=float, default=600.0)
    parser.add_argument("--label", default="model")
    parser.add_argument("--note", default="", help="how the model was made (recorded with the results)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True, help="also --max-running 1")
    parser.add_argument("--serve", action="append", default=[], metavar="DIR[#BACKEND]", help="another of our servers")
    parser.add_argument("--llama-cpp", default="", metavar="GGUF[,GGUF]", help="llama.cpp's server on these GGUF files")
    parser.add_argument(
        "--ray-replicas", default="", metavar="N[,N]", help="also `serve --ray --replicas N`, --threads split over them"
    )
    parser.add_argument("--url", action="append", default=[], metavar="NAME=URL", help="a server already running there")
    parser.add_argument("--rounds", type=int, default=1, help="run every setting this many times, interleaved")
    parser.add_argument("--local", action=argparse.BooleanOptionalAction, default=True, help="the single-process server")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # the servers this script started are stopped on the way out
    levels = [int(c) for c in args.concurrency.split(",")]
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(args.prompt_tokens))
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    ggufs = [g for g in args.llama_cpp.split(",") if g]
    for gguf in ggufs:
        if not Path(gguf).is_file():
            print(f"error: --llama-cpp {gguf!r} is not a file (expected GGUF paths, comma separated)", file=sys.stderr)
            sys.exit(2)
    ours = [(args.model_dir, args.backend)] + [
        (spec.split("#")[0], spec.split("#")[1] or None if "#" in spec else None) for spec in args.serve
    ]
    ours = [(model_folder(folder), backend) for folder, backend in ours]
    try:
        replica_counts = [int(n) for n in args.ray_replicas.split(",") if n]
        urls = [(spec.split("=", 1)[0], spec.split("=", 1)[1]) for spec in args.url]
    except (ValueError, IndexError):
        print(f"error: --ray-replicas {args.ray_replicas!r} / --url {args.url}; allowed: N[,N] and NAME=URL", file=sys.stderr)
        sys.exit(2)
    settings: dict[str, tuple[str, str | None, list[str]]] = {}
    for folder, backend in ours if args.local or args.baseline else []:
        prefix = "" if len(ours) == 1 and not ggufs else f"{Path(folder).name} {backend or 'default backend'}: "
        if args.local:
            settings[prefix + "continuous batching"] = (folder, backend, ["--max-running", str(max(levels))])
        if args.baseline:
            settings[prefix + "one at a time (baseline)"] = (folder, backend, ["--max-running", "1"])
    folder, backend = ours[0]
    for replicas in replica_counts:
        per_replica = max(1, args.threads // replicas)
        settings[f"Ray Serve, {replicas} replica(s) x {per_replica} thread(s)"] = (
            folder,
            backend,
            ["--max-running", str(max(levels)), "--ray", "--replicas", str(replicas), "--replica-cpus", str(per_replica)],
        )
    report: dict[str, Any] = {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model_dir": ", ".join(Path(folder).name for folder, _ in ours),  # names only: results never record local paths
        "label": args.label,
        "model_note": args.note,
        "backend": ", ".join(backend or "(deploy.json's, else torch)" for _, backend in ours),
        "llama_cpp": [Path(g).name for g in ggufs],
        "ray_replicas": replica_counts,
        "rounds": args.rounds,
        "threads": args.threads,
        "request": {k: v for k, v in body.items() if k != "prompt"} | {"prompt_words": args.prompt_tokens},
        "requests_per_level": args.requests,
        "machine": machine(),
        "load_average_before": os.getloadavg(),
        "runs": [],
    }
    runs: list[tuple[str, Any, dict[str, Any]]] = []
    for name, (folder, backend, flags) in settings.items():
        threads = int(flags[flags.index("--replica-cpus") + 1]) if "--ray" in flags else args.threads
        extra = ["--threads", str(threads), "--max-queue", "1024", "--timeout", str(args.timeout)]
        runs.append((name, lambda f=folder, b=backend, x=flags + extra: Server(f, x + (["--backend", b] if b else [])), body))
    for name, url in urls:
        runs.append((name, lambda u=url: RunningServer(u), body))
    for gguf in ggufs:
        # the same request; llama.cpp's server has no ignore_eos, so its end-of-text token is banned by logit bias
        llama_body = {k: v for k, v in body.items() if k != "ignore_eos"} | {"logit_bias": {str(eos_token(gguf)): -100.0}}
        context = 2 * (args.prompt_tokens + args.max_tokens) + 64  # prompt words can be more than one token each
        runs.append(
            (f"llama.cpp server {Path(gguf).name}", lambda g=gguf, n=context: LlamaCppServer(g, args.threads, n), llama_body)
        )
    # rounds run every setting again in the same order, so that a change of the machine's load between settings
    # shows as a spread between rounds instead of passing for a difference between settings
    for round_index, (name, start_server, request) in ((i, run) for i in range(args.rounds) for run in runs):
        server = start_server()
        try:
            asyncio.run(level(server.url, {**request, "max_tokens": 4}, 1, 2, args.timeout, args.level_timeout))  # warm-up
            for concurrency in levels:
                pid = server.proc.pid if server.proc is not None else None
                cpu0 = tree_cpu_seconds(pid) if pid else 0.0
                row = asyncio.run(level(server.url, request, concurrency, args.requests, args.timeout, args.level_timeout))
                row["server_cpu_s"] = tree_cpu_seconds(pid) - cpu0 if pid else None
                row["setting"] = name
                row["round"] = round_index + 1
                row["server_cpu_ms_per_token"] = (
                    1e3 * row["server_cpu_s"] / row["output_tokens"] if row["output_tokens"] and pid else None
                )
                report["runs"].append(row)
                print(
                    f"{name:28s} c={concurrency:3d}: {row['requests_per_s']:.2f} req/s, {row['output_tokens_per_s']:.1f} tok/s, "
                    f"TTFT p50 {row['ttft']['median_ms'] or 0:.0f} ms, TPOT p50 {row['tpot']['median_ms'] or 0:.1f} ms, "
                    f"errors {row['errors']}",
                    file=sys.stderr,
                )
        finally:
            server.stop()
    report["load_average_after"] = os.getloadavg()
    files = ResultFiles(ROOT / "benchmarks" / "results", f"serve-{args.label}-{utc_stamp()}")
    files.write_json(report)
    files.write_markdown(markdown(report))
    print(f"wrote {files.stem}.json and .md", file=sys.stderr)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [
        f"# strataprune serve under load: {report['label']}",
        "",
        f"{report['when']}; {m.get('cpu')} ({m.get('cpus')} CPUs, ISA {', '.join(m.get('isa', []))}, clock {m.get('mhz')} MHz); "
        f"load average (1, 5, 15 min) before {tuple(round(x, 1) for x in report['load_average_before'])}, "
        f"after {tuple(round(x, 1) for x in report['load_average_after'])}.",
        f"Model `{report['model_dir']}`, backend {report['backend']}"
        + (f"; llama.cpp's server on {', '.join(report['llama_cpp'])}" if report.get("llama_cpp") else "")
        + f"; each request: {report['request']}; "
        f"{report['requests_per_level']} requests per level, streaming over loopback.",
        report.get("model_note", ""),
        "",
        "| server | concurrency | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | "
        "e2e p50 / p99 ms | output tokens | server CPU s | server CPU ms/token | wall s | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        name = r["setting"] + (f" (round {r['round']})" if report.get("rounds", 1) > 1 else "")
        lines.append(
            f"| {name} | {r['concurrency']} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
            f"{ms(r['ttft']['median_ms'])} / {ms(r['ttft']['p99_ms'])} | "
            f"{ms(r['tpot']['median_ms'])} / {ms(r['tpot']['p99_ms'])} | "
            f"{ms(r['itl']['median_ms'])} / {ms(r['itl']['p99_ms'])} | {ms(r['e2e']['median_ms'])} / {ms(r['e2e']['p99_ms'])} | "
            f"{r.get('output_tokens', '-')} | {ms(r['server_cpu_s'])} | {ms(r.get('server_cpu_ms_per_token'))} | "
            f"{r['wall_s']:.1f} | "
            f"{r['errors'] or 'none'} |"
        )
    base = {r["concurrency"]: r for r in report["runs"] if r["setting"].startswith("one at a time")}
    ratios = [
        f"c={r['concurrency']}: {r['output_tokens_per_s'] / base[r['concurrency']]['output_tokens_per_s']:.2f}x"
        for r in report["runs"]
        if r["setting"].endswith("continuous batching")
        and r["concurrency"] in base
        and base[r["concurrency"]]["output_tokens_per_s"]
    ]
    if ratios:
        lines += ["", "Output tokens/s, continuous batching over one at a time (same run): " + ", ".join(ratios) + "."]

    def median_rate(setting: str, concurrency: int) -> float | None:
        rates = [r["output_tokens_per_s"] for r in report["runs"] if r["setting"] == setting and r["concurrency"] == concurrency]
        return statistics.median(rates) if rates else None

    singles = [r for r in report["runs"] if r["setting"].endswith("continuous batching")]
    scaled = []
    for setting in dict.fromkeys(r["setting"] for r in report["runs"] if r["setting"].startswith("Ray Serve")):
        for concurrency in dict.fromkeys(r["concurrency"] for r in report["runs"]):
            ours, single = median_rate(setting, concurrency), median_rate(singles[0]["setting"], concurrency) if singles else None
            if ours and single:
                scaled.append(f"{setting} c={concurrency}: {ours / single:.2f}x")
    if scaled:
        lines += [
            "",
            f"Output tokens/s over the single process with {report.get('threads')} thread(s) (same run"
            + (f", medians of {report['rounds']} rounds" if report.get("rounds", 1) > 1 else "")
            + "): "
            + ", ".join(scaled)
            + ".",
            "Ray rows' server CPU is the whole process tree: the replicas, Ray Serve's proxy and controller, the raylet and GCS.",
        ]
    if report.get("llama_cpp"):
        lines += [
            "",
            "llama.cpp's server (llama-cpp-python, one request at a time) gets the same prompt, max_tokens and temperature "
            "without `ignore_eos`, which it lacks, and with a -100 logit bias on its end-of-text token; its stream has no "
            "usage, so its output tokens are the streamed chunks (one per token).",
        ]
    lines += ["", "The machine is shared with other jobs: compare rows within this run, not across runs.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
