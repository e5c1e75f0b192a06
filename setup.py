"""The one compiled piece: near-dedup's shingle hashing (tasks/_shingle.c). Optional: where no C compiler is at
hand the install goes on without it and tasks/near_dedup.py computes the same hashes in numpy (slower)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tasks._shingle", ["tasks/_shingle.c"], optional=True,
                             extra_compile_args=["-O3"])])
