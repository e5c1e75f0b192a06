"""`cpt cache du | gc | pin`: what the artifacts root holds, garbage collection, and pinned runs
(tasks/line/retention.py decides; docs/retention.md). No Prefect, torch or transformers imported."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parsers(cache) -> None:
    """`cpt cache`'s subcommands, on its argparse parser."""
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    verify = cache_sub.add_parser("verify", help="check every entry: file sizes and referenced entries (cheap), or "
                                                 "every byte against its digest (--full)")
    verify.add_argument("--full", action="store_true", help="also compare every file with its recorded digest")
    verify.add_argument("--discard", action="store_true", help="remove damaged entries: the next run rebuilds them")
    verify.add_argument("--artifacts", metavar="DIR")
    du = cache_sub.add_parser("du", help="bytes on the root by stage, by line (what each line keeps), by kind, and "
                                         "this host's mirror of an object-store root")
    du.add_argument("--json", action="store_true")
    du.add_argument("--artifacts", metavar="DIR")
    gc = cache_sub.add_parser("gc", help="delete what retention does not keep (docs/retention.md): least recently "
                                         "used first down to retention.max_bytes, else what is unused for "
                                         "retention.keep_days; says what goes, why, and how many bytes")
    gc.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    gc.add_argument("--config", "-c", metavar="FILE", help="a config whose `retention` section to apply")
    gc.add_argument("--set", dest="overrides", action="append", default=[], metavar="retention.FIELD=VALUE",
                    help="override a retention setting, e.g. --set retention.max_bytes=200GB")
    gc.add_argument("--json", action="store_true", help="print the report as JSON")
    gc.add_argument("--artifacts", metavar="DIR")
    pin = cache_sub.add_parser("pin", help="keep a run's entries whatever the budget (or --remove the pin; --list)")
    pin.add_argument("run", nargs="?", help="a run's name (as `cpt run` prints it)")
    pin.add_argument("--note", default="", help="why it is pinned")
    pin.add_argument("--remove", action="store_true", help="unpin it")
    pin.add_argument("--list", action="store_true", help="list the pinned runs")
    pin.add_argument("--artifacts", metavar="DIR")


def main(root, args) -> int:
    if args.cache_command == "du":
        return cache_du(root, args.json)
    if args.cache_command == "gc":
        return cache_gc(root, retention_settings(args.config, args.overrides), args.dry_run, args.json)
    return cache_pin(root, args)


def retention_settings(config: str | None, overrides: list[str]):
    """The `retention` section of a config file (nothing else of it is needed) with `--set retention.*` on top."""
    import yaml

    from tasks.core.config.base import ConfigError
    from tasks.core.config.retention import RetentionConfig
    from tasks.core.config.tree import apply_overrides, format_validation_error

    data: dict = {}
    if config:
        try:
            loaded = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{config}: {e}") from None
        data = {"retention": (loaded.get("retention") or {}) if isinstance(loaded, dict) else {}}
    bad = [o for o in overrides if not o.startswith("retention.")]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: cpt cache gc takes retention.* settings only")
    data = apply_overrides(data, overrides)
    try:
        return RetentionConfig.model_validate(data.get("retention") or {})
    except Exception as e:
        from pydantic import ValidationError

        if isinstance(e, ValidationError):
            raise ConfigError(format_validation_error(e, "retention")) from None
        raise


def cache_du(root, as_json: bool) -> int:
    import json

    from tasks.line.retention import human, usage

    u = usage(root)
    if as_json:
        print(json.dumps(u, indent=2))
        return 0
    print(f"{u['root']}: {human(u['bytes'])}; kept by retention {human(u['live_bytes'])}, reclaimable "
          f"{human(u['reclaimable_bytes'])}")
    print("by stage (entries, partial copies, work folders):")
    for stage, row in sorted(u["by_stage"].items(), key=lambda kv: -kv[1]["bytes"]):
        print(f"  {stage:<20} {human(row['bytes']):>10}  {row['entries']} items")
    if u["by_line"]:
        print("by line (what its releases and its next run keep; an entry two lines share counts for each):")
        for owner, row in sorted(u["by_line"].items()):
            print(f"  {owner:<20} " + ", ".join(f"{k} {human(v)}" for k, v in sorted(row.items())))
    print("by kind: " + ", ".join(f"{k} {human(v)}" for k, v in sorted(u["by_kind"].items(), key=lambda kv: -kv[1])))
    if "mirror" in u:
        m = u["mirror"]
        print(f"this host's mirror {m['path']}: {human(m['bytes'])}"
              + (f" of CPT_SCRATCH_MAX_BYTES={human(m['budget'])}" if m["budget"] is not None else
                 " (CPT_SCRATCH_MAX_BYTES unset: no budget)"))
    return 0


def cache_gc(root, policy, dry_run: bool, as_json: bool) -> int:
    import json
    import logging

    from tasks.line.retention import collect, human

    log = logging.getLogger("cpt.gc")
    report = collect(root, policy, dry_run=dry_run)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    verb = "would delete" if dry_run else "deleted"
    for row in report["deleted"]:
        print(f"{verb}: {row['rel']} ({human(row['bytes'])}): {row['why']}")
    for row in report["skipped"]:
        print(f"skipped: {row['rel']}: {row['why']}")
    for row in (report.get("mirror") or {}).get("deleted", []):
        print(f"{verb} (this host's copy): {row['rel']} ({human(row['bytes'])}): {row['why']}")
    print(f"{root.spec}: {human(report['bytes_before'])} before, {human(report['bytes_after'])} after "
          f"({verb} {len(report['deleted'])} items); kept by retention {human(report['live_bytes'])}")
    if report.get("over_budget"):
        print(f"warning: {report['over_budget']}")
        log.debug("over budget")
    return 0


def cache_pin(root, args) -> int:
    from tasks.line.retention import pin, read_pins

    if args.list or not args.run:
        pins = read_pins(root)
        for run, info in pins.runs.items():
            print(f"{run}  pinned {info.get('at', '')}" + (f"  {info['note']}" if info.get("note") else ""))
        if not pins.runs:
            print("no pinned runs")
        return 0
    if not args.remove and not root.fetch_state(f"runs/{args.run}/summary.json").is_file():
        print(f"cpt: cache pin: no run {args.run!r} under {root.spec} (runs/<name>/summary.json)", file=sys.stderr)
        return 2
    try:
        pin(root, args.run, args.note, remove=args.remove)
    except (KeyError, ValueError) as e:
        print(f"cpt: cache pin: {e.args[0]}", file=sys.stderr)
        return 2
    print(f"{args.run}: " + ("unpinned" if args.remove else "pinned: its entries are kept whatever the budget"))
    return 0
