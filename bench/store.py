"""What an object-store artifacts root costs against a local one, where the user waits: fresh `cpt run`
processes against a running Prefect server, the store an S3-compatible server (moto) on 127.0.0.1.

Same config as bench.cached_rerun (the bundled sample corpus, a tiny model, 2 training steps). Timed, each a
fresh process:
- cold: local root vs s3:// root (every stage built; the store run also uploads every entry);
- fully Cached rerun on the same host: local vs store (the store run checks every entry in the store);
- fully Cached rerun on a fresh host (an empty scratch folder, as a new container): store only, against the
  local cached rerun.
moto on loopback has none of a real store's latency, so the store columns are a floor for S3 itself.

    .venv/bin/python -m bench.store [--repeat 3]
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from bench.common import (
    CPT, argument_parser, free_port, moto_server, prefect_env, prefect_server, s3_env, small_config, timed,
)


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        port, s3_port = free_port(), free_port()
        env = {**prefect_env(d, port), "CPT_CACHE_HOME": str(d / "user-cache"), **s3_env(s3_port)}
        with moto_server(s3_port), prefect_server(env, port):
            import s3fs

            s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}, key="bench",
                              secret="bench").mkdir("bench")
            config = small_config(d)

            def cpt(root: str, scratch: str = "host") -> float:
                wall = timed([CPT, "run", "-c", str(config), "--artifacts", root, "--summary",
                              str(d / "summary.json")], {**env, "CPT_SCRATCH": str(d / scratch)})
                return wall

            def states() -> set[str]:
                return {s["state"] for s in json.loads((d / "summary.json").read_text())["stages"]}

            # The tokenizer's profile, and the OS's file cache, before anything is timed.
            cpt(str(d / "warm-up"))
            cold_local = cpt(str(d / "local"))
            cold_store = cpt("s3://bench/cold")
            local, store, fresh = [], [], []
            for i in range(args.repeat):  # interleaved, so drift on the machine hits all alike
                local.append(cpt(str(d / "local")))
                assert states() == {"Cached"}, states()
                store.append(cpt("s3://bench/cold"))
                assert states() == {"Cached"}, states()
                fresh.append(cpt("s3://bench/cold", scratch=f"fresh-{i}"))
                assert states() == {"Cached"}, states()

    lm, sm, fm = statistics.median(local), statistics.median(store), statistics.median(fresh)
    print(f"Prefect server and moto S3 on 127.0.0.1; each run a fresh `cpt run` process; {os.cpu_count()} cores")
    print(f"cold:                      local {cold_local:6.2f} s   store {cold_store:6.2f} s   "
          f"store/local {cold_store / cold_local:.2f}x")
    print(f"Cached, same host:         local {lm:6.2f} s   store {sm:6.2f} s   store/local {sm / lm:.2f}x")
    print(f"Cached, fresh host:                         store {fm:6.2f} s   vs local cached {fm / lm:.2f}x")
    print(f"(medians of {args.repeat}; local {', '.join(f'{x:.2f}' for x in local)}; store "
          f"{', '.join(f'{x:.2f}' for x in store)}; fresh {', '.join(f'{x:.2f}' for x in fresh)})")


if __name__ == "__main__":
    main()
