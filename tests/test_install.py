"""`pip install .` outside the checkout: the wheel carries every package, the compiled kernel and the starter
project, and the `cpt` it installs works from another folder with no help from the checkout.

The wheel is built from a copy of the checkout's files as a clone would have them (tracked and unignored: no
editable install's in-place `.so`, no build/ leftovers) and installed into a fresh venv under tmp_path. To keep it
fast the fresh venv reuses this environment's third-party packages through a .pth line naming its site-packages:
a path line only puts that folder on sys.path, its own .pth files (the editable install's `__editable__` finder,
which would serve `tasks`/`flows` from the checkout) are never run. Each `cpt` command runs with a probe that
records, at exit, the file of every `tasks`/`flows` module it imported, so the test proves where they came from.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("tasks", "flows")
HEAVY = ("torch", "transformers", "datasets")

# Imported from the fresh venv's site-packages by a .pth line at every interpreter start; active only in a process
# started as `cpt` while CPT_INSTALL_PROBE names a folder, where it writes what that process imported at exit.
PROBE = '''
import atexit, json, os, sys

def _report():
    out = os.environ.get("CPT_INSTALL_PROBE")
    if not out or os.path.basename(sys.argv[0]) != "cpt":
        return
    mods = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())
            if n.split(".")[0] in ("tasks", "flows")}
    with open(os.path.join(out, f"{os.getpid()}.json"), "w") as f:
        json.dump({"modules": mods, "loaded": sorted(sys.modules), "sys_path": sys.path,
                   "meta_path": [type(f).__name__ if not isinstance(f, type) else f.__name__ for f in sys.meta_path]}, f)

atexit.register(_report)
'''


def _kernel_expected() -> bool:
    """The wheel must carry the compiled kernel wherever this machine can build it: CI says so
    (CPT_REQUIRE_NATIVE, as in test_near_dedup.py), and a dev install that built it in place shows a compiler is
    here. Without one the install goes on without it (setup.py: optional) and near-dedup uses numpy."""
    from tasks.data import shingles

    return bool(os.environ.get("CPT_REQUIRE_NATIVE")) or shingles._native() is not None


def _source_copy(dest: Path) -> Path:
    """The files a clone of this checkout holds, with uncommitted edits: what `pip install git+…` builds."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    if listed.returncode == 0:
        for rel in filter(None, listed.stdout.decode().split("\0")):
            if (ROOT / rel).is_file():  # a tracked file deleted in the work tree is not in a clone of it either
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
    else:  # not a git checkout (an unpacked archive): leave out what builds and runs leave behind
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "artifacts", "*.egg-info", "__pycache__", "*.so", ".pytest_cache"))
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _source_copy(tmp_path_factory.mktemp("src"))
    dist = tmp_path_factory.mktemp("dist")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(dist)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    (whl,) = dist.glob("cpt-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> dict:
    """A fresh venv outside the checkout with the wheel installed (the project's code only from there) and this
    environment's third-party packages reachable."""
    home = tmp_path_factory.mktemp("fresh")
    path = home / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The wheel first, while the venv sees nothing of this environment: pip then has no other cpt to weigh.
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                          "--no-index", "-q", str(wheel)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    deps = Path(sysconfig.get_paths()["purelib"])
    (site / "_cpt_test_deps.pth").write_text(f"{deps}\n")  # a path line: appended to sys.path, its .pth not run
    (site / "_cpt_install_probe.py").write_text(PROBE)
    (site / "_cpt_install_probe.pth").write_text("import _cpt_install_probe\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                                                              "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env.update(PATH=f"{path / 'bin'}{os.pathsep}{env.get('PATH', '')}", PREFECT_HOME=str(home / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
               HF_HUB_OFFLINE="1", CPT_NO_PROGRESS="1")
    return {"python": python, "cpt": path / "bin" / "cpt", "site": site.resolve(), "deps": deps.resolve(),
            "env": env, "home": home}


def _cpt(venv: dict, *args: str, cwd: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the installed `cpt` script in `cwd`; return its result and what its probe recorded."""
    probe = cwd.parent / f"probe-{cwd.name}"
    shutil.rmtree(probe, ignore_errors=True)
    probe.mkdir()
    out = subprocess.run([str(venv["cpt"]), *args], cwd=cwd, env={**venv["env"], "CPT_INSTALL_PROBE": str(probe)},
                         capture_output=True, text=True, timeout=timeout)
    reports = [json.loads(p.read_text()) for p in probe.glob("*.json")]
    assert len(reports) == 1, (reports, out.stderr[-3000:])
    return out, reports[0]


def _assert_installed_code_only(venv: dict, report: dict, tasks: bool = True) -> None:
    """Every `tasks`/`flows` module the process imported is the fresh venv's copy; nothing could have come from
    the checkout (not on sys.path but for the deps folder, no editable finder)."""
    mods = report["modules"]
    assert "flows.cli" in mods and (not tasks or "tasks" in mods), sorted(mods)
    elsewhere = {n: f for n, f in mods.items() if f is None or not Path(f).resolve().is_relative_to(venv["site"])}
    assert not elsewhere, f"imported from outside {venv['site']}: {elsewhere}"
    on_path = [p for p in report["sys_path"] if p and Path(p).resolve().is_relative_to(ROOT)
               and Path(p).resolve() != venv["deps"]]
    assert not on_path, f"the checkout is on sys.path: {on_path}"
    assert not [f for f in report["meta_path"] if "Editable" in f], report["meta_path"]


@pytest.mark.slow  # builds the wheel
def test_the_wheel_carries_every_package_the_kernel_and_the_starter_project(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.relative_to(ROOT).as_posix() for top in OURS for p in (ROOT / top).rglob("*.py")
                     if "__pycache__" not in p.parts)
    assert "tasks/core/config/tree.py" in sources  # the walk sees subpackages, or the next line proves nothing
    missing = [s for s in sources if s not in names]
    assert not missing, f"{wheel.name} lacks {len(missing)} of {len(sources)} modules: {missing}"
    if _kernel_expected():
        assert any(n.startswith("tasks/_shingle.") and n.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
                   for n in names), f"no compiled tasks._shingle in {wheel.name}"
    starter = sorted(p.relative_to(ROOT).as_posix() for top in ("configs", "samples") for p in (ROOT / top).rglob("*")
                     if p.is_file())
    assert {"configs/demo.yaml", "samples/medical_ko.jsonl", "samples/tasks/ko_health_cloze.yaml"} <= set(starter)
    assert [s for s in starter if f"flows/_starter/{s}" not in names] == []


@pytest.mark.slow  # builds and installs the wheel, starts a Prefect server and a flow
def test_the_installed_cpt_works_from_another_folder_without_the_checkout(venv, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    assert not work.resolve().is_relative_to(ROOT) and not venv["site"].is_relative_to(ROOT)

    kernel = _kernel_expected()
    if kernel:  # the installed near-dedup finds the compiled module, the wheel's own
        out = subprocess.run([str(venv["python"]), "-c", "import tasks.data.shingles as n; print(n._native().__file__)"],
                             cwd=work, env=venv["env"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert Path(out.stdout.strip()).resolve().parent == venv["site"] / "tasks", out.stdout

    out, report = _cpt(venv, "--help", cwd=work)
    assert out.returncode == 0 and "init-tiny-model" in out.stdout and ",init," in out.stdout, out.stderr
    _assert_installed_code_only(venv, report, tasks=False)  # --help needs no stage code
    assert [m for m in HEAVY if m in report["loaded"]] == []

    out, report = _cpt(venv, "init", "proj", cwd=work)
    assert out.returncode == 0, out.stderr
    proj = work / "proj"
    assert (proj / "configs/demo.yaml").read_bytes() == (ROOT / "configs/demo.yaml").read_bytes()
    assert (proj / "samples/tasks/ko_health_cloze.jsonl").is_file() and (proj / "configs/gemma3-1b-medical.yaml").is_file()

    # Before its tiny model is built, the demo's config names a folder that is not there: validate says so.
    out, _ = _cpt(venv, "validate", "--config", "configs/demo.yaml", cwd=proj)
    assert out.returncode == 2 and "`cpt init-tiny-model artifacts/models/tiny-ko`" in out.stderr, out.stderr

    out, _ = _cpt(venv, "init-tiny-model", "artifacts/models/tiny-ko", "--vocab-size", "400", "--hidden-size", "32",
                  "--layers", "1", cwd=proj, timeout=300)
    assert out.returncode == 0 and (proj / "artifacts/models/tiny-ko/config.json").is_file(), out.stderr[-3000:]

    for config in ("configs/demo.yaml", "configs/gemma3-1b-medical.yaml"):
        out, report = _cpt(venv, "validate", "--config", config, cwd=proj)
        assert out.returncode == 0 and "text_field: content" in out.stdout, out.stderr
        _assert_installed_code_only(venv, report)
        assert [m for m in HEAVY if m in report["loaded"]] == []  # lazy heavy imports hold when installed too

    out, report = _cpt(venv, "run", "--config", "configs/demo.yaml", "--until", "chunk", "--summary", "run.json",
                       cwd=proj, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    _assert_installed_code_only(venv, report)
    summary = json.loads((proj / "run.json").read_text())
    assert [s["name"] for s in summary["stages"]][-1] == "chunk"
    assert {s["state"] for s in summary["stages"]} == {"Completed"}, summary["stages"]
    assert (proj / "artifacts" / "cache" / "chunk").is_dir()  # the run wrote where the user stands, not the checkout
    # Near-dedup is on in the demo: the run hashed its shingles with the installed kernel.
    assert not kernel or Path(report["modules"]["tasks._shingle"]).resolve().parent == venv["site"] / "tasks"


def test_init_writes_the_starter_project_and_keeps_a_users_edits(tmp_path, capsys):
    from flows.cli import main

    assert main(["init", str(tmp_path)]) == 0
    assert (tmp_path / "configs/demo.yaml").read_bytes() == (ROOT / "configs/demo.yaml").read_bytes()
    assert (tmp_path / "samples/tasks/ko_health_cloze.yaml").is_file()
    assert main(["init", str(tmp_path)]) == 0  # files equal to the starter's are no conflict
    (tmp_path / "configs/demo.yaml").write_text("mine\n")
    assert main(["init", str(tmp_path)]) == 1
    assert "configs/demo.yaml" in capsys.readouterr().err and (tmp_path / "configs/demo.yaml").read_text() == "mine\n"
    assert main(["init", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "configs/demo.yaml").read_bytes() == (ROOT / "configs/demo.yaml").read_bytes()
