"""The one typed config tree (tasks/core/config/tree.py: `CptConfig`), in modules by what they configure:
base (the `Section` every part builds on, `ConfigError`), data (the data stages), model (model, train, evaluate,
gate, push), task_files (local lm-eval task files), tree (the whole tree, YAML and `--set`). Import from the module
that defines a name: this package's own module stays empty, so importing one section imports no other."""
