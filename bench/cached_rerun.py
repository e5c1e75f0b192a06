"""What a fully cached `cpt run` costs: as a new user runs it (no server started by hand: the run's temporary
Prefect server) and against a running Prefect server (`cpt server start`, `make server`, a team's), with Prefect's
own floor beside it.

Starts `prefect server start` on 127.0.0.1 (SQLite in a temp PREFECT_HOME), then, each as a fresh process:
- the floor: a skeleton flow of 10 cached no-op tasks (Prefect's INPUTS cache policy, results persisted), the
  same number of task runs as a cpt run, against the running server;
- `cpt run` of a small config (the bundled sample corpus, the tiny model, 2 training steps) whose every stage
  is Cached, against the running server (PREFECT_API_URL: what a run finds after `cpt server start`);
- the same `cpt run` as a new user runs it, with no server started by hand: the server cpt keeps, started by an
  earlier run (the one that fills its cache);
- the same `cpt run` with `CPT_SERVER=temporary` (no PREFECT_API_URL, nothing on 127.0.0.1:4200): a temporary
  server of its own each run.
Runs on a server cpt started or a temporary one send no Prefect heartbeats (flows/local_server.py says why); the
floor and the run against PREFECT_API_URL send them (Prefect's default), whose thread's join costs up to 1 s.
Each is run once to fill its cache, then `--repeat` times timed, interleaved; medians. Each run's CPU seconds
(user + system, its process tree: the temporary server included) are printed beside its wall seconds: on a shared
machine the wall moves with the others' load, the CPU much less. Goals: a cached run ≤ 3 s; ≤ 1 s over the floor.

    .venv/bin/python -m bench.cached_rerun [--repeat 5]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import CPT, argument_parser, free_port, kept_server, prefect_env, prefect_server, small_config, timed

SKELETON = '''
import sys
from pathlib import Path
from prefect import flow, task
from prefect.cache_policies import INPUTS

@task(cache_policy=INPUTS, persist_result=True, result_serializer="json", result_storage=Path(sys.argv[1]))
def noop(i: int) -> int:
    return i

@flow
def skeleton():
    for i in range(10):
        noop(i)

skeleton()
'''


def timed_cpu(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its children) of one run of `cmd`."""
    import resource
    import time

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    timed(cmd, env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        port = free_port()
        env = prefect_env(d, port)
        alone = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        alone.update(PREFECT_HOME=str(d / "prefect-alone"), CPT_FIND_MAKE_SERVER="0",
                     PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90")
        with prefect_server(env, port), kept_server(alone, d / "kept") as kept:
            config = small_config(d)
            skeleton = d / "skeleton.py"
            skeleton.write_text(SKELETON)
            floor_cmd = [sys.executable, str(skeleton), str(d / "skeleton-results")]
            cpt_cmd = [CPT, "run", "-c", str(config), "--artifacts", str(d / "artifacts"),
                       "--summary", str(d / "summary.json")]
            timed(floor_cmd, env)
            cold = timed(cpt_cmd, env)
            timed(cpt_cmd, alone)  # the temporary server's first start makes its database
            timed(cpt_cmd, kept)  # starts the kept server
            runs: dict[str, list[tuple[float, float]]] = {"floor": [], "served": [], "kept": [], "alone": []}
            for _ in range(args.repeat):  # interleaved, so drift on the machine hits each alike
                runs["floor"].append(timed_cpu(floor_cmd, env))
                for name, e in (("served", env), ("kept", kept), ("alone", alone)):
                    runs[name].append(timed_cpu(cpt_cmd, e))
                    states = {s["state"] for s in json.loads((d / "summary.json").read_text())["stages"]}
                    if states != {"Cached"}:
                        sys.exit(f"the rerun was not fully cached: {states}")

    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    print(f"Prefect server on 127.0.0.1; each run a fresh process; {args.repeat} timed runs each, interleaved; "
          f"{os.cpu_count()} cores; wall s / CPU s (user + system, process tree)")
    rows = [("skeleton flow, 10 cached no-op tasks, running server", "floor"),
            ("cpt run, every stage Cached, running server", "served"),
            ("cpt run, every stage Cached, no server by hand (kept)", "kept"),
            ("cpt run, every stage Cached, CPT_SERVER=temporary", "alone")]
    for label, k in rows:
        print(f"{label:55} median {med[k][0]:6.2f} s wall {med[k][1]:6.2f} s CPU  (walls: "
              f"{', '.join(f'{w:.2f}' for w, _ in runs[k])})")
    print(f"cpt run, cold (same config, running server):            {cold:.2f} s")
    f, c = med["floor"][0], med["served"][0]
    print(f"\ncached cpt run with a running server: {c:.2f} s (goal ≤ 3 s), {c - f:+.2f} s over the floor "
          f"(goal ≤ 1 s), {c / f:.2f}x; CPU {med['served'][1]:.2f} s vs the floor's {med['floor'][1]:.2f} s")
    print(f"cached cpt run as a new user runs it (no server started by hand; the server kept by an earlier run): "
          f"{med['kept'][0]:.2f} s wall, {med['kept'][1]:.2f} s CPU (goal ≤ 3 s)")
    print(f"cached cpt run, CPT_SERVER=temporary: {med['alone'][0]:.2f} s wall, {med['alone'][1]:.2f} s CPU")


if __name__ == "__main__":
    main()
