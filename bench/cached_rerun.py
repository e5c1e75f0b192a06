"""What a fully cached `cpt run` costs over Prefect's own floor, against a running Prefect server.

Starts `prefect server start` on 127.0.0.1 (SQLite in a temp PREFECT_HOME), then, each as a fresh process:
- the floor: a skeleton flow of 10 cached no-op tasks (Prefect's INPUTS cache policy, results persisted), the
  same number of task runs as a cpt run;
- `cpt run` of a small config (the bundled sample corpus, the tiny model, 2 training steps) whose every stage
  is Cached.
Each is run once to fill its cache, then `--repeat` times timed; the medians are compared. Goal: at most 1 s apart.

    .venv/bin/python -m bench.cached_rerun [--repeat 5]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench.common import CPT, argument_parser, free_port, prefect_env, prefect_server, small_config, timed

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


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        port = free_port()
        env = prefect_env(d, port)
        with prefect_server(env, port):
            config = small_config(d)
            skeleton = d / "skeleton.py"
            skeleton.write_text(SKELETON)
            floor_cmd = [sys.executable, str(skeleton), str(d / "skeleton-results")]
            cpt_cmd = [CPT, "run", "-c", str(config), "--artifacts", str(d / "artifacts"),
                       "--summary", str(d / "summary.json")]
            timed(floor_cmd, env)
            cold = timed(cpt_cmd, env)
            floor, cached = [], []
            for _ in range(args.repeat):  # interleaved, so drift on the machine hits both alike
                floor.append(timed(floor_cmd, env))
                cached.append(timed(cpt_cmd, env))
                states = {s["state"] for s in json.loads((d / "summary.json").read_text())["stages"]}
                if states != {"Cached"}:
                    sys.exit(f"the rerun was not fully cached: {states}")

    f, c = statistics.median(floor), statistics.median(cached)
    print(f"Prefect server on 127.0.0.1; each run a fresh process; {args.repeat} timed runs each, interleaved; "
          f"{os.cpu_count()} cores")
    print(f"skeleton flow, 10 cached no-op tasks: median {f:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in floor)})")
    print(f"cpt run, every stage Cached:          median {c:.2f} s  (runs: {', '.join(f'{x:.2f}' for x in cached)})")
    print(f"cpt run, cold (same config):          {cold:.2f} s")
    print(f"\ncached cpt run - skeleton = {c - f:+.2f} s (goal: at most 1 s); ratio {c / f:.2f}x the floor")


if __name__ == "__main__":
    main()
