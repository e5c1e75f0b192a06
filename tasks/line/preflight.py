"""Conflicts before compute: what would make a run fail after its training, found before any stage runs.

A run that trains for hours and then cannot push has burnt the GPU night. So `cpt validate` and the start of every
run (`cpt run`, `cpt retrain`, a deployment's run) check, with the fix in the message:

- the release's name: without `push.name` (and without `push.repo_id`, which names a lineage of its own) it is
  derived from the base model and the corpus, or from the line, so a new corpus starts a new lineage instead of
  overwriting (and being gated against) another corpus's model;
- release ownership: the release folder and the Hub repo must not belong to another lineage (`ReleaseClaimed`,
  which push would raise after training);
- the line's run lock: held on this host by a run for longer than `CPT_LINE_LOCK_MAX_SECONDS` (24 h), the run
  would wait behind what is most likely a stuck run;
- the push target: the release folder must be writable (a file in the way, a read-only disk);
- the Hub: `push.repo_id` needs a token (HF_TOKEN or `push.token_secret`), and the token must be able to write
  there (asked of the Hub when it answers; offline, not asked).

No Prefect, torch or transformers here (a Prefect Secret block is loaded only when asked to, at a run's start).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from tasks.core.config.tree import CptConfig
from tasks.core.root import ArtifactsRoot
from tasks.line import lines
from tasks.line.promotions import lineage_of, release_owners, release_targets

LOCK_MAX_SECONDS = 24 * 3600  # a line's run lock held longer than this (CPT_LINE_LOCK_MAX_SECONDS) is a conflict


class RunConflict(RuntimeError):
    """A run that would fail after training (or wait forever); the message says how to fix it."""


# ------------------------------------------------------------------------------------------ the release's name


def _slug(text: str, limit: int) -> str:
    """Letters, digits, `_` and `-` of `text` (other characters become `-`), at most `limit` long."""
    return re.sub(r"[^\w-]+", "-", text, flags=re.UNICODE).strip("-_")[:limit].strip("-_")


def corpus_slug(paths: list[str]) -> str:
    """A short readable name for a corpus: each path's last part before any glob, without its suffix
    (`samples/medical_ko.jsonl` -> `medical_ko`; `data/*.jsonl` and `more/` -> `data-more`)."""
    names = []
    for p in paths:
        parts = [x for x in Path(p).parts if x not in ("/", ".", "..")]
        plain = list(itertools.takewhile(lambda x: not any(c in x for c in "*?["), parts))
        if not plain:
            names.append("corpus")
        else:  # a file or folder: its name less the suffix; a glob: the folder it starts in
            names.append(Path(plain[-1]).stem if len(plain) == len(parts) else plain[-1])
    return _slug("-".join(dict.fromkeys(names)), 40) or "corpus"


def derived_push_name(config: CptConfig, line: str | None) -> str:
    """The release's name when push.name is not given: a line's own (`<model>-cpt-line-<line>`), else the base
    model's and the corpus's, with a digest of both as written (`tiny-ko-cpt-medical_ko-3f2a1c`), so another
    corpus or model is another release and another lineage, and the same config finds its own again."""
    model = _slug(config.model.id.rstrip("/").split("/")[-1], 40) or "model"
    if line:
        return f"{model}-cpt-line-{line}"
    paths = config.data_sources()[0].corpus.paths  # the domain: `corpus`, or the first of `sources`
    digest = hashlib.blake2b(json.dumps([config.model.id, sorted(paths)]).encode(), digest_size=3).hexdigest()
    return f"{model}-cpt-{corpus_slug(paths)}-{digest}"


def with_release_name(config: CptConfig, line: str | None) -> CptConfig:
    """`config` with push.name set: the one given, else derived (`derived_push_name`). A run that names a Hub repo
    but no folder keeps push's own default (its lineage comes from the repo)."""
    if config.push.name or config.push.repo_id:
        return config
    push = config.push.model_copy(update={"name": derived_push_name(config, line)})
    return config.model_copy(update={"push": push})


def release_note(config: CptConfig, line: str | None) -> str:
    """Where the run's model goes and which lineage it belongs to, in words (`cpt validate`)."""
    named = with_release_name(config, line)
    lineage = lineage_of(line, named.push.name, named.push.repo_id)
    where = f"artifacts/models/{named.push.name}" if named.push.name else "artifacts/models/<base>-cpt-<key>"
    how = ("" if config.push.name or config.push.repo_id else
           f"; push.name is not set: derived from {'the line' if line else 'the base model and the corpus'}")
    hub = f", uploaded to {config.push.repo_id}" if config.push.repo_id else ""
    return f"release: {where}{hub} (lineage {lineage or 'of the Hub repo'}{how})"


# ------------------------------------------------------------------------------------------------ the checks


def _who(owner: str) -> str:
    if owner.startswith("line-"):
        return f"training line {owner[5:]!r} (cpt retrain --line {owner[5:]})"
    if owner.startswith("name-"):
        return f"runs with push.name {owner[5:]!r}"
    return owner


def ownership_conflicts(config: CptConfig, root: ArtifactsRoot, line: str | None) -> list[str]:
    lineage = lineage_of(line, config.push.name, config.push.repo_id) or "a run without lineage"
    owners = release_owners(root)
    taken = {t: o for t in release_targets(config.push) if (o := owners.get(t)) and o != lineage}
    out = []
    for target, owner in taken.items():
        if target.startswith("hub:"):
            fix = "give this run its own Hub repo (--set push.repo_id=...)"
        else:
            suggestion = derived_push_name(config, line)
            if owners.get(f"models/{suggestion}", lineage) != lineage or suggestion == config.push.name:
                suggestion = f"{config.push.name}-{line or 'run'}"
            fix = (f"give this run its own release name (--set push.name={suggestion}, or leave push.name unset: "
                   "it is then derived from the line, or from the base model and the corpus)")
        where = f"the Hub repo {target[4:]}" if target.startswith("hub:") else f"the release folder {target}"
        out.append(f"push: {where} is written by {_who(owner)}; this run ({lineage}) would overwrite it with a "
                   f"model never compared with theirs, and fail at push after training. {fix[0].upper()}{fix[1:]}")
    return out


def lock_conflicts(root: ArtifactsRoot, line: str, now: float | None = None) -> list[str]:
    held = root.holder(lines.run_lock(line))
    if held is None:
        return []
    limit = float(os.environ.get("CPT_LINE_LOCK_MAX_SECONDS", LOCK_MAX_SECONDS))
    since = held.get("since")
    age = ((now if now is not None else time.time()) - since) if since is not None else None
    if age is None or age <= limit:
        return []  # a run is on the line now: this one waits for it, then finds its work done or does it
    who = f"pid {held['pid']} on {held['host']}"
    return [f"line {line!r}: its run lock ({lines.run_lock(line)}) has been held by {who} for {age / 3600:.1f} h, "
            f"longer than CPT_LINE_LOCK_MAX_SECONDS ({limit / 3600:.1f} h): this run would wait behind it. If that "
            f"run is stuck, stop it (kill {held['pid']} on {held['host']}); the kernel releases its lock"]


def release_folder_conflicts(config: CptConfig, root: ArtifactsRoot) -> list[str]:
    if not config.push.name:
        return []
    folder = root.path(f"models/{config.push.name}")
    if folder.exists() and not folder.is_dir():
        return [f"push: the release folder {folder} is a file: move it away, or --set push.name=<another name>"]
    probe = folder.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return [f"push: {probe} is a file where the release folder {folder} must go: move it away, or point "
                "--artifacts elsewhere"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"push: {probe} is not writable by this user, so the release {folder} cannot be saved: fix its "
                "permissions, or point --artifacts elsewhere"]
    return []


def hub_conflicts(config: CptConfig, secrets: bool) -> tuple[list[str], str | None]:
    """The Hub's problems, and the token (when it was found)."""
    push = config.push
    if not push.repo_id:
        return [], None
    if push.token_secret:
        if not secrets:
            return [], None  # a Prefect Secret block: loaded at the start of the run
        from tasks.push import PushFailed, hub_token

        try:
            token = hub_token(push.token_secret)
        except PushFailed as e:
            return [f"{e}: create it (prefect block create secret) or fix push.token_secret"], None
        if not token:
            return [f"push.token_secret: the Prefect Secret block {push.token_secret!r} is empty"], None
        return [], token
    token = os.environ.get("HF_TOKEN") or None
    if not token:
        return [f"push.repo_id is {push.repo_id!r} but there is no token to upload with: export HF_TOKEN (a token "
                f"that may write to {push.repo_id.split('/')[0]!r}), or set push.token_secret to a Prefect Secret "
                "block holding one, or unset push.repo_id to save the model locally only"], None
    return [], token


def hub_write_conflicts(repo_id: str, token: str) -> list[str]:
    """Whether the token may write to `repo_id`, as the Hub says (whoami: the user's name, organisations and the
    token's role). Offline or unanswered, nothing is claimed: push itself retries and says what failed."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return []
    try:
        me = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token).whoami()
    except Exception as e:  # noqa: BLE001  (a refused token is an answer; the network's failures are not)
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            return [f"push.repo_id {repo_id!r}: the Hub refuses the token (HTTP 401): export a valid HF_TOKEN"]
        return []
    namespace = repo_id.split("/")[0]
    names = {me.get("name")} | {o.get("name") for o in me.get("orgs") or [] if isinstance(o, dict)}
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        return [f"push.repo_id {repo_id!r}: the token is read-only: export a write token as HF_TOKEN"]
    if namespace not in names:
        return [f"push.repo_id {repo_id!r}: the token belongs to {me.get('name')!r}, who may not write to "
                f"{namespace!r} (their namespaces: {', '.join(sorted(n for n in names if n))}): use a repo under "
                "one of them, or that namespace's token"]
    return []


def conflicts(config: CptConfig, root: ArtifactsRoot, line: str | None, pushes: bool = True,
              secrets: bool = False, hub: bool = True, now: float | None = None, lock: bool = True) -> list[str]:
    """Every conflict of a run of `config` (push.name as the run will have it) on `root` and `line`; `pushes`:
    whether the run goes as far as push (not with --until chunk); `secrets`: load a Prefect Secret block (needs
    the server); `hub`: ask the Hub whether the token may write; `lock`: look at the line's run lock (not from
    inside the retrain run that holds it)."""
    config = with_release_name(config, line)
    found = lock_conflicts(root, line, now) if line and lock else []
    if pushes:
        found += ownership_conflicts(config, root, line)
        found += release_folder_conflicts(config, root)
        problems, token = hub_conflicts(config, secrets)
        found += problems
        if hub and token and not problems:
            found += hub_write_conflicts(config.push.repo_id, token)
    return found


def check_before_compute(config: CptConfig, root: ArtifactsRoot, line: str | None, pushes: bool = True,
                         secrets: bool = True, hub: bool = True, lock: bool = True) -> None:
    """Raise RunConflict naming every conflict (at the start of a run, before any stage)."""
    found = conflicts(config, root, line, pushes=pushes, secrets=secrets, hub=hub, lock=lock)
    if found:
        raise RunConflict("this run would fail after training, so nothing was run:\n- " + "\n- ".join(found))


def describe_failure(summary: dict[str, Any] | None, error: BaseException) -> dict[str, Any]:
    """What became of a failed pipeline run, from its run summary: whether the model was trained (train Completed
    or Cached) and promoted, and why it was not released."""
    stages = {s["name"]: s for s in (summary or {}).get("stages", [])}
    trained = stages.get("train", {}).get("state") in ("Completed", "Cached")
    gate = (summary or {}).get("gate") or {}
    why = f"{type(error).__name__}: {error}".splitlines()[0][:500]
    if not trained:
        outcome = f"not trained: {why}"
    elif gate and not gate.get("promoted", True):
        outcome = f"trained, not promoted: {gate.get('reason', '')}"
    else:
        outcome = f"trained{', promoted' if gate else ''}, not released: {why}"
    return {"trained": trained, "released": False, "outcome": outcome, "error": why}
