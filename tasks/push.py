"""push: the final model + tokenizer + a model card under `artifacts/models/<name>/`, and, when `push.repo_id`
is set, an upload to the Hugging Face Hub (or whatever `HF_ENDPOINT` points at).

The token comes from a Prefect Secret block (`push.token_secret`) or `HF_TOKEN`; it is never read from config,
never logged and never written anywhere. A failed upload is retried with backoff, then fails the stage with a
clear message; the local save stays.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from tasks.cache import Fingerprint, StageOutput, current_key, publish, stage_task
from tasks.config import PushConfig
from tasks.report import markdown_artifact, run_logger

CARD = "README.md"


class PushFailed(RuntimeError):
    pass


def default_name(base_model_id: str, key: str) -> str:
    base = base_model_id.rstrip("/").split("/")[-1] or "model"
    return f"{base}-cpt-{key.split('-')[-1][:8]}"


def model_card(base_model_id: str, data: dict[str, Any], config: dict[str, Any], eval_md: str) -> str:
    counts = "\n".join(f"| {k} | {v} |" for k, v in data["counts"].items())
    return f"""---
base_model: {base_model_id}
library_name: transformers
tags: [continued-pretraining, cpt]
---

# {base_model_id}, continued pretraining

Continued pretraining of `{base_model_id}` on a domain corpus, made with cpt.

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


def upload(folder: Path, cfg: PushConfig, token: str | None, log, backoff_seconds: float = 2.0) -> dict[str, Any]:
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
                                     commit_message="Continued pretraining with cpt")
            return {"repo_id": cfg.repo_id, "revision": cfg.revision or "main",
                    "url": f"{api.endpoint}/{cfg.repo_id}" + (f"/tree/{cfg.revision}" if cfg.revision else ""),
                    "commit": getattr(info, "oid", None), "attempts": attempt + 1}
        except Exception as e:
            last = e
            log.warning("push: upload attempt %d/%d failed (%s)", attempt + 1, cfg.retries + 1, _failure(e))
            if attempt < cfg.retries:
                time.sleep(backoff_seconds * 2**attempt)
    raise PushFailed(f"push: uploading to {cfg.repo_id} failed after {cfg.retries + 1} attempts "
                     f"({_failure(last)}); the model is saved locally")


@stage_task("push", modules=["tasks.config", "tasks.report"], libraries=["huggingface_hub"])
def push(push: PushConfig, base_model_id: str, trained: StageOutput, evaluation: StageOutput,
         docs: StageOutput, corpus: Fingerprint, config: dict[str, Any], artifacts: str) -> StageOutput:
    key = current_key("push", {"push": push, "base_model_id": base_model_id, "trained": trained,
                               "evaluation": evaluation, "docs": docs, "corpus": corpus, "config": config})
    log = run_logger()
    name = push.name or default_name(base_model_id, key)
    dest = Path(artifacts) / "models" / name

    def build(tmp: Path):
        eval_md = (evaluation.dir(artifacts) / "eval.md").read_text(encoding="utf-8")
        card = model_card(base_model_id, {"fingerprint": corpus.digest, "counts": docs.counts}, config, eval_md)
        save_release(trained.dir(artifacts) / "model", dest, card)
        result = {"local_path": str(dest), "hub": None}
        if push.repo_id:
            backoff = float(os.environ.get("CPT_PUSH_BACKOFF_SECONDS", "2"))
            result["hub"] = upload(dest, push, hub_token(push.token_secret), log, backoff)
        (tmp / "push.json").write_text(json.dumps(result, indent=2))
        return {"local_path": str(dest), "hub_url": (result["hub"] or {}).get("url")}, {}

    out = publish(artifacts, "push", key, build)
    c = out.counts
    log.info("push: model saved to %s%s", c["local_path"], f", uploaded to {c['hub_url']}" if c["hub_url"] else "")
    return out


def show(out: StageOutput, artifacts: str) -> None:
    c = out.counts
    where = f"- local: `{c['local_path']}`\n" + (f"- hub: [{c['hub_url']}]({c['hub_url']})\n" if c["hub_url"] else "")
    markdown_artifact(f"# Model\n\n{where}", "model-location", "Where the trained model went")
