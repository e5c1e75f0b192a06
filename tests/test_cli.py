import subprocess
import sys
from pathlib import Path

from conftest import write_jsonl
from flows.cli import main

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
