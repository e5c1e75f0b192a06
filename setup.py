"""What pyproject.toml cannot say declaratively:

- The one compiled piece: near-dedup's shingle hashing (tasks/_shingle.c). Optional: where no C compiler is at
  hand the install goes on without it and tasks/data/shingles.py computes the same hashes in numpy (slower).
- The starter project `cpt init` writes: the top-level configs/ and samples/ copied into the wheel at build time
  as flows/_starter/{configs,samples}, so an installed cpt (`pip install .`, `pip install git+…`, a container
  image) carries them while the checkout keeps one copy at the top level, where `make demo` and the docs use
  them. An editable install skips the copy: `cpt init` reads the checkout's own folders then.
"""

import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# What a user needs to start: the demo and the seed job's configs, the sample corpora, the local lm-eval task.
# The same patterns are in MANIFEST.in, so a wheel built from the sdist carries them too.
STARTER = {"configs": ["*.yaml"], "samples": ["*.jsonl", "tasks/*.yaml", "tasks/*.jsonl", "drops/*/*.jsonl"]}
STARTER_DIR = ("flows", "_starter")


class BuildPyWithStarter(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        dest = Path(self.build_lib, *STARTER_DIR)
        shutil.rmtree(dest, ignore_errors=True)  # a reused build/ folder must not keep files removed since
        for top, patterns in STARTER.items():
            files = [f for pattern in patterns for f in sorted((HERE / top).glob(pattern)) if f.is_file()]
            if not files:  # a wheel without them would install a cpt whose `cpt init` writes nothing
                raise SystemExit(f"setup.py: no {top}/{patterns} beside setup.py: the starter project is missing")
            for f in files:
                target = dest / f.relative_to(HERE)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)


setup(cmdclass={"build_py": BuildPyWithStarter},
      ext_modules=[Extension("tasks._shingle", ["tasks/_shingle.c"], optional=True, extra_compile_args=["-O3"])])
