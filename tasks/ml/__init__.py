"""Model code: loading, identity and evaluation helpers (modeling.py), the training child and its typed spec
(train_worker.py, spec.py), and the tiny local model the demo and the tests build (tiny_model.py). torch and
transformers are imported inside functions only."""
