"""What threads cost the native decoder's prefill: 1 vs 2 threads, on the thread team vs one region per kernel call.

A 128-token prefill of SmolLM2-135M is one chunk: per layer q/k/v, attention, o, gate/up and down over all 128
tokens. With one OpenMP region per kernel call (``thread_team=False``, the scheme before the prefill ran on the
thread team) every call forks and joins libgomp's team, whose threads spin at each barrier and wait a whole time
slice behind a thread the OS has descheduled; on the thread team (the default) the chunk is one wake-up of the
engine's own workers, which claim blocks of rows / (token, head) pairs and sleep where they wait (docs/kernels.md
"Threads"). This times prefills of the same packed model, in one process, for every (weights, threads, scheme), the
settings interleaved round-robin over the repeats so that they see the same machine load. Two clocks: wall and the
process's CPU time (all its threads: spinning counts). ``--busy N`` starts N single-threaded busy loops beside.

    python benchmarks/prefill_threads.py --run ~/.cache/strataprune/pareto/s70 --bits 4,8,32

Writes benchmarks/results/prefill-threads-<UTC>.json and .md (CPU model, ISA, load averages before and after).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cpu_bar import busy_loops, is_run_folder, packed_model, prompt_ids  # noqa: E402
from results_files import cpu_facts, utc_stamp, write_results  # noqa: E402

#: (threads, thread team): 1 thread runs the kernel calls in order whatever the setting
SETTINGS = [(1, False), (2, False), (2, True)]


def label(threads: int, team: bool) -> str:
    if threads == 1:
        return "1 thread"
    return f"{threads} threads, " + ("thread team" if team else "one OpenMP region per kernel call")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a `strataprune run` output folder (e.g. a 70%% SmolLM2 run)")
    ap.add_argument("--bits", default="4,8,32", help="comma-separated packed weights: 32, 8 or 4 (default 4,8,32)")
    ap.add_argument("--lm-head", default="int8", help="fp32 or int8 (default int8)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--busy", type=int, default=0, help="single-threaded busy loops to run beside (default 0)")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "strataprune" / "cpu-bar"))
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args()
    try:
        bits = [int(b) for b in args.bits.split(",")]
        if any(b not in (32, 8, 4) for b in bits) or args.lm_head not in ("fp32", "int8"):
            raise ValueError
        if min(args.repeats, args.prompt_len) < 1 or args.busy < 0:
            raise ValueError
    except ValueError:
        print(f"error: --bits '{args.bits}' / --lm-head {args.lm_head} / --repeats, --prompt-len, --busy: comma-separated "
              "32, 8 or 4 / fp32 or int8 / >= 1, >= 1, >= 0", file=sys.stderr)  # fmt: skip
        return 2
    if not is_run_folder(args.run):
        return 2

    import strataprune.kernels as kernels
    from strataprune.kernels.decoder import NativeDecoder

    ids = prompt_ids(args.prompt_len)
    workdir = Path(args.workdir).expanduser()
    models = {b: packed_model(Path(args.run), b, 1, workdir) for b in bits}
    settings = [(b, *s) for b in bits for s in SETTINGS]
    engines = {
        s: NativeDecoder(models[s[0]], max_context=args.prompt_len + 8, lm_head=args.lm_head, thread_team=s[2]) for s in settings
    }
    samples: dict[tuple[int, int, bool], list[tuple[float, float]]] = {s: [] for s in settings}
    machine = cpu_facts()
    with busy_loops(args.busy):
        try:
            for rep in range(args.repeats + 1):  # the first round warms up
                for s in settings:
                    engine = engines[s]
                    kernels.set_num_threads(s[1])
                    engine.reset(0)
                    wall, cpu = time.perf_counter(), time.process_time()
                    engine.prefill(0, ids)
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    if rep:
                        samples[s].append((1e3 * wall, 1e3 * cpu))
                    print(f"[{rep}/{args.repeats}] int{s[0]} {label(*s[1:])}: {1e3 * wall:.0f} ms wall, {1e3 * cpu:.0f} CPU",
                          file=sys.stderr, flush=True)  # fmt: skip
        finally:
            kernels.set_num_threads(None)
            for engine in engines.values():
                engine.close()
    rows = [
        {"bits": s[0], "setting": label(*s[1:]), "threads": s[1], "team": s[2],
         "wall_ms": statistics.median(x[0] for x in samples[s]), "cpu_ms": statistics.median(x[1] for x in samples[s]),
         "samples": samples[s]}
        for s in settings
    ]  # fmt: skip
    report: dict[str, Any] = {
        "utc": utc_stamp(), "machine": machine, "load_after": os.getloadavg(),
        "run": args.run, "bits": bits, "lm_head": args.lm_head, "prompt_len": args.prompt_len, "repeats": args.repeats,
        "busy": args.busy, "rows": rows,
    }  # fmt: skip
    lines = [
        f"# Native decoder prefill threads: lm_head {args.lm_head} ({report['utc']})",
        "",
        f"{machine['cpu']}; ISA {', '.join(machine['isa'])}; {machine['cpus']} CPUs; load average before "
        f"{machine['load_average'][0]:.1f}, after {report['load_after'][0]:.1f}; {args.busy} busy loop(s) started beside. "
        f"`{Path(args.run).name}`, one {args.prompt_len}-token prefill (the last token's logits), median of "
        f"{args.repeats} after 1 warm-up, settings interleaved. CPU = this process's CPU time (all threads).",
        "",
        "| weights | setting | ms wall | ms CPU | wall vs 1 thread |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        one = next(x for x in rows if x["bits"] == r["bits"] and x["threads"] == 1)
        kind = "fp32" if r["bits"] == 32 else f"int{r['bits']}"
        lines.append(
            f"| {kind} | {r['setting']} | {r['wall_ms']:.0f} | {r['cpu_ms']:.0f} | {one['wall_ms'] / r['wall_ms']:.2f}x |"
        )
    markdown = "\n".join(lines) + "\n"
    stem = write_results(args.results, f"prefill-threads-{report['utc']}", report, markdown)
    print(markdown)
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
