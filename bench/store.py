"""What an object-store artifacts root costs against a local one, where the user waits: fresh `cpt run`
processes against a running Prefect server, the store an S3-compatible server (moto) on 127.0.0.1.

Same config as bench/cached_rerun.py (the bundled sample corpus, a tiny model, 2 training steps). Timed, each a
fresh process:
- cold: local root vs s3:// root (every stage built; the store run also uploads every entry);
- fully Cached rerun on the same host: local vs store (the store run checks every entry in the store);
- fully Cached rerun on a fresh host (an empty scratch folder, as a new container): store only, against the
  local cached rerun.
moto on loopback has none of a real store's latency, so the store columns are a floor for S3 itself.

    .venv/bin/python bench/store.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
BIN = Path(sys.executable).parent


def wait_port(port: int, what: str) -> None:
    import socket

    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"{what} did not start in 120 s")
            time.sleep(0.3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from cached_rerun import free_port, prefect_env, small_config, start_prefect_server, timed

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        port, s3_port = free_port(), free_port()
        env = {**prefect_env(d, port), "CPT_CACHE_HOME": str(d / "user-cache"), "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}"}
        moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = start_prefect_server(env, port)
        try:
            wait_port(s3_port, "moto")
            import s3fs

            s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]}, key="bench",
                              secret="bench").mkdir("bench")
            config = small_config(d)

            def cpt(root: str, scratch: str = "host") -> float:
                wall = timed([str(BIN / "cpt"), "run", "-c", str(config), "--artifacts", root, "--summary",
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
        finally:
            server.terminate()
            moto.terminate()
            server.wait(timeout=30)
            moto.wait(timeout=30)

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
