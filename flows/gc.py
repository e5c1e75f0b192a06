"""The scheduled garbage collection of an artifacts root (prefect.yaml's `cache-gc` deployment; `cpt cache gc`
runs the same without Prefect). Retention settings come from a config file's `retention` section, `--set`-style
overrides, or a `retention` parameter (docs/retention.md)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.core.config.retention import RetentionConfig
from tasks.core.report import markdown_artifact, markdown_table, run_logger
from tasks.core.root import open_root


@flow(name="cache-gc", log_prints=True)
def cache_gc(config_file: str | None = None, overrides: list[str] | None = None,
             retention: RetentionConfig | None = None, artifacts: str | None = None,
             dry_run: bool = False) -> dict[str, Any]:
    """Delete what `retention` does not keep on the root `artifacts` (and prune this worker's mirror of an
    object-store root to $CPT_SCRATCH_MAX_BYTES); returns the report: what went, why, bytes before and after."""
    from flows.cache_cli import retention_settings
    from tasks.line.retention import collect, human

    policy = retention or retention_settings(config_file, overrides or [])
    root = open_root(artifacts)
    report = collect(root, policy, dry_run=dry_run, log=run_logger())
    rows = [{"deleted": r["rel"], "bytes": r["bytes"], "why": r["why"]} for r in report["deleted"]][:200]
    markdown_artifact(f"# Garbage collection of {root.spec}\n\n{human(report['bytes_before'])} before, "
                      f"{human(report['bytes_after'])} after; kept by retention {human(report['live_bytes'])}"
                      + (f"\n\n**{report['over_budget']}**" if report.get("over_budget") else "")
                      + (f"\n\n{markdown_table(rows)}\n" if rows else "\n\nNothing to delete.\n"),
                      "cache-gc", "What garbage collection deleted, and why")
    return report
