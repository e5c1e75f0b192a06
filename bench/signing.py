"""What signed entries cost a lookup: `Store.complete()` of an entry that refers to N per-file pieces (2 requests
per piece: its manifest and its listing), with signing off and on (every manifest sealed at publish, verified at
lookup: tasks/core/signing.py), on the same S3 server in one run; and the ed25519 verification of one manifest
alone (the CPU a lookup adds per manifest).

moto's S3 server on 127.0.0.1 answers in a few ms (CPU-bound on this machine); the S3 of a cloud region takes
~10-40 ms per request, next to which a verification's tens of microseconds vanish even more.

    .venv/bin/python -m bench.signing [--pieces 50] [--repeats 5]
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
    ap.add_argument("--pieces", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    port = free_port()
    with moto_server(port), tempfile.TemporaryDirectory() as d:
        os.environ.update(s3_env(port))
        import s3fs

        from tasks.core import signing
        from tasks.core.root import open_root

        secret, public = signing.generate("bench")

        def published(signed: bool):
            """An entry of N pieces in a bucket of its own, published with signing on or off."""
            os.environ.pop(signing.SIGNING_KEY, None)
            os.environ.pop(signing.TRUSTED_KEYS, None)
            if signed:
                os.environ[signing.SIGNING_KEY] = secret
            bucket = f"sign-{uuid.uuid4().hex[:8]}"
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
            os.environ["CPT_SCRATCH"] = f"{d}/{bucket}"
            root = open_root(f"s3://{bucket}/p")
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
            return root

        def reader(root, verifying: bool):
            """A fresh Store on the same bucket, as a reading host opens it (trusting the key, or no key set)."""
            from tasks.core.objectstore import Store

            os.environ.pop(signing.SIGNING_KEY, None)
            os.environ.pop(signing.TRUSTED_KEYS, None)
            if verifying:
                os.environ[signing.TRUSTED_KEYS] = public
            return Store(root.url, root.local)

        def timed(store) -> float:
            runs = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                assert store.complete("cache/whole/whole-1") is not None
                runs.append(time.perf_counter() - started)
            return statistics.median(runs)

        plain = reader(published(False), False)
        signed = reader(published(True), True)
        timed(plain), timed(signed)  # warm the connections
        off, on = [], []
        for _ in range(3):  # interleaved, so drift of the machine's load hits both alike
            off.append(timed(plain))
            on.append(timed(signed))
        t_off, t_on = statistics.median(off), statistics.median(on)

        # One manifest's verification alone (what `open` adds per manifest read), medians of 2,000.
        keys = signing.keys_from_env()
        place = "cache/whole/whole-1/_COMPLETE"
        sealed = signing.Keys(signer=_signer(secret)).seal(place, b"{\"stage\": \"x\"}" * 40)
        samples = []
        for _ in range(2000):
            started = time.perf_counter()
            keys.open(place, sealed)
            samples.append(time.perf_counter() - started)
        verify = statistics.median(samples)

    manifests = args.pieces + 1
    print(f"Store.complete() of an entry referring to {args.pieces} pieces ({manifests} manifests, "
          f"{2 * manifests} requests), moto on loopback, medians of {args.repeats} x 3 interleaved:")
    print(f"  signing off {t_off * 1000:8.1f} ms   signing on {t_on * 1000:8.1f} ms   ratio on/off {t_on / t_off:.3f}"
          f"   difference {(t_on - t_off) / manifests * 1e6:+.0f} µs per manifest")
    print(f"  one manifest's ed25519 verification alone: {verify * 1e6:.1f} µs (median of 2,000)")


def _signer(secret: str):
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    name, b64 = secret.split(":", 1)
    return name, Ed25519PrivateKey.from_private_bytes(base64.b64decode(b64)[:32])


if __name__ == "__main__":
    main()
