""".ci/run, the CI entry point: a browser it cannot install fails CI before any test runs (the UI test would
otherwise skip unseen). Run with a PATH of stand-ins and no `make`, so no case here can start the suite."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow  # .ci/run in a child shell


def ci_run(tmp_path: Path, apt_get: str | None) -> subprocess.CompletedProcess:
    """.ci/run with PATH holding only what it needs before `make`, and `apt_get` (a shell script body) as
    apt-get, or no apt-get at all."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "mktemp", "tail", "rm"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if apt_get is not None:
        (bin_dir / "apt-get").write_text(f"#!/bin/sh\n{apt_get}\n")
        (bin_dir / "apt-get").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CPT_REQUIRE_BROWSER", "CPT_REQUIRE_NATIVE")}
    return subprocess.run([shutil.which("bash"), str(ROOT / ".ci" / "run")], env={**env, "PATH": str(bin_dir)},
                          capture_output=True, text=True, timeout=60)


def test_a_failed_browser_install_fails_ci_with_apts_words(tmp_path):
    out = ci_run(tmp_path, 'echo "E: Unable to locate package chromium-driver" >&2; exit 100')
    assert out.returncode == 1
    assert out.stderr == (".ci/run: installing chromium and chromium-driver failed; apt said:\n"
                          "E: Unable to locate package chromium-driver\n")


def test_no_apt_get_and_no_browser_fails_ci(tmp_path):
    out = ci_run(tmp_path, None)
    assert out.returncode == 1
    assert out.stderr == (".ci/run: chromium and chromedriver are not installed and there is no apt-get to "
                          "install them\n")


def test_an_install_that_leaves_no_browser_on_path_fails_ci(tmp_path):
    out = ci_run(tmp_path, "exit 0")
    assert out.returncode == 1
    assert out.stderr == (".ci/run: apt installed chromium and chromium-driver but chromium or chromedriver is "
                          "not on PATH\n")
