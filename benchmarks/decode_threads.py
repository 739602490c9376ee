"""What threads cost the native decoder per step: 1 vs 2 threads, the engine's thread team vs one region per kernel call.

A decode step of SmolLM2-135M is ~210 kernel calls. With one OpenMP region per call (``thread_team=False``, the scheme
before the thread team) every call forks and joins the team; with the thread team (the default) the step wakes the
engine's own worker threads once, and they claim blocks of work and wait only where the data requires it
(docs/kernels.md). This times greedy decode steps of the same packed model, in one process, for every (threads,
scheme, spin) setting, the settings interleaved round-robin over the repeats so that they see the same machine load.
Two clocks: wall and the process's CPU time (all its threads: spinning counts). ``--busy N`` starts N single-threaded
busy loops for the run (a loaded machine on demand; they are stopped at the end).

    python benchmarks/decode_threads.py --run ~/.cache/strataprune/pareto/s70 --bits 4 --lm-head int8
    python benchmarks/decode_threads.py --run RUN --busy 1 --spin auto,0,100,1000

Writes benchmarks/results/decode-threads-<UTC>.json and .md (CPU model, ISA, load averages before and after).
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


def settings_of(threads: list[int], spins: list[int]) -> list[tuple[int, bool, int]]:
    """(threads, team, spin_us): per thread count the per-call regions and the team at every spin (1 thread: the
    kernel calls only, which is what the engine runs there)."""
    out: list[tuple[int, bool, int]] = []
    for t in threads:
        out.append((t, False, spins[0]))
        out += [(t, True, s) for s in spins] if t > 1 else []
    return out


AUTO = -1  #: the engine's adaptive spin (``set_spin_us("auto")``)


def label(threads: int, team: bool, spin: int) -> str:
    if threads == 1:
        return "1 thread (kernel calls, no region)"
    waits = "adaptive spin" if spin == AUTO else f"spin {spin} us"
    return f"{threads} threads, " + (f"thread team, {waits}" if team else "one region per kernel call")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a `strataprune run` output folder (e.g. a 70%% SmolLM2 run)")
    ap.add_argument("--bits", type=int, default=4, help="packed weights: 32, 8 or 4 (default 4)")
    ap.add_argument("--lm-head", default="int8", help="fp32 or int8 (default int8)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument(
        "--spin",
        default="auto",
        help="comma-separated team spin times in microseconds, or auto (default: the engine's adaptive spin)",
    )
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per repeat (default 32)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--busy", type=int, default=0, help="single-threaded busy loops to run beside (default 0)")
    ap.add_argument("--workdir", default=str(Path.home() / ".cache" / "strataprune" / "cpu-bar"))
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args()
    try:
        threads = sorted(set(int(t) for t in args.threads.split(",")))
        spin_items = [s.strip() for s in args.spin.split(",")]
        if any(s != "auto" and not 0 <= int(s) <= 1_000_000 for s in spin_items):
            raise ValueError
        spins = sorted(set(AUTO if s == "auto" else int(s) for s in spin_items))
        if args.bits not in (32, 8, 4) or args.lm_head not in ("fp32", "int8") or any(not 1 <= t <= 1024 for t in threads):
            raise ValueError
        if min(args.tokens, args.repeats, args.prompt_len) < 1 or args.busy < 0:
            raise ValueError
    except ValueError:
        print(f"error: --bits {args.bits} / --lm-head {args.lm_head} / --threads '{args.threads}' / --spin '{args.spin}' / "
              "--tokens, --repeats, --prompt-len, --busy: 32, 8 or 4 / fp32 or int8 / whole numbers 1-1024 / auto or whole "
              "numbers 0-1000000 / >= 1, >= 1, >= 1, >= 0", file=sys.stderr)  # fmt: skip
        return 2
    if not is_run_folder(args.run):
        return 2

    import strataprune.kernels as kernels
    from strataprune.kernels.decoder import NativeDecoder, set_spin_us

    ids = prompt_ids(args.prompt_len)
    model = packed_model(Path(args.run), args.bits, 1, Path(args.workdir).expanduser())
    settings = settings_of(threads, spins)
    engines = {
        s: NativeDecoder(model, max_context=args.prompt_len + args.tokens + 8, lm_head=args.lm_head, thread_team=s[1])
        for s in settings
    }
    samples: dict[tuple[int, bool, int], list[tuple[float, float]]] = {s: [] for s in settings}
    machine = cpu_facts()
    with busy_loops(args.busy):
        try:
            for rep in range(args.repeats + 1):  # the first round warms up
                for s in settings:
                    engine = engines[s]
                    kernels.set_num_threads(s[0])
                    set_spin_us("auto" if s[2] == AUTO else s[2])
                    engine.reset(0)
                    token = int(engine.prefill(0, ids).argmax())
                    wall, cpu = time.perf_counter(), time.process_time()
                    for _ in range(args.tokens):
                        token = int(engine.decode([0], [token])[0].argmax())
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                    if rep:
                        samples[s].append((1e3 * wall / args.tokens, 1e3 * cpu / args.tokens))
                    print(f"[{rep}/{args.repeats}] {label(*s)}: {1e3 * wall / args.tokens:.1f} ms/token wall, "
                          f"{1e3 * cpu / args.tokens:.1f} CPU", file=sys.stderr, flush=True)  # fmt: skip
        finally:
            set_spin_us(None)
            for engine in engines.values():
                engine.close()
    rows = [
        {"setting": label(*s), "threads": s[0], "team": s[1], "spin_us": "auto" if s[2] == AUTO else s[2],
         "wall_ms": statistics.median(x[0] for x in samples[s]), "cpu_ms": statistics.median(x[1] for x in samples[s]),
         "samples": samples[s]}
        for s in settings
    ]  # fmt: skip
    report: dict[str, Any] = {
        "utc": utc_stamp(), "machine": machine, "load_after": os.getloadavg(),
        "run": args.run, "bits": args.bits, "lm_head": args.lm_head, "prompt_len": args.prompt_len, "tokens": args.tokens,
        "repeats": args.repeats, "busy": args.busy, "rows": rows,
    }  # fmt: skip
    one = next((r for r in rows if r["threads"] == 1 and not r["team"]), None)
    kind = "fp32" if args.bits == 32 else f"int{args.bits}"
    lines = [
        f"# Native decoder threads: {kind} weights, lm_head {args.lm_head} ({report['utc']})",
        "",
        f"{machine['cpu']}; ISA {', '.join(machine['isa'])}; {machine['cpus']} CPUs; load average before "
        f"{machine['load_average'][0]:.1f}, after {report['load_after'][0]:.1f}; {args.busy} busy loop(s) started beside. "
        f"`{Path(args.run).name}`, {args.prompt_len}-token prompt, {args.tokens} greedy decode steps, median of "
        f"{args.repeats} after 1 warm-up, settings interleaved. CPU = this process's CPU time (all threads).",
        "",
        "| setting | ms/token wall | CPU | CPU - 1 thread's CPU (threading cost per step) | wall vs 1 thread |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        extra = f"{r['cpu_ms'] - one['cpu_ms']:+.2f}" if one and r is not one else "-"
        speed = f"{one['wall_ms'] / r['wall_ms']:.2f}x" if one else "-"
        lines.append(f"| {r['setting']} | {r['wall_ms']:.2f} | {r['cpu_ms']:.2f} | {extra} | {speed} |")
    markdown = "\n".join(lines) + "\n"
    stem = write_results(args.results, f"decode-threads-{report['utc']}", report, markdown)
    print(markdown)
    print(f"wrote {stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
