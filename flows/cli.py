"""`cpt`: run the flow, check a config, build the tiny local model.

Prefect, torch and transformers are imported only inside the commands that need them, so `cpt --help` and
`cpt validate` answer at once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from flows.stages import PIPELINE
from flows import cache_cli  # argparse only at import: no Prefect, no torch

from flows.announce import DROP_EVENT  # noqa: E402  (no Prefect import: a constant)


def _prefect_env() -> None:
    # Offline-friendly defaults; anything the user exported wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


def _warm_arrow() -> None:
    """Start, in the background, what pyarrow does once per process on the first array it builds: it imports
    pandas (0.4-1.3 s measured here). Begun while Prefect's server starts or is reached, it is done by the time
    the first stage writes Arrow, instead of being paid inside it (a drop's gate or load); the first array
    built before then waits for the same import rather than doing it twice."""
    import threading

    def warm() -> None:
        import pyarrow as pa

        pa.array([0])

    threading.Thread(target=warm, name="arrow-warm", daemon=True).start()


def _run_server():
    """The Prefect server this run uses (flows/local_server.py: one already running, else one started now, kept
    for later runs or temporary, while the run imports and reads its inputs), said on stderr."""
    from flows.local_server import run_server

    try:
        server = run_server()
    except ValueError as e:  # CPT_SERVER, CPT_SERVER_IDLE_MINUTES or CPT_SERVER_PORT
        raise SystemExit(f"cpt: {e}") from None
    print(server.describe(), file=sys.stderr)
    return server


def _flow_settings(server):
    """Prefect settings for the flow call: no run heartbeats to a temporary server or one cpt keeps (RunServer.
    heartbeats says why), unless the user set Prefect's `flows.heartbeat_frequency` (environment or profile);
    Prefect's defaults otherwise."""
    import contextlib

    from prefect.settings import get_current_settings, temporary_settings

    if server.heartbeats() or "heartbeat_frequency" in get_current_settings().flows.model_fields_set:
        return contextlib.nullcontext()
    return temporary_settings(updates={"flows.heartbeat_frequency": None})


def cmd_server(args) -> int:
    from flows.local_server import server_command

    return server_command(args)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config value; VALUE is YAML, e.g. --set 'corpus.paths=[a.jsonl, b/]'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpt", description="Continued pretraining as a cached Prefect flow.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the flow (stages whose inputs did not change come from cache)")
    _config_args(run)
    run.add_argument("--until", choices=PIPELINE, help="stop after this stage (e.g. chunk: preprocess only)")
    run.add_argument("--summary", metavar="PATH", help="also write the run summary JSON here")
    run.add_argument("--artifacts", metavar="DIR", help="artifacts root (default: $CPT_ARTIFACTS or ./artifacts)")

    re = sub.add_parser("retrain", help="run the pipeline only if the corpus changed since the last training")
    _config_args(re)
    re.add_argument("--drop", metavar="PATH", help="a landed drop folder: gated, then registered to the line")
    re.add_argument("--line", default="default", help="the training line (its drops and last training)")
    re.add_argument("--settle-seconds", type=float, default=60.0,
                    help="files modified more recently than this are taken as still being written")
    re.add_argument("--force", action="store_true", help="train even if the corpus is unchanged")
    re.add_argument("--summary", metavar="PATH",
                    help="write JSON: trained, reason, line, drops and the pipeline's run summary")
    re.add_argument("--artifacts", metavar="DIR")

    drops = sub.add_parser("drops", help="list a training line's drops, or retire one")
    drops.add_argument("--line", default="default")
    drops.add_argument("--json", action="store_true", help="print JSON (as in the retrain summary)")
    drops.add_argument("--remove", metavar="PATH", help="retire this drop: the next run of the line trains without it")
    drops.add_argument("--artifacts", metavar="DIR")

    promos = sub.add_parser("promotions", help="the models the promotion gate let through on a line or push.name")
    which = promos.add_mutually_exclusive_group(required=True)
    which.add_argument("--line", help="a training line (cpt retrain --line)")
    which.add_argument("--name", help="a push.name (cpt run)")
    which.add_argument("--repo", help="a push.repo_id pushed without a line or push.name (cpt run)")
    promos.add_argument("--json", action="store_true", help="print the promotions file's JSON")
    promos.add_argument("--artifacts", metavar="DIR")

    cache_cli.add_parsers(sub.add_parser("cache", help="check, measure and collect the stage cache"))

    emit = sub.add_parser("emit-drop", help=f"tell Prefect a corpus drop landed (event {DROP_EVENT!r})")
    emit.add_argument("path", type=Path, help="the drop folder, complete")
    emit.add_argument("--event", default=DROP_EVENT)
    emit.add_argument("--attempts", type=int, default=5, help="send it this many times at most until the server "
                      "confirms it has it (the same event: the server keeps one); then fail")
    emit.add_argument("--confirm-seconds", type=float, default=20.0,
                      help="how long to wait for the server to confirm each attempt")

    srv = sub.add_parser("server", help="the local Prefect server (with its UI) cpt keeps in the background for "
                         "`cpt run`: start, stop, status (a run with none starts one that stops itself when idle)")
    srv_sub = srv.add_subparsers(dest="server_command", required=True)
    srv_start = srv_sub.add_parser("start", help="start it, or keep the one a run started (127.0.0.1; it runs until "
                                       "`cpt server stop`)")
    srv_start.add_argument("--port", type=int, default=4200, help="its port (0: any free one)")
    srv_sub.add_parser("stop", help="stop the server cpt keeps (started by `cpt server start` or a run)")
    srv_sub.add_parser("status", help="whether it runs, and where its UI is")

    serve = sub.add_parser("serve", help="serve the retrain flow in this process: nightly schedule + drop events")
    _config_args(serve)
    serve.add_argument("--name", default="cpt-retrain")
    serve.add_argument("--cron", default="0 2 * * *", help="schedule (default nightly at 02:00); '' for none")
    serve.add_argument("--line", default="default")
    serve.add_argument("--artifacts", metavar="DIR")

    export = sub.add_parser("export-chunks", help="write a run's training chunks as a standalone datasets folder "
                            "(input_ids, attention_mask, labels) for training elsewhere")
    export.add_argument("out_dir", type=Path, help="the folder to write (datasets.load_from_disk reads it)")
    source = export.add_argument_group("which chunks (one of)")
    source.add_argument("--run", metavar="RUN", help="a run's name (as `cpt run` prints it) or its summary.json")
    source.add_argument("--entry", metavar="PATH", help="a chunk or mix cache entry: its folder (a run summary's "
                        "`output`), or cache/<stage>/<key> under --artifacts")
    _config_args(source)  # the same as `cpt run`: runs the data stages (cached ones are reused) and exports them
    export.add_argument("--stage", choices=("chunk", "mix"), help="the run's chunk output (no replay) or mix's "
                        "(default: what train reads: mix when the run has replay, else chunk)")
    export.add_argument("--force", action="store_true", help="replace a non-empty out_dir")
    export.add_argument("--artifacts", metavar="DIR")

    init = sub.add_parser("init", help="write a starter project (configs/ and samples/) into DIR, so that "
                          "`cpt init-tiny-model artifacts/models/tiny-ko && cpt run --config configs/demo.yaml` "
                          "runs there")
    init.add_argument("dir", type=Path, nargs="?", default=Path("."), help="the folder (default: here)")
    init.add_argument("--force", action="store_true", help="overwrite files that differ from the starter's")

    val = sub.add_parser("validate", help="check a config and print it resolved, with every default, and what a "
                         "run of it would find only after training (another lineage's release, no Hub token)")
    _config_args(val)
    val.add_argument("--line", default=None, help="check it as a run of this training line (cpt retrain --line)")
    val.add_argument("--artifacts", metavar="DIR", help="the artifacts root a run would use")

    tiny = sub.add_parser("init-tiny-model", help="build a tiny local tokenizer + model (offline demo and tests)")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--corpus", type=Path, default=Path("samples/medical_ko.jsonl"),
                      help="JSONL corpus (content field) to train the tokenizer on")
    # Sized for the demo on 2 CPU cores: a vocabulary small enough that its tokens recur in a 180 kB corpus (8000
    # made most of them words seen two or three times: validation loss stopped falling at step 50), and enough
    # depth to learn Korean phrasing from it in 200 steps.
    tiny.add_argument("--vocab-size", type=int, default=2000)
    tiny.add_argument("--byte-level", action="store_true", help="merges from the 256 bytes (any text) instead of "
                      "the corpus's characters (each syllable a token: a small model never writes a broken one)")
    tiny.add_argument("--hidden-size", type=int, default=128)
    tiny.add_argument("--layers", type=int, default=4)
    tiny.add_argument("--force", action="store_true", help="rebuild even if out_dir already holds a model")

    cloze = sub.add_parser("make-cloze-task", help="write a local multiple-choice lm-eval task (YAML + JSONL) from "
                           "a JSONL corpus: a document's first sentence, its own next sentence among 3 others")
    cloze.add_argument("out_dir", type=Path)
    cloze.add_argument("--corpus", type=Path, default=Path("samples/medical_ko.jsonl"))
    cloze.add_argument("--field", default="content", help="the JSON field holding the text")
    cloze.add_argument("--name", default="ko_health_cloze", help="the task's name (and its files')")
    cloze.add_argument("--limit", type=int, default=None, help="at most this many questions")
    cloze.add_argument("--seed", type=int, default=0)
    cloze.add_argument("--data-path", default=None, help="how the YAML names the JSONL (lm-eval resolves it against "
                       "the working directory; default: out_dir/<name>.jsonl as given)")
    return parser


def _load(args):
    from tasks.core.config.tree import load_config

    if args.config is None and not args.overrides:
        raise SystemExit("cpt: error: give --config FILE and/or --set section.field=value")
    return load_config(args.config, args.overrides)


def cmd_validate(args) -> int:
    from tasks.core.config.tree import dump_config
    from tasks.core.root import open_root
    from tasks.line.preflight import conflicts, release_note
    from tasks.ml import preflight

    cfg = _load(args)
    print(dump_config(cfg), end="")
    print(f"# {release_note(cfg, args.line)}")
    # What the config needs of this machine (qlora: CUDA) and the memory estimate per GPU (train.gpu_memory_gb).
    for warning in preflight.warnings(cfg):
        print(f"cpt: warning: {warning}", file=sys.stderr)
    problems = preflight.machine_problems(cfg)
    for problem in problems:
        print(f"cpt: error: {problem}", file=sys.stderr)
    # What a run would find only after training: another lineage's release, the line held by a stuck run, the
    # push target, the Hub token (a Prefect Secret block is loaded by the run itself).
    found = conflicts(cfg, open_root(args.artifacts), args.line)
    if found:
        print("cpt: a run of this config would fail after training:\n- " + "\n- ".join(found), file=sys.stderr)
    return 2 if problems or found else 0


def _check_inputs(cfg, until: str | None) -> None:
    """A wrong corpus path or a model.id that cannot load here (when the run reaches tokenize) fails now, not
    after a Prefect server has spent seconds starting."""
    from tasks.data.files import resolve_corpus_files
    from tasks.ml.preflight import check_model_here

    for source in cfg.data_sources():  # every training source (with `sources`, corpus has no paths)
        resolve_corpus_files(source.corpus)
    check_model_here(cfg, PIPELINE.index(until or PIPELINE[-1]) >= PIPELINE.index("tokenize"))


def cmd_run(args) -> int:
    cfg = _load(args)
    _check_inputs(cfg, args.until)
    from tasks.core.root import open_root
    from flows.outcome import failed, quiet_expected_tracebacks
    from tasks.line.preflight import RunConflict, check_before_compute

    root = open_root(args.artifacts)  # a URL fsspec cannot open is refused here, before the server starts
    try:  # and what would fail after training (the flow checks again, with a Prefect Secret block if any)
        check_before_compute(cfg, root, None, pushes=args.until in (None, "push"), secrets=False)
    except RunConflict as e:
        return failed("run", e, args.summary, None)
    _prefect_env()
    server = _run_server()
    _warm_arrow()
    from flows.continued_pretraining import continued_pretraining

    quiet_expected_tracebacks()
    server.ready()  # a temporary server stops at exit, after Prefect has sent the run's last logs and events
    try:
        with _flow_settings(server):
            summary = continued_pretraining(config=cfg, until=args.until, artifacts=args.artifacts)
    except Exception as e:
        summary = getattr(e, "cpt_summary", None)
        where = (Path(summary["artifacts"]) / "runs" / summary["flow_run"] / "summary.json") if summary else ""
        return failed("run", e, args.summary, summary, str(where))
    run_summary = Path(summary["artifacts"]) / "runs" / summary["flow_run"] / "summary.json"
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_summary, args.summary)
    width = max(len(s["name"]) for s in summary["stages"])
    print(f"\nrun {summary['flow_run']}: {summary['status']}")
    for s in summary["stages"]:
        print(f"  {s['name']:<{width}}  {s['state']:<9} {s['seconds']:>8.2f}s  {s.get('output') or s.get('reason', '')}")
    print(f"summary: {run_summary}")
    outputs = {s["name"]: s for s in summary["stages"] if "output" in s}
    for name in ("evaluate", "train"):  # what to open, as the producing stage names it
        for what, how in outputs.get(name, {}).get("links", {}).items():
            print(f"{what}: {how}")
    if summary.get("gate"):
        g = summary["gate"]
        print(f"gate: {'promoted' if g['promoted'] else 'refused, not pushed'}: {g['reason']}")
    for w in summary.get("warnings", []):
        print(f"warning: {w}")
    if "push" in outputs:
        c = outputs["push"]["counts"]
        print(f"model: {c['local_path']}" + (f" (uploaded: {c['hub_url']})" if c.get("hub_url") else ""))
    return 0


def cmd_retrain(args) -> int:
    cfg = _load(args)
    from flows.outcome import quiet_expected_tracebacks, retrain_failed
    from tasks.ml.preflight import check_model_here
    from tasks.core.root import open_root
    from tasks.line.preflight import RunConflict, check_before_compute

    check_model_here(cfg)  # before the server starts, as the conflicts below
    try:  # before the server starts; the flow checks again (a Prefect Secret block, the line's lock once more)
        check_before_compute(cfg, open_root(args.artifacts), args.line, secrets=False)
    except RunConflict as e:
        return retrain_failed(args.line, e, args.summary, reason="conflict")
    _prefect_env()
    server = _run_server()
    _warm_arrow()
    from flows.retrain import retrain, write_result

    quiet_expected_tracebacks()
    server.ready()
    try:
        with _flow_settings(server):
            result = retrain(config=cfg, drop=str(args.drop) if args.drop else None, line=args.line,
                             settle_seconds=args.settle_seconds, force=args.force, artifacts=args.artifacts)
    except Exception as e:
        return retrain_failed(args.line, e, args.summary, getattr(e, "cpt_result", None))
    if args.summary:
        write_result(result, args.summary)
    if result["trained"]:
        promoted = result.get("promoted", True)
        print(f"line {args.line}: trained; " + ("promoted" if promoted else
                                                 f"not promoted: {result.get('gate_reason', '')}"))
    else:
        print(f"line {args.line}: not trained: {result['reason']}")
    return 0


def cmd_drops(args) -> int:
    import json

    from tasks.core.root import open_root
    from tasks.line import lines

    root = open_root(args.artifacts)
    if args.remove:
        try:
            entry = lines.remove(root, args.line, args.remove)
        except KeyError as e:
            print(f"cpt: {e.args[0]}", file=sys.stderr)
            return 2
        print(f"line {args.line}: {entry.path} removed; the next run of the line trains without it")
        return 0
    state = lines.read_line(root, args.line)
    if args.json:
        print(json.dumps([d.listing() for d in state.drops], indent=2, ensure_ascii=False))
        return 0
    if not state.drops:
        print(f"line {args.line}: no drops")
        return 0
    for d in state.drops:
        print(f"{d.status:<9} {d.path}\n          {d.files} files, {d.documents} documents, {d.tokens} tokens; "
              f"registered {d.registered_at}; fingerprint {d.fingerprint[:12] or '-'}"
              + (f"\n          reason: {d.reason}" if d.reason else "")
              + (f"\n          last training: {d.outcome}" if d.outcome else ""))
    if state.last_training:
        t = state.last_training
        print(f"last training: {t['finished_at']} ({t['flow_run']}), {t['files']} files, fingerprint {t['corpus'][:12]}")
    return 0


def cmd_promotions(args) -> int:
    from tasks.core.root import open_root
    from tasks.line.promotions import lineage_of, read_promotions

    state = read_promotions(open_root(args.artifacts), lineage_of(args.line, args.name, args.repo))
    if args.json:
        print(state.model_dump_json(indent=2))
        return 0
    if not state.history:
        print(f"{state.lineage}: nothing promoted yet")
        return 0
    print(f"{state.lineage}: {len(state.history)} promoted, newest last")
    for r in state.history:
        parent = "base" if r.parent.get("kind") == "base" else f"promoted {r.parent.get('digest', '')[:12]}"
        ppl = f"{r.validation_perplexity:.4g}" if r.validation_perplexity is not None else "?"
        print(f"  {r.at}  run {r.flow_run}  model {r.model_digest[:12]}  parent {parent}  validation ppl {ppl}  "
              f"{r.release}\n      {r.reason}")
    return 0


def cmd_cache(args) -> int:
    from tasks.core.root import open_root

    root = open_root(args.artifacts)
    if args.cache_command != "verify":
        return cache_cli.main(root, args)
    checked, damaged = 0, 0
    # An object-store root: this host's mirror first, then the store, which is what every host trusts.
    for where, why in root.verify(full=args.full, discard=args.discard):
        checked += 1
        if why is not None:
            damaged += 1
            print(f"damaged: {where}: {why}" + ("; discarded" if args.discard else ""))
    how = "sizes and contents" if args.full else "sizes (add --full to read every byte)"
    print(f"{checked} entries checked by {how}: {damaged} damaged"
          + ("" if not damaged or args.discard else "; `cpt cache verify --discard` removes them, the next run "
                                                    "rebuilds them"))
    return 1 if damaged and not args.discard else 0


def cmd_emit_drop(args) -> int:
    _prefect_env()
    from flows.announce import AnnounceFailed, announce

    path = args.path.resolve()
    if not path.exists():
        print(f"cpt: {path}: no such drop", file=sys.stderr)
        return 2
    try:
        event, attempt = announce(path, args.event, attempts=args.attempts, confirm_seconds=args.confirm_seconds,
                                  say=lambda m: print(m, file=sys.stderr))
    except AnnounceFailed as e:
        print(f"cpt: emit-drop: {e}", file=sys.stderr)
        return 1
    print(f"emitted {args.event} for {path} ({event.id}); the server has it"
          + (f" (attempt {attempt})" if attempt > 1 else ""))
    return 0


def cmd_serve(args) -> int:
    cfg = _load(args)
    _prefect_env()
    from prefect.events import DeploymentEventTrigger

    from flows.retrain import retrain

    # One run at a time per line; a drop arriving during a run waits for it instead of training in parallel.
    trigger = DeploymentEventTrigger(expect={DROP_EVENT}, match={"prefect.resource.id": "cpt.drop.*"},
                                     parameters={"drop": "{{ event.payload.path }}"})
    retrain.serve(name=args.name, cron=args.cron or None, triggers=[trigger], global_limit=1,
                  parameters={"config": cfg.model_dump(mode="json"), "line": args.line,
                              "artifacts": args.artifacts})
    return 0


class ExportSourceError(Exception):
    """The chunks `cpt export-chunks` was pointed at are not there."""


CHUNK_STAGES = ("chunk", "mix")


def _published_chunks(root, stage: str, key: str, where: str):
    from tasks.chunk import Chunks

    if stage not in CHUNK_STAGES:
        raise ExportSourceError(f"{where} is a {stage} entry; export-chunks takes a chunk or mix entry")
    manifest = root.published(stage, key)
    if manifest is None:
        raise ExportSourceError(f"{where}: no complete {stage} entry {key} under {root} (removed or damaged? "
                                "`cpt cache verify` says which; rerun the data stages to rebuild it)")
    return Chunks.model_validate(manifest.model_dump())


def _chunks_of_summary(root, summary: dict, where: str, stage: str | None):
    """The training chunks a run summary names: `stage`'s output, else mix's when the run has one, else chunk's."""
    outputs = {s["name"]: s for s in summary.get("stages", []) if s.get("key") and s["name"] in CHUNK_STAGES}
    name = stage or ("mix" if "mix" in outputs else "chunk")
    if name not in outputs:
        raise ExportSourceError(f"{where}: the run has no {name} output (it stopped before it, or "
                                f"{'replay is off' if name == 'mix' else 'failed'})")
    return _published_chunks(root, name, outputs[name]["key"], where)


def _export_source(args):
    import json

    from tasks.core.manifest import read_manifest
    from tasks.core.root import ArtifactsRoot, open_root

    given = [n for n, v in (("--run", args.run), ("--entry", args.entry),
                            ("--config/--set", args.config or args.overrides)) if v]
    if len(given) != 1:
        raise ExportSourceError("give one of --run, --entry or --config/--set" + (f" (got {', '.join(given)})"
                                                                                  if given else ""))
    root = open_root(args.artifacts)
    if args.run:
        path = Path(args.run)
        if path.suffix != ".json":
            rel = f"runs/{args.run}/summary.json"
            path = root.fetch_state(rel)
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ExportSourceError(f"--run {args.run}: no run summary at {path}") from None
        except ValueError as e:
            raise ExportSourceError(f"--run {args.run}: {path} is not a run summary ({e})") from None
        return root, _chunks_of_summary(root, summary, f"--run {args.run}", args.stage)
    if args.entry:
        folder = Path(args.entry)
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is not None:  # a local entry folder: its root is the folder its manifest's path is under
            base = folder.resolve()
            for _ in Path(manifest.path).parts:
                base = base.parent
            root = ArtifactsRoot(base)
            return root, _published_chunks(root, manifest.stage, manifest.key, f"--entry {args.entry}")
        rel = args.entry.removeprefix(f"{root.url}/") if root.url else args.entry
        parts = Path(rel).parts
        if len(parts) != 3 or parts[0] != "cache":
            raise ExportSourceError(f"--entry {args.entry}: not a cache entry folder (no manifest there) nor "
                                    "cache/<stage>/<key> under the artifacts root")
        return root, _published_chunks(root, parts[1], parts[2], f"--entry {args.entry}")
    cfg = _load(args)
    _check_inputs(cfg, "chunk")
    _prefect_env()
    from flows.continued_pretraining import continued_pretraining

    summary = continued_pretraining(config=cfg, until="chunk", artifacts=args.artifacts)
    return root, _chunks_of_summary(root, summary, "the config's run", args.stage)


def cmd_export_chunks(args) -> int:
    from tasks.chunk import ExportError, export_chunks

    try:
        root, chunks = _export_source(args)
        rows = export_chunks(chunks, root, args.out_dir, force=args.force)
    except (ExportSourceError, ExportError) as e:
        print(f"cpt: export-chunks: {e}", file=sys.stderr)
        return 2
    print(f"{args.out_dir}: {', '.join(f'{n} {r} rows' for n, r in rows.items())} from {chunks.stage} "
          f"{chunks.key} (input_ids, attention_mask, labels: -100 before each row's trained part); "
          "datasets.load_from_disk reads it")
    return 0


def cmd_init_tiny_model(args) -> int:
    from tasks.ml.tiny_model import build_tiny_model, read_texts

    if (args.out_dir / "config.json").is_file() and not args.force:
        print(f"{args.out_dir}: tiny model already built (--force to rebuild)")
        return 0
    path = build_tiny_model(args.out_dir, read_texts(args.corpus), vocab_size=args.vocab_size,
                            hidden_size=args.hidden_size, layers=args.layers, byte_level=args.byte_level)
    print(f"tiny model written to {path}")
    return 0


def starter_root() -> Path:
    """Where the starter project lies: the copy a wheel carries (setup.py puts the checkout's configs/ and samples/
    there at build time), else the checkout beside this package (an editable install has no copy). Never another
    folder beside an installed package: site-packages may hold someone else's `configs/`."""
    here = Path(__file__).resolve().parent
    bundled, checkout = here / "_starter", here.parent
    return checkout if not bundled.is_dir() and (checkout / "setup.py").is_file() else bundled


def cmd_init(args) -> int:
    src = starter_root()
    files = sorted(f.relative_to(src) for top in ("configs", "samples") for f in (src / top).rglob("*") if f.is_file())
    if not files:
        print(f"cpt: init: no starter project under {src} (a broken install?)", file=sys.stderr)
        return 1
    # Like cookiecutter, never clobber a user's edits unasked; a file equal to the starter's is left as it is.
    differ = [f for f in files if (args.dir / f).exists() and (args.dir / f).read_bytes() != (src / f).read_bytes()]
    if differ and not args.force:
        print(f"cpt: init: {args.dir} already has other versions of {', '.join(map(str, differ))} "
              "(--force overwrites them)", file=sys.stderr)
        return 1
    for f in files:
        (args.dir / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / f, args.dir / f)
    cd = "" if args.dir.resolve() == Path.cwd() else f"cd {args.dir} && "
    print(f"{len(files)} files written to {args.dir}: {', '.join(sorted({f.parts[0] + '/' for f in files}))}\n"
          f"next: {cd}cpt init-tiny-model artifacts/models/tiny-ko && cpt run --config configs/demo.yaml")
    return 0


def cmd_make_cloze_task(args) -> int:
    from tasks.evaluate import write_cloze_task
    from tasks.ml.tiny_model import read_texts

    yaml_file = write_cloze_task(read_texts(args.corpus, args.field), args.out_dir, args.name,
                                 data_path=args.data_path or str(args.out_dir / f"{args.name}.jsonl"),
                                 n=args.limit, seed=args.seed, source=str(args.corpus))
    print(f"task {args.name!r} written to {yaml_file} (evaluate.tasks: [{yaml_file}])")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tasks.core.config.base import ConfigError

    handlers = {"run": cmd_run, "validate": cmd_validate, "init": cmd_init, "init-tiny-model": cmd_init_tiny_model,
                "retrain": cmd_retrain, "drops": cmd_drops, "promotions": cmd_promotions, "cache": cmd_cache,
                "emit-drop": cmd_emit_drop, "export-chunks": cmd_export_chunks,
                "serve": cmd_serve, "make-cloze-task": cmd_make_cloze_task, "server": cmd_server}
    try:
        return handlers[args.command](args)
    except ConfigError as e:
        print(f"cpt: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from tasks.data.records import BadRecordError

        if isinstance(e, BadRecordError):
            print(f"cpt: bad input: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
