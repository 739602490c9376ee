"""The ``strataprune`` command line: it only parses; each verb lives in ``strataprune/commands/<verb>.py``.

    strataprune run                      # the embedded default: SmolLM2-135M, BBC News, Wanda, uniform 50%
    strataprune run recipe.yaml --sparsity 0.6 --output out/
    strataprune eval out/
    strataprune eval out/ --tasks bbc_topic,bbc_continuation --limit 100     # zero-shot accuracy (lm-eval)
    strataprune plugins --json
    strataprune leaderboard grid.yaml --jobs 2

Errors caused by input print one line (``error: ...``) and exit with status 2, never a traceback;
they are found before the heavy imports and the work (strataprune/engine/preflight.py). Any other exception is a
bug: one line ``error: internal error ...`` and exit status 1 (operating-system errors such as a full
disk: ``error: ...``, status 1); ``STRATAPRUNE_DEBUG=1`` shows the traceback instead. SIGTERM and SIGHUP
clean up like Ctrl-C (temporary outputs, locks, workers, child processes) and exit 128 + the signal
(143 for SIGTERM; strataprune/runtime/signals.py).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from strataprune.commands import allocate, backends, bench, deploy, doctor, export, leaderboard, plugins, serve
from strataprune.commands import eval as eval_command
from strataprune.commands import run as run_command
from strataprune.commands.flags import Parser
from strataprune.contract.errors import StrataPruneError

#: the verbs in the order `strataprune --help` lists them
COMMANDS = (run_command, eval_command, plugins, allocate, leaderboard, deploy, export, serve, bench, doctor, backends)


def make_parser() -> argparse.ArgumentParser:
    from strataprune.version import __version__

    parser = Parser(prog="strataprune", description="Layer-wise sparsity allocation and pruning for large models.")
    parser.add_argument("--version", action="version", version=f"strataprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def fail(message: str, status: int) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return status


def disk_full_message(exc: OSError) -> str:
    """A full disk during a save: what was being written, what it needs, and that nothing earlier was replaced
    (outputs are written into a temporary sibling and swapped in only when complete: strataprune/runtime/outputs.py)."""
    from strataprune.engine.limits import human_bytes
    from strataprune.engine.preflight import expected_output_sizes

    where = f" while writing '{exc.filename}'" if exc.filename else ""
    sizes = expected_output_sizes()
    need = "; ".join(f"'{path}' needs about {human_bytes(size)}" for path, size in sizes.items())
    return (
        f"the disk is full (no space left on the device){where}; nothing was replaced: an earlier output is intact "
        f"and the partial one was removed. {need + '; ' if need else ''}free space and run again"
    )


def main(argv: list[str] | None = None) -> int:
    from strataprune.runtime.outputs import current_command, release_output_locks
    from strataprune.runtime.signals import Terminated, signals_as_interrupts

    debug = os.environ.get("STRATAPRUNE_DEBUG", "") not in ("", "0")
    try:
        args = make_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version
        return int(exc.code or 0)
    except StrataPruneError as exc:
        return fail(str(exc), 2)
    token = current_command.set(args.command)
    preflight = sys.modules.get("strataprune.engine.preflight")
    if preflight is not None:  # sizes noted by an earlier command of this process (tests call main repeatedly)
        preflight.forget_output_sizes()
    try:
        with signals_as_interrupts():  # SIGTERM/SIGHUP clean up like Ctrl-C (strataprune/runtime/signals.py)
            return int(args.func(args))
    except Terminated as exc:
        print(f"interrupted ({exc})", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, StrataPruneError):
            return fail(str(exc), 2)
        if isinstance(exc, MemoryError):
            return fail("out of memory; lower calibration.nsamples or seqlen, or use --offload / --activation-dir", 1)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return fail(disk_full_message(exc), 1)
        if isinstance(exc, OSError):
            return fail(f"{exc} (an operating-system error; STRATAPRUNE_DEBUG=1 shows the traceback)", 1)
        return fail(
            f"internal error: {type(exc).__name__}: {exc} (a bug in strataprune or a plugin, please report it; "
            "run with STRATAPRUNE_DEBUG=1 for the traceback)",
            1,
        )
    finally:
        release_output_locks()
        current_command.reset(token)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
