"""train.sharding: fsdp: FSDP2 through accelerate, run here as 2 CPU processes over gloo (tasks/ml/sharding.py
says how accelerate is let do it on CPU), against one process at the same global batch; sharded checkpoints
sealed, verified before a resume reads a byte of them, resumed exactly after a kill; one safetensors model at the
end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _train(tiny_model, chunks, out: Path, processes: int, sharding: str, log=None, **extra) -> dict:
    from tasks.core.config.model import ModelConfig, TrainConfig
    from tasks.train import train_model

    cfg = TrainConfig(max_steps=8, per_device_train_batch_size=4 // processes, gradient_accumulation_steps=2,
                      learning_rate=1e-3, warmup_ratio=0.0, logging_steps=1, eval_steps=2, save_steps=2,
                      early_stopping_patience=None, optim="adamw_torch", num_processes=processes, seed=7,
                      sharding=sharding, **extra)
    out.mkdir(parents=True, exist_ok=True)
    spec = {"model_location": str(tiny_model), "model": ModelConfig(id=str(tiny_model)).model_dump(),
            "train": cfg.model_dump(), "max_seq_length": 48, "chunks_dir": str(chunks), "output_dir": str(out),
            "checkpoint_dir": str(out / "checkpoints"), "tensorboard_dir": str(out / "tensorboard")}
    return train_model(spec, processes, log)


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


class _Log:
    def __init__(self):
        self.warnings = []

    def warning(self, fmt, *args):
        self.warnings.append(fmt % args)

    def info(self, *a):
        pass


@pytest.mark.slow  # training children (2 processes)
def test_fsdp_on_two_processes_matches_one_and_resumes_from_sharded_checkpoints(tiny_model, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from test_lora import _chunks
    from tasks.train import TrainingFailed

    chunks = _chunks(tiny_model, tmp_path / "chunks")
    one = _train(tiny_model, chunks, tmp_path / "one", 1, "none")
    whole = _train(tiny_model, chunks, tmp_path / "fsdp", 2, "fsdp")
    assert whole["world_size"] == 2 and whole["sharding"] == "fsdp"
    assert [r["rank"] for r in whole["ranks"]] == [0, 1] and whole["ranks"][1]["wrote"] == []
    # Sharded checkpoints: torch.distributed.checkpoint folders, one file per rank.
    ckpt = tmp_path / "fsdp" / "checkpoints" / "checkpoint-8"
    assert {p.name for p in (ckpt / "pytorch_model_fsdp_0").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert (ckpt.parent / ".seals" / "checkpoint-8.json").is_file()
    # Per-step losses within 1e-3 of one process at the same global batch (2 x 2 rows x 2 = 4 x 2).
    assert [s for s, _ in _losses(tmp_path / "fsdp")] == [s for s, _ in _losses(tmp_path / "one")] == list(range(1, 9))
    assert [v for _, v in _losses(tmp_path / "fsdp")] == pytest.approx([v for _, v in _losses(tmp_path / "one")],
                                                                      rel=1e-3)
    # One consolidated safetensors model, the weights of one process's (the best checkpoint of each). Adam moves a
    # weight by about the learning rate whatever its gradient's size, so where a gradient is ~0 the reduction order
    # can flip its sign: a few elements differ by up to 2 x lr (1e-3), the mean difference stays tiny.
    a, b = load_file(tmp_path / "fsdp" / "model" / "model.safetensors"), load_file(tmp_path / "one" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and "lm_head.weight" not in a  # tied: saved once, as save_pretrained does
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-3)
        assert (a[name] - b[name]).abs().mean() < 1e-4, name

    # Killed after its checkpoint at step 6; checkpoint-6's pickled metadata then altered (same size): the resume
    # refuses it without reading it and resumes from checkpoint-4, verified, and ends as the uninterrupted run.
    killed = tmp_path / "killed"
    monkeypatch.setenv("CPT_TEST_KILL_AFTER_SAVE_STEP", "6")
    with pytest.raises(TrainingFailed):
        _train(tiny_model, chunks, killed, 2, "fsdp")
    monkeypatch.delenv("CPT_TEST_KILL_AFTER_SAVE_STEP")
    metadata = killed / "checkpoints" / "checkpoint-6" / "pytorch_model_fsdp_0" / ".metadata"
    data = bytearray(metadata.read_bytes())
    data[len(data) // 2] ^= 0xFF
    metadata.write_bytes(bytes(data))
    log = _Log()
    resumed = _train(tiny_model, chunks, killed, 2, "fsdp", log=log)
    assert resumed["resumed_from"] == "checkpoint-4" and resumed["first_step"] == 5
    assert any("checkpoint-6 is not resumed from" in w and ".metadata" in w for w in log.warnings), log.warnings
    assert [v for _, v in _losses(killed)] == pytest.approx([v for _, v in _losses(tmp_path / "fsdp")], rel=1e-5)
    c = load_file(killed / "model" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=1e-5, atol=1e-6)


def test_a_sealed_sharded_checkpoint_is_verified_before_any_byte_is_read(tmp_path, monkeypatch):
    """The seal lists every file of every rank with size and digest (hashed by the ranks in shares and
    gathered); verification reads only the seal and the bytes' digests — torch.load and the checkpoint reader
    are never called, whatever the files hold."""
    import torch.distributed.checkpoint as dcp

    from tasks.ml import checkpoints as w

    ckpt = tmp_path / "checkpoint-4"
    (ckpt / "pytorch_model_fsdp_0").mkdir(parents=True)
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
        (ckpt / "pytorch_model_fsdp_0" / name).write_bytes(name.encode() * 10)
    (ckpt / "rng_state_0.pth").write_bytes(b"rng0")
    (ckpt / "rng_state_1.pth").write_bytes(b"rng1")
    shares = []

    def gather(part):  # two ranks: this one's share and the other's, computed the same way
        shares.append(part)
        other = {n: [(ckpt / n).stat().st_size, w.hash_file(ckpt / n)] for n in w.checkpoint_files(ckpt)[1::2]}
        return [part, other]

    seal = json.loads(w.seal_checkpoint(ckpt, rank=0, world=2, gather=gather))
    assert set(seal["files"]) == set(w.checkpoint_files(ckpt)) and len(shares[0]) == 3  # rank 0 hashed 3 of 5

    def never(*a, **k):
        raise AssertionError("a checkpoint's bytes were deserialised before verification")

    monkeypatch.setattr(dcp, "load", never)
    monkeypatch.setattr("torch.load", never)
    assert w.verified_checkpoint(ckpt) is None
    (ckpt / "pytorch_model_fsdp_0" / "__1_0.distcp").write_bytes(b"X" * len("__1_0.distcp") * 10)
    assert "__1_0.distcp does not have the content" in w.verified_checkpoint(ckpt)
    (ckpt / "pytorch_model_fsdp_0" / "__1_0.distcp").write_bytes(b"__1_0.distcp" * 10)
    (ckpt / "pytorch_model_fsdp_0" / "__2_0.distcp").write_bytes(b"extra")
    assert "not the ones its manifest lists" in w.verified_checkpoint(ckpt)
    w.seal_path(ckpt).unlink()
    assert "no seal" in w.verified_checkpoint(ckpt)
