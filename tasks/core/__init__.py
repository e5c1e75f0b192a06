"""Infrastructure that knows no stage: manifests and digests, keys and code versions, publishing and verifying
entries, the artifacts root (local, or an object store with a mirror), the stage decorator, config, report and
fan-out. Nothing here imports a stage module; tests/test_layout.py checks it."""
