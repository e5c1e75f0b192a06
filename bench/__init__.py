"""cpt's benchmarks: each measures one claim of the project (data path, chunking and training throughput, the
GPU path, cached reruns, the object store, fan-out, incremental drops, forgetting and replay) against a baseline
measured in the same run (mostly the seed notebook's own code, or Prefect's floor), and prints ratios to it, so a
figure never leans on a number from another machine or another day.

Run from the repository root, as modules of this package:

    .venv/bin/python -m bench.<name> [--help]

What they share (paths, the seed notebook's data path, the tokenizer and model they build, the servers some
start, the fresh processes they time) is in bench/common.py.
"""
