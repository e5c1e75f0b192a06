"""push: the final model + tokenizer + a model card under `artifacts/models/<name>/`, and, when `push.repo_id`
is set, an upload to the Hugging Face Hub (or whatever `HF_ENDPOINT` points at).

The token comes from a Prefect Secret block (`push.token_secret`) or `HF_TOKEN`; it is never read from config,
never logged and never written anywhere. A failed upload is retried with backoff, then fails the stage with a
clear message; the local save stays.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import model_validator

from tasks.core.config.model import PushConfig
from tasks.core.config.tree import CptConfig
from tasks.core.manifest import Fingerprint, NoMeta, StageOutput, safe_relpath
from tasks.core.report import markdown_artifact, run_logger
from tasks.core.root import ArtifactsRoot
from tasks.core.stage import Build, stage
from tasks.ml.modeling import CARD, model_digest

if TYPE_CHECKING:
    from tasks.evaluate import Evaluation
    from tasks.gate import Decision
    from tasks.load import Docs
    from tasks.train import Trained


class PushFailed(RuntimeError):
    pass


class HeadMoved(PushFailed):
    """The Hub branch is no longer at the commit the gate compared with: another push happened since."""


def default_name(base_model_id: str, key: str) -> str:
    base = base_model_id.rstrip("/").split("/")[-1] or "model"
    return f"{base}-cpt-{key.split('-')[-1][:8]}"


def _short(d: str | None, n: int = 16) -> str:
    return (d or "")[:n]


PARENT_KINDS = {"promoted": "last promoted model", "stable": "the line's stable model"}


def lineage_markdown(lineage: dict[str, Any]) -> str:
    """The card's lineage section: where these weights come from and what they were trained on."""
    base, parent = lineage["base"], lineage["parent"]
    rows = [
        ("base model", f"`{base['id']}` (digest `{_short(base['digest'], 32)}`)"),
        ("parent model", f"the base model" if parent["kind"] == "base" else
         f"{PARENT_KINDS.get(parent['kind'], parent['kind'])} `{_short(parent['digest'], 32)}` (run "
         f"{parent.get('flow_run') or '?'})"),
        ("corpus fingerprint", f"`{lineage['corpus']}`"),
    ]
    stable = lineage.get("stable")
    if stable:  # train.schedule stable_anneal: which stable checkpoint this release came from, and how
        averaged = stable.get("averaged") or []
        how = ("a decay branch from it" if stable["anneal"] == "decay" else
               f"the average of {len(averaged)} stable models of the line, it first: "
               + ", ".join(f"`{_short(d, 32)}`" for d in averaged))
        rows.append(("stable checkpoint", f"`{_short(stable['digest'], 32)}` (the line's parent, not released); this "
                                          f"release is {how}"))
    for d in lineage.get("drops", []):
        rows.append(("drop", f"`{d['path']}` (fingerprint `{_short(d['fingerprint'], 32)}`)"))
    for name, src in (lineage.get("sources") or {}).items():
        share = f"; share trained {src['share']:.4f} (asked {src['asked']:.4f})" if "share" in src else ""
        rows.append((f"source {name}", f"fingerprint `{_short(src['fingerprint'], 32)}`{share}"))
    replay = lineage.get("replay") or {}
    if not lineage.get("sources"):  # with `sources`, replay is one of them
        rows.append(("replay fraction", f"{replay.get('fraction', 0)}" + (
            f" of training tokens from `{', '.join(replay['paths'])}` (fingerprint `{replay['fingerprint']}`; "
            f"share trained: {replay.get('share', 0):.4f})" if replay.get("fraction") else " (no replay)")))
    gate = lineage.get("gate")
    rows.append(("gate decision", "disabled (gate.enabled: false)" if gate is None else
                 f"{'promoted' if gate['promoted'] else 'refused'} against the {gate['reference']} model: "
                 f"{gate['reason']}"))
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def evaluation_markdown(lineage: dict[str, Any]) -> str:
    """Perplexity of the base model, the gate's reference and this model, on the same validation chunks."""
    ev = lineage.get("evaluation") or {}
    rows = [f"| {name} | {ev.get(f'{name}_base', '')} | {ev.get(f'{name}_reference', '')} | "
            f"{ev.get(f'{name}_new', '')} |" for name in ("validation", "general") if ev.get(f"{name}_new") is not None]
    rows += [f"| source {name} | {v.get('base', '')} | {v.get('reference', '')} | {v.get('new', '')} |"
             for name, v in (ev.get("sources") or {}).items()]
    md = "| perplexity | base model | gate reference | this model |\n|---|---|---|---|\n" + "\n".join(rows)
    if ev.get("tasks"):
        examples = ev.get("task_examples") or {}

        def cell(x):
            return "" if x is None else f"{x:.4f}"

        md += ("\n\n| task / metric (lm-evaluation-harness) | examples | base model | gate reference | this model |"
               "\n|---|---|---|---|---|\n" + "\n".join(
                   f"| {name} | {examples.get(name.split('/')[0], '')} | {cell(v['base'])} | {cell(v['reference'])} "
                   f"| {cell(v['new'])} |" for name, v in ev["tasks"].items()))
    return md


RELEASE_KINDS = {
    "full": "the model: every weight trained (train.method full).",
    "merged": "the merged model: the base model with the trained LoRA adapter folded into its weights "
              "(W + B·A·alpha/r, in model.dtype), loadable with transformers alone. This is the model evaluate and "
              "the gate measured.",
    "adapter": "the LoRA adapter only (adapter_config.json, adapter_model.safetensors; push.adapter_only): load the "
               "base model, then `peft.PeftModel.from_pretrained(base, <this folder>)`. evaluate and the gate "
               "measured the merged model (base + this adapter).",
}


def release_kind(config: dict[str, Any]) -> str:
    method = config.get("train", {}).get("method", "full")
    if method == "full":
        return "full"
    return "adapter" if config.get("push", {}).get("adapter_only") else "merged"


def model_card(base_model_id: str, data: dict[str, Any], config: dict[str, Any], eval_md: str,
               lineage: dict[str, Any] | None = None) -> str:
    counts = "\n".join(f"| {k} | {v} |" for k, v in data["counts"].items())
    kind = release_kind(config)
    lora = config.get("train", {}).get("lora", {})
    method = config.get("train", {}).get("method", "full")
    release_md = f"""
## What this folder holds

{RELEASE_KINDS[kind]}
""" + (f"""
Trained with {method} (r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, target modules
{', '.join(lora.get('target_modules', []))}; embed_tokens and lm_head trained in full:
{'yes' if lora.get('train_embeddings') else 'no'}).
""" if kind != "full" else "")
    lineage_md = f"""
## Lineage

{lineage_markdown(lineage)}

## Evaluation

{evaluation_markdown(lineage)}
""" if lineage else ""
    return f"""---
base_model: {base_model_id}
library_name: {'peft' if kind == 'adapter' else 'transformers'}
tags: [continued-pretraining, cpt{', lora' if kind != 'full' else ''}]
---

# {base_model_id}, continued pretraining

Continued pretraining of `{base_model_id}` on a domain corpus, made with cpt.
{release_md}{lineage_md}
## Data

Corpus fingerprint: `{data['fingerprint']}`

| count | value |
|---|---|
{counts}

{eval_md}

## Configuration

```yaml
{yaml.safe_dump(config, sort_keys=False, allow_unicode=True).strip()}
```
"""


def save_release(model_dir: Path, dest: Path, card: str) -> Path:
    """Copy model + tokenizer with the card into `dest`, replacing an older release atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(model_dir, tmp)
        (tmp / CARD).write_text(card, encoding="utf-8")
        if dest.exists():
            old = dest.parent / f".tmp-{dest.name}-old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja")


def release_source(trained: Trained, root: ArtifactsRoot, adapter_only: bool, base_model_id: str, tmp: Path) -> Path:
    """The folder a release copies: the (merged) model, or with push.adapter_only the adapter and the tokenizer,
    its adapter_config.json naming the base by `base_model_id` (the hub id users load) instead of the folder it
    was trained from. Both are checked against the train entry's digests first."""
    if not adapter_only:
        return trained.verified_model_dir(root)
    adapter = trained.verified_adapter_dir(root)
    model = trained.model_dir(root)
    staged = tmp / "adapter"
    shutil.copytree(adapter, staged)
    for name in TOKENIZER_FILES:
        if (model / name).is_file():
            shutil.copy2(model / name, staged / name)
    config = json.loads((staged / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_model_id
    (staged / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    for readme in ("README.md",):  # peft writes a placeholder card; the release's card replaces it
        (staged / readme).unlink(missing_ok=True)
    return staged


def hub_token(secret_name: str | None) -> str | None:
    if secret_name:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(secret_name).get()
        except Exception as e:
            raise PushFailed(f"push.token_secret: cannot load Prefect Secret block {secret_name!r}: "
                             f"{type(e).__name__}") from None
    return os.environ.get("HF_TOKEN") or None


def _failure(e: BaseException) -> str:
    """The type and HTTP status of an upload error, never its message: some versions echo request headers."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    return type(e).__name__ + (f", HTTP {status}" if status else "")


def commit_message(lineage: dict[str, Any] | None) -> str:
    """Each push is a new Hub revision whose message says what was promoted and why."""
    if not lineage:
        return "Continued pretraining with cpt"
    gate = lineage.get("gate")
    parent = lineage["parent"]
    what = f"model {_short(lineage.get('model_digest'), 12)} (parent: " + (
        "base model" if parent["kind"] == "base" else f"promoted {_short(parent['digest'], 12)}") + ")"
    if gate is None:
        return f"cpt: push {what}; promotion gate disabled"
    return f"cpt: promote {what}: {gate['reason']}"[:400]


def hub_head(cfg: PushConfig, token: str | None = None) -> str | None:
    """The commit `push.revision` (main) of `push.repo_id` points at now; None for a repo or branch that does not
    exist yet. The head a push is made on: read before the gate, named as the commit's parent at push."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token or hub_token(cfg.token_secret))
    try:
        return api.repo_info(cfg.repo_id, revision=cfg.revision or "main", repo_type="model").sha
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None
    except Exception as e:
        raise PushFailed(f"push: cannot read the head of {cfg.repo_id} ({_failure(e)})") from None


def upload(folder: Path, cfg: PushConfig, token: str | None, log, backoff_seconds: float = 2.0,
           message: str = "Continued pretraining with cpt", parent: str | None = None) -> dict[str, Any]:
    """`folder` as a new commit on `push.revision` of `push.repo_id`. With `parent` (the head the gate compared
    with), a compare-and-swap: the Hub refuses the commit if the branch has moved since (HeadMoved, not
    retried)."""
    from huggingface_hub import HfApi

    if not token:
        raise PushFailed("push.repo_id is set but no token: set HF_TOKEN or push.token_secret (a Prefect Secret)")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token)
    last: Exception | None = None
    for attempt in range(cfg.retries + 1):
        try:
            api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True, repo_type="model")
            if cfg.revision:
                api.create_branch(cfg.repo_id, branch=cfg.revision, exist_ok=True)
            info = api.upload_folder(repo_id=cfg.repo_id, folder_path=str(folder), revision=cfg.revision,
                                     commit_message=message, parent_commit=parent)
            return {"repo_id": cfg.repo_id, "revision": cfg.revision or "main",
                    "url": f"{api.endpoint}/{cfg.repo_id}" + (f"/tree/{cfg.revision}" if cfg.revision else ""),
                    "commit": getattr(info, "oid", None), "attempts": attempt + 1, "message": message}
        except Exception as e:
            if getattr(getattr(e, "response", None), "status_code", None) == 412:
                raise HeadMoved(f"push: {cfg.repo_id}@{cfg.revision or 'main'} moved since the gate compared with "
                                f"its head {(parent or '')[:12]}: not pushed (another push happened meanwhile); the "
                                "next run gates against what is there") from None
            last = e
            log.warning("push: upload attempt %d/%d failed (%s)", attempt + 1, cfg.retries + 1, _failure(e))
            if attempt < cfg.retries:
                time.sleep(backoff_seconds * 2**attempt)
    raise PushFailed(f"push: uploading to {cfg.repo_id} failed after {cfg.retries + 1} attempts "
                     f"({_failure(last)}); the model is saved locally")


def release_rel(value: Any) -> str:
    """`models/<name>` (a release folder's place under the root, one folder name: `name_problem`'s rule), else
    ValueError: a push entry's counts come from the store."""
    from tasks.core.config.base import name_problem

    parts = value.split("/") if isinstance(value, str) else []
    if len(parts) != 2 or parts[0] != "models" or name_problem(parts[1]):
        raise ValueError(f"{value!r} is not a release folder (models/<name>)")
    return value


RELEASE_CARD = "card.md"  # the release's card, kept in the push entry so a lost release can be re-made


class Release(StageOutput):
    """push's output: `push.json` (where the release went) and the card it was saved with; the release itself
    is `artifacts/models/<name>/` (outside the cache: it is the folder users point at)."""

    meta: NoMeta = NoMeta()

    @model_validator(mode="after")
    def _release_is_a_release_folder(self):
        if "release" in self.counts:
            release_rel(self.counts["release"])
        return self

    def card(self, root: ArtifactsRoot) -> str:
        return (self.dir(root) / RELEASE_CARD).read_text(encoding="utf-8")

    def release_dir(self, root: ArtifactsRoot) -> Path:
        """The release folder on this host: computed from the release's name under the root, never taken from
        the path another host recorded (a push entry travels through the store)."""
        return root.path(release_rel(self.counts["release"]))

    def summary(self, root: ArtifactsRoot) -> list[tuple[int, str]]:
        c = self.counts
        return [(logging.INFO, f"model saved to {c['local_path']}"
                               + (f", uploaded to {c['hub_url']}" if c["hub_url"] else ""))]

    def show(self, root: ArtifactsRoot) -> None:
        show(self, root)  # the module's `show` below: its tables and plots


@stage("push", version=2, output=Release, libraries=["huggingface_hub"],
       key_exclude={"base_model_id", "lineage", "hub_parent"})
def push(build: Build, push: PushConfig, base_model_id: str, trained: Trained, evaluation: Evaluation, docs: Docs,
         corpus: Fingerprint, config: CptConfig, decision: Decision | None = None,
         lineage: dict[str, Any] | None = None, hub_parent: str | None = None):
    """Save the promoted model as the release folder (a verified copy: see `ensure_release`), with a card that
    records its lineage, and upload it as a new Hub revision on `hub_parent`, the head the gate compared with (a
    compare-and-swap: HeadMoved if the branch moved since). `base_model_id` (a path or hub id: the model is
    keyed by digest), `lineage` (drawn from push's keyed inputs, plus paths) and `hub_parent` (where the Hub
    stood) are not part of the key."""
    name = push.name or default_name(base_model_id, build.key)
    release = f"models/{name}"
    dest = build.root.path(release)
    card = model_card(base_model_id, {"fingerprint": corpus.digest, "counts": docs.counts},
                      config.model_dump(mode="json"), evaluation.markdown(build.root), lineage)
    digest = trained.model_digest
    with tempfile.TemporaryDirectory(prefix="cpt-release-") as staging:
        source = release_source(trained, build.root, push.adapter_only, base_model_id, Path(staging))
        release_digest = model_digest(source) if push.adapter_only else digest
        save_release(source, dest, card)
    (build.tmp / RELEASE_CARD).write_text(card, encoding="utf-8")
    result = {"local_path": str(dest), "model_digest": digest, "hub": None}
    if push.repo_id:
        backoff = float(os.environ.get("CPT_PUSH_BACKOFF_SECONDS", "2"))
        result["hub"] = upload(dest, push, hub_token(push.token_secret), build.log, backoff, commit_message(lineage),
                               parent=hub_parent)
    (build.tmp / "push.json").write_text(json.dumps(result, indent=2))
    hub = result["hub"] or {}
    return {"local_path": str(dest), "release": release, "hub_url": hub.get("url"), "hub_commit": hub.get("commit"),
            "hub_repo": hub.get("repo_id"), "hub_revision": hub.get("revision"), "model_digest": digest,
            "release_kind": release_kind(config.model_dump(mode="json")), "release_digest": release_digest,
            "release_base": base_model_id}, {}


def ensure_release(out: Release, trained: Trained, root: ArtifactsRoot, digest=None) -> str | None:
    """Every run, cached or not: the release folder must hold the pushed model's exact files and card. A missing
    or altered release is re-made from the train entry; returns why it was, or None when it was intact."""
    dest = out.release_dir(root)
    card = out.card(root)
    kwargs = {"digest": digest} if digest else {}
    adapter_only = out.counts.get("release_kind") == "adapter"
    if not dest.is_dir():
        why = "missing"
    elif model_digest(dest, **kwargs) != out.counts.get("release_digest", out.counts["model_digest"]):
        why = "holding other model files"
    elif not (dest / CARD).is_file() or (dest / CARD).read_text(encoding="utf-8") != card:
        why = "holding another card"
    else:
        return None
    with tempfile.TemporaryDirectory(prefix="cpt-release-") as staging:
        source = (release_source(trained, root, True, out.counts["release_base"], Path(staging)) if adapter_only
                  else trained.model_dir(root))
        save_release(source, dest, card)
    run_logger().warning("push: release folder %s was %s; re-made it from the promoted model", dest, why)
    return why


def show(out: Release, root: ArtifactsRoot) -> None:
    c = out.counts
    where = f"- local: `{c['local_path']}`\n" + (f"- hub: [{c['hub_url']}]({c['hub_url']})\n" if c["hub_url"] else "")
    markdown_artifact(f"# Model\n\n{where}", "model-location", "Where the trained model went")
