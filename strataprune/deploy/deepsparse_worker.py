"""The DeepSparse side of the deepsparse backend: runs inside its own venv, never imports strataprune.

    <venv>/bin/python -I deepsparse_worker.py       # then JSON commands on stdin, one per line

DeepSparse 1.8 needs Python <= 3.11, numpy < 2 and onnx 1.14, which cannot share strataprune's
environment, so the parent process talks to this script over a pipe: one JSON request per line on
stdin, one JSON answer per line on stdout; arrays travel as .npz files in the parent's work folder.
Timing happens here, around ``engine.run`` only, so the figures hold no inter-process copies.

Requests: {"cmd": "compile", "key", "path", "batch", "threads", "shapes"}; {"cmd": "run", "key",
"inputs", "outputs"}; {"cmd": "time", "key", "inputs", "warmup", "repeats"}; {"cmd": "free", "key"};
{"cmd": "quit"}. Answers: {"ok": true, ...} or {"ok": false, "error": "..."}.
Telemetry is off (NM_DISABLE_ANALYTICS=1 is set before deepsparse is imported).
"""

import json
import os
import sys
import time

os.environ["NM_DISABLE_ANALYTICS"] = "1"


def main() -> int:
    import numpy as np
    from deepsparse import Engine

    engines = {}
    out = sys.stdout
    sys.stdout = sys.stderr  # deepsparse prints banners; keep the protocol channel clean
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        cmd = request.get("cmd")
        try:
            if cmd == "quit":
                answer = {"ok": True}
            elif cmd == "hello":
                import deepsparse

                answer = {"ok": True, "version": deepsparse.__version__, "numpy": np.__version__}
            elif cmd == "compile":
                start = time.perf_counter()
                engine = Engine(
                    request["path"],
                    batch_size=request["batch"],
                    num_cores=request.get("threads"),
                    input_shapes=request.get("shapes"),
                )
                engines[request["key"]] = engine
                answer = {
                    "ok": True,
                    "seconds": time.perf_counter() - start,
                    "fraction_supported": getattr(engine, "fraction_of_supported_ops", None),
                }
            elif cmd == "run":
                data = np.load(request["inputs"])
                outputs = engines[request["key"]].run([data[f"arr_{i}"] for i in range(len(data.files))])
                np.savez(request["outputs"], *outputs)
                answer = {"ok": True}
            elif cmd == "time":
                data = np.load(request["inputs"])
                inputs = [data[f"arr_{i}"] for i in range(len(data.files))]
                engine = engines[request["key"]]
                times = []
                for i in range(request["warmup"] + request["repeats"]):
                    start = time.perf_counter()
                    engine.run(inputs)
                    if i >= request["warmup"]:
                        times.append(time.perf_counter() - start)
                answer = {"ok": True, "times": times}
            elif cmd == "free":
                engines.pop(request["key"], None)
                answer = {"ok": True}
            else:
                answer = {"ok": False, "error": f"unknown command {cmd!r}"}
        except Exception as exc:  # noqa: BLE001 - report every engine failure to the parent as text
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
        if cmd == "quit":
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
