"""A training's checkpoints: sealed once whole (a manifest of their files' digests, written by rank 0 after every
rank wrote its shares), verified before any of their bytes are loaded (the sharded format's metadata is a pickle),
copied to and from an object-store root so a training killed on one host resumes on another."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tasks.core.manifest import MANIFEST, hash_file, safe_relpath
from tasks.core.root import ArtifactsRoot, open_root
from tasks.ml.spec import TrainSpec

SEALS = ".seals"  # checkpoints/.seals/<checkpoint name>.json: each checkpoint's manifest, written once it is whole


def seal_path(checkpoint: Path) -> Path:
    return checkpoint.parent / SEALS / f"{checkpoint.name}.json"


def checkpoint_files(checkpoint: Path) -> list[str]:
    return sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())


def seal_checkpoint(checkpoint: Path, rank: int = 0, world: int = 1, gather=None) -> bytes | None:
    """The checkpoint's manifest (every file with its size and digest), written beside it (`seal_path`) once every
    rank has written its part: what a resume checks before it reads a byte of it. The files are hashed by all
    ranks, each a share (a sharded 8B checkpoint is ~100 GB), and gathered to rank 0 (`gather`: all_gather_object
    over the process group), which writes the seal atomically and returns its bytes (None elsewhere)."""
    names = checkpoint_files(checkpoint)
    mine = {n: [(checkpoint / n).stat().st_size, hash_file(checkpoint / n)] for n in names[rank::world]}
    parts = gather(mine) if gather is not None else [mine]
    if rank != 0:
        return None
    files = {k: v for part in parts for k, v in part.items()}
    data = json.dumps({"files": dict(sorted(files.items()))}).encode()
    seal = seal_path(checkpoint)
    seal.parent.mkdir(parents=True, exist_ok=True)
    tmp = seal.with_name(f".{seal.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, seal)
    return data


def verified_checkpoint(checkpoint: Path) -> str | None:
    """Why `checkpoint` may not be read (no seal: cut short; a file missing, extra, resized or changed since it
    was sealed), or None. Reads only the seal and hashes the files: nothing of the checkpoint is deserialised
    (torch.distributed.checkpoint's .metadata, optimizer and RNG states are pickles)."""
    try:
        seal = seal_path(checkpoint).read_bytes()
    except OSError:
        return "it has no seal (cut short before every rank finished writing it)"
    return checkpoint_damage(checkpoint, seal)


def push_checkpoint(root: ArtifactsRoot, work_rel: str, checkpoint: Path, tensorboard: Path,
                    seal: bytes | None = None) -> None:
    """Copy a finished checkpoint (marker last) and the TensorBoard logs so far to the root's store, then drop
    the older checkpoints there: a training killed on this host resumes on another from the newest one. A
    local root has no store: nothing is copied."""
    remote = f"{work_rel}/checkpoints/{checkpoint.name}"
    # The marker, written last, is the checkpoint's manifest (its seal): every file with its size and digest,
    # checked by the host that resumes from it (a checkpoint is trusted no more than any other stored bytes).
    if seal is None:
        seal = json.dumps({"files": {n: [(checkpoint / n).stat().st_size, hash_file(checkpoint / n)]
                                     for n in checkpoint_files(checkpoint)}}).encode()
    root.upload_dir(checkpoint, remote, marker=seal)
    if tensorboard.is_dir():
        root.upload_dir(tensorboard, f"{work_rel}/tensorboard")
    for name in {n.split("/", 1)[0] for n in root.remote_files(f"{work_rel}/checkpoints")} - {checkpoint.name}:
        root.remove_remote(f"{work_rel}/checkpoints/{name}")


def pull_checkpoint(root: ArtifactsRoot, work_rel: str, checkpoints: Path, tensorboard: Path,
                    warn=print) -> str | None:
    """Bring the store's newest complete checkpoint (and the logs that go with it) here, unless this host has
    one as new; returns its name (None on a local root)."""
    listing = root.remote_files(f"{work_rel}/checkpoints")
    done = [n.split("/", 1)[0] for n in listing if n.endswith(f"/{MANIFEST}")]
    steps = sorted((int(n.rsplit("-", 1)[-1]), n) for n in done if n.rsplit("-", 1)[-1].isdigit())
    if not steps:
        return None
    step, name = steps[-1]
    local = last_complete_checkpoint(checkpoints)
    if local is not None and int(local.name.rsplit("-", 1)[-1]) >= step:
        return None
    tmp = checkpoints / f".{name}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    remote = f"{work_rel}/checkpoints/{name}"
    root.download_dir(remote, tmp)
    marker = root.read_remote(f"{remote}/{MANIFEST}")
    why = checkpoint_damage(tmp, marker)
    if why is not None:  # never resumed from: dropped there, and training goes on from what this host has
        warn(f"train: the stored {name} is damaged ({why}); not resumed from it, and removed from the store")
        shutil.rmtree(tmp, ignore_errors=True)
        root.remove_remote(remote)
        return None
    shutil.rmtree(checkpoints / name, ignore_errors=True)
    os.replace(tmp, checkpoints / name)
    seal = seal_path(checkpoints / name)  # the manifest it was checked against: the resume checks it again
    seal.parent.mkdir(parents=True, exist_ok=True)
    seal.write_bytes(marker)
    root.download_dir(f"{work_rel}/tensorboard", tensorboard)
    return name


def checkpoint_damage(folder: Path, marker: bytes | None) -> str | None:
    """Why a downloaded checkpoint does not match the manifest its marker holds (a file missing, extra, of
    another size or content), or None."""
    try:
        files = safe_files(json.loads(marker or b"")["files"])
    except (ValueError, KeyError, TypeError):
        return "its manifest is missing or unreadable"
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    if present != set(files):
        return f"its files are not the ones its manifest lists ({sorted(present ^ set(files))[:3]})"
    for name, (size, digest) in files.items():
        if (folder / name).stat().st_size != size or hash_file(folder / name) != digest:
            return f"{name} does not have the content it was saved with"
    return None


def safe_files(files: dict) -> dict:
    for name in files:
        safe_relpath(name)
    return files


def checkpoint_seal(spec: TrainSpec):
    """A callback that seals every checkpoint once all ranks have written it (`seal_checkpoint`) and, on a store
    root, sends it there (rank 0). It runs before any other on_save callback."""
    from transformers import TrainerCallback

    root = open_root(spec.artifacts) if spec.artifacts is not None else None

    class CheckpointSeal(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            import torch.distributed as dist

            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if dist.is_available() and dist.is_initialized():
                world, rank = dist.get_world_size(), dist.get_rank()
                dist.barrier()  # every rank's shards, optimizer states and RNG state are written

                def gather(part):
                    parts = [None] * world
                    dist.all_gather_object(parts, part)
                    return parts
            else:
                world, rank, gather = 1, 0, None
            # transformers 5.24 sets best_model_checkpoint when the best step's folder exists, checked on every rank
            # right before a sharded checkpoint's folder is made: a slower rank may see the folder its peer just
            # made and the other not, and at the end one rank loads the best model (a collective) while the other
            # does not (seen here: a hang). Now that every rank's files are written, all agree.
            if state.best_global_step:
                best = Path(args.output_dir) / f"checkpoint-{state.best_global_step}"
                if best.is_dir():
                    state.best_model_checkpoint = str(best)
            seal = seal_checkpoint(checkpoint, rank, world, gather)
            if rank == 0:
                sweep_seals(checkpoint.parent)
                if root is not None:
                    push_checkpoint(root, spec.work_rel, checkpoint, Path(spec.tensorboard_dir), seal)
            if world > 1:
                dist.barrier()

    return CheckpointSeal()


def sweep_seals(checkpoints: Path) -> None:
    """Seals of checkpoints the Trainer rotated away."""
    for seal in (checkpoints / SEALS).glob("*.json") if (checkpoints / SEALS).is_dir() else []:
        if not (checkpoints / seal.stem).is_dir():
            seal.unlink(missing_ok=True)


def last_complete_checkpoint(checkpoints: Path, warn=None) -> Path | None:
    """The newest checkpoint whose files match its seal, the manifest written once every rank finished it. One
    without a seal was cut short (a SIGKILL mid-save); one whose files changed since (a flipped byte, a swapped
    shard, an extra file) is never read. Either is removed, named through `warn`, and the next older one is tried."""
    import shutil

    found = []
    for d in checkpoints.glob("checkpoint-*") if checkpoints.is_dir() else []:
        step = d.name.rsplit("-", 1)[-1]
        if d.is_dir() and step.isdigit():
            found.append((int(step), d))
    for _, d in sorted(found, reverse=True):
        why = verified_checkpoint(d)
        if why is None:
            return d
        if warn is not None and "no seal" not in why:
            warn(f"{d.name} is not resumed from: {why}; removed")
        shutil.rmtree(d, ignore_errors=True)
        seal_path(d).unlink(missing_ok=True)
    return None
