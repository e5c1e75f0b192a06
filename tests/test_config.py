import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.config import ConfigError, CptConfig, load_config, parse_override

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_interface_names(tmp_path):
    cfg = load_config(write(tmp_path, "corpus: {paths: [a.jsonl]}\nmodel: {id: m}\n"))
    assert cfg.corpus.text_field == "content"
    assert (cfg.chunk.max_seq_length, cfg.chunk.overlap, cfg.chunk.mask_overlap) == (1000, 500, True)
    assert cfg.shuffle.seed == 42 and 0 < cfg.split.validation_fraction < 1
    assert cfg.model.id == "m"


def test_set_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "corpus: {paths: [x.jsonl]}\nmodel: {id: m}\n"),
                      ['corpus.paths=["a.jsonl","b/"]', "chunk.max_seq_length=64", "chunk.overlap=8",
                       "chunk.mask_overlap=false", "model.revision=null"])
    assert cfg.corpus.paths == ["a.jsonl", "b/"]
    assert (cfg.chunk.max_seq_length, cfg.chunk.overlap, cfg.chunk.mask_overlap) == (64, 8, False)
    assert cfg.model.revision is None


def test_overrides_alone_make_a_config():
    cfg = load_config(None, ["corpus.paths=[a.jsonl]", "model.id=m"])
    assert cfg.corpus.paths == ["a.jsonl"]


@pytest.mark.parametrize("override, message", [
    ("chunk.max_seq_lenght=10", "chunk.max_seq_lenght: unknown key"),
    ("chunkk.overlap=1", "chunkk: unknown key"),
    ("chunk.overlap=-1", "chunk.overlap: Input should be greater than or equal to 0"),
    ("chunk.overlap=abc", "chunk.overlap: Input should be a valid integer"),
    ("split.validation_fraction=1.0", "split.validation_fraction: Input should be less than 1"),
    ("corpus.on_bad_record=ignore", "corpus.on_bad_record: Input should be 'fail' or 'skip'"),
    ("chunk.overlap=1000", "chunk: Value error, overlap (1000) must be smaller than max_seq_length (1000)"),
    ("corpus.paths=[]", "corpus: Value error, paths: at least one file"),
    ("corpus.question_field=q", "corpus: Value error, question_field and answer_field must be set together"),
])
def test_bad_values_name_the_full_key(tmp_path, override, message):
    path = write(tmp_path, "corpus: {paths: [a.jsonl]}\nmodel: {id: m}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, [override])
    assert message in str(e.value)
    assert str(path) in str(e.value)


def test_missing_model_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="model: required key is missing"):
        load_config(write(tmp_path, "corpus: {paths: [a]}\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "corpus: [unclosed\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="expected section.field=value"):
        parse_override("chunk.overlap")


def test_override_through_a_value_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="model.id: is a value"):
        load_config(None, ["model.id=m", "model.id.x=1"])


def test_every_field_is_described():
    def walk(model, prefix):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, CptConfig.__mro__[1]):
                walk(ann, f"{prefix}{name}.")
    walk(CptConfig, "")


def test_config_is_the_flow_parameter_schema():
    from flows.continued_pretraining import continued_pretraining
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(continued_pretraining).model_dump()
    assert "config" in schema["properties"]
    defs = schema["definitions"]
    assert defs["ChunkConfig"]["properties"]["overlap"]["description"]
    assert defs["ChunkConfig"]["additionalProperties"] is False


def test_shipped_configs_validate():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_help_and_validate_do_not_import_heavy_libraries(tmp_path):
    code = ("import sys; from flows.cli import main; main(['validate', '--set', 'corpus.paths=[a]', "
            "'--set', 'model.id=m']); heavy = [m for m in ('torch', 'transformers', 'prefect', 'datasets') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)
