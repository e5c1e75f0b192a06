"""How long the store takes to say an entry is complete when it refers to many per-file pieces (a tokenize or
chunk output of a corpus of many files): the pieces checked 16 at a time against one at a time, in one script.

moto's S3 server on 127.0.0.1 answers in a few ms and is CPU-bound on this machine, so the comparison is also
run with a simulated store latency: every request of the lookup waits `--latency-ms` more (S3 within a region
is ~10-40 ms). That row is a simulation, and says so.

    .venv/bin/python -m bench.store_lookup [--pieces 100] [--latency-ms 20]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import uuid

from bench.common import argument_parser, free_port, moto_server, s3_env


def main() -> None:
    ap = argument_parser(__spec__, __doc__)
    ap.add_argument("--pieces", type=int, default=100)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    args = ap.parse_args()
    port = free_port()
    with moto_server(port):
        with tempfile.TemporaryDirectory() as d:
            os.environ.update(s3_env(port), CPT_SCRATCH=d)
            import s3fs

            from tasks.core.objectstore import Store
            from tasks.core.root import open_root

            bucket = f"lookup-{uuid.uuid4().hex[:8]}"
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
            root = open_root(f"s3://{bucket}/p")
            store = root.store
            deps = []
            for i in range(args.pieces):
                def piece(tmp, i=i):
                    (tmp / "tokens.npy").write_bytes(b"x" * 100)
                    (tmp / "meta.json").write_text(str(i))
                    return {}, {}

                deps.append(root.publish("piece", f"piece-{i}", piece)[0].path)

            def whole(tmp):
                (tmp / "data").write_text("y")
                return {}, {}, {"deps": deps}

            root.publish("whole", "whole-1", whole)

            def timed() -> float:
                runs = []
                for _ in range(3):
                    started = time.perf_counter()
                    assert store.complete("cache/whole/whole-1") is not None
                    runs.append(time.perf_counter() - started)
                return statistics.median(runs)

            concurrent = Store._each
            one_at_a_time = lambda self, fn, items: [fn(x) for x in items]  # noqa: E731
            rows = {}
            for latency in (0.0, args.latency_ms / 1000):
                if latency:
                    for name in ("cat_file", "find"):
                        real = getattr(store.fs, name)

                        def slow(*a, _real=real, **k):
                            time.sleep(latency)
                            return _real(*a, **k)

                        setattr(store.fs, name, slow)
                Store._each = one_at_a_time
                seq = timed()
                Store._each = concurrent
                rows[latency] = (seq, timed())

    print(f"an entry referring to {args.pieces} pieces; Store.complete() = 2 requests per piece; medians of 3")
    for latency, (seq, par) in rows.items():
        label = "moto on loopback" if not latency else f"+{latency * 1000:.0f} ms per request (simulated)"
        print(f"{label:36} one at a time {seq * 1000:7.0f} ms   16 at a time {par * 1000:7.0f} ms   {seq / par:.1f}x")


if __name__ == "__main__":
    main()
