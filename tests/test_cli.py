import subprocess
import sys
from pathlib import Path

from helpers import write_jsonl
from flows.cli import main
from tasks.core.root import open_root

ROOT = Path(__file__).resolve().parents[1]


def cpt(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_help_lists_the_commands():
    out = cpt("--help")
    assert out.returncode == 0 and "run" in out.stdout and "init-tiny-model" in out.stdout
    assert "--until" in cpt("run", "--help").stdout


def test_validate_prints_the_resolved_config():
    out = cpt("validate", "--config", "configs/demo.yaml", "--set", "chunk.overlap=10")
    assert out.returncode == 0 and "overlap: 10" in out.stdout and "text_field: content" in out.stdout


def test_config_errors_exit_2_with_the_key(capsys):
    assert main(["validate", "--config", str(ROOT / "configs/demo.yaml"), "--set", "chunk.overlapp=1"]) == 2
    assert "chunk.overlapp: unknown key" in capsys.readouterr().err


def test_bad_input_exits_1_with_file_and_line_before_any_flow_starts(tmp_path, capsys, tiny_model):
    write_jsonl(tmp_path / "a.jsonl", [{"content": "ok"}])
    rc = main(["run", "--set", f"corpus.paths=[{tmp_path / 'missing.jsonl'}]", "--set", f"model.id={tiny_model}",
               "--artifacts", str(tmp_path / "art")])
    assert rc == 2 and "corpus.paths[0]" in capsys.readouterr().err


def test_drops_answers_without_prefect_or_torch_and_removal_is_recorded(tmp_path):
    from tasks.state import lines

    lines.announce(open_root(tmp_path), "l", tmp_path / "d1")
    probe = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
             "heavy = [m for m in ('prefect', 'torch', 'transformers', 'datasets') if m in sys.modules]; "
             "print('HEAVY', heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", probe, "drops", "--line", "l", "--artifacts", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "pending" in out.stdout and "HEAVY []" in out.stdout, out.stderr
    out = cpt("drops", "--line", "l", "--remove", str(tmp_path / "nope"), "--artifacts", str(tmp_path))
    assert out.returncode == 2 and "has no drop" in out.stderr
    assert cpt("drops", "--line", "l", "--remove", str(tmp_path / "d1"), "--artifacts", str(tmp_path)).returncode == 0
    assert [h["status"] for h in lines.read_line(open_root(tmp_path), "l").drops[0].history] == ["pending", "removed"]


def test_promotions_lists_a_lineage_without_prefect_or_torch(tmp_path):
    from tasks.state.promotions import Promotion, record_promotion

    record = Promotion(model_digest="d" * 32, model_path="cache/train/k/model", train_identity="t",
                       parent={"kind": "base", "id": "org/base", "digest": "b"}, reference={"kind": "base"},
                       validation_perplexity=12.5, reason="validation perplexity 12.5 vs the base model 20",
                       flow_run="brave-otter", at="2026-11-26T02:00:00Z")
    record_promotion(open_root(tmp_path), "line-night", record)
    record_promotion(open_root(tmp_path), "line-night", record)  # the same promotion seen again is not a new entry
    probe = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
             "heavy = [m for m in ('prefect', 'torch', 'transformers', 'datasets') if m in sys.modules]; "
             "print('HEAVY', heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", probe, "promotions", "--line", "night", "--artifacts", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "HEAVY []" in out.stdout, out.stderr
    assert "line-night: 1 promoted" in out.stdout and "run brave-otter  model dddddddddddd  parent base" in out.stdout
    out = cpt("promotions", "--name", "other", "--artifacts", str(tmp_path))
    assert out.returncode == 0 and "name-other: nothing promoted yet" in out.stdout


def test_run_and_retrain_start_pyarrows_pandas_import_in_the_background(tmp_path):
    """pyarrow imports pandas on its first array (0.4-1.3 s): the commands that run stages begin it in a thread
    before the flow starts, so a drop's gate or load does not pay it inside the data path."""
    corpus = write_jsonl(tmp_path / "a.jsonl", [{"content": "ok"}])
    probe = ("import sys, flows.cli as cli; assert 'pandas' not in sys.modules; "
             "called = []; cli._warm_arrow = lambda real=cli._warm_arrow: (called.append(1), real()); "
             "import flows.continued_pretraining as fc, flows.retrain as fr; "
             "fc.continued_pretraining = fr.retrain = lambda **kw: sys.exit(0 if called else 3); "
             "sys.exit(cli.main(sys.argv[1:]))")
    for command in (["run"], ["retrain", "--line", "l"]):
        out = subprocess.run([sys.executable, "-c", probe, *command, "--set", f"corpus.paths=[{corpus}]",
                              "--set", "model.id=org/model", "--artifacts", str(tmp_path / "art")],
                             cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, (command, out.returncode, out.stderr[-2000:])
    warm = ("import sys, threading, flows.cli as cli; cli._warm_arrow(); "
            "[t.join() for t in threading.enumerate() if t.name == 'arrow-warm']; print('pandas' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", warm], cwd=ROOT, capture_output=True, text=True).stdout == "True\n"
