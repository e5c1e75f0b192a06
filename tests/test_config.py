import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.config.base import ConfigError, OPTIMIZERS, SEED_MAX
from tasks.core.config.data import ChunkConfig
from tasks.core.config.model import GateConfig
from tasks.core.config.tree import CptConfig, load_config, parse_override, validate_config

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
    ("corpus.max_document_bytes=0", "corpus.max_document_bytes: Input should be greater than or equal to 1"),
    ("corpus.max_document_bytes=4294967296", "corpus.max_document_bytes: Input should be less than or equal to"),
    ("chunk.overlap=1000", "chunk: Value error, overlap (1000) must be at most max_seq_length - 2 (998)"),
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


@pytest.mark.slow  # a fresh interpreter shows what is imported
def test_help_and_validate_do_not_import_heavy_libraries(tmp_path):
    code = ("import sys; from flows.cli import main; main(['validate', '--set', 'corpus.paths=[a]', "
            "'--set', 'model.id=m']); heavy = [m for m in ('torch', 'transformers', 'prefect', 'datasets') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)


# ------------------------------------------------------------------------------------------ trust boundaries


def base_config(**sections):
    data = {"corpus": {"paths": ["a.jsonl"]}, "model": {"id": "m"}}
    for section, values in sections.items():
        data[section] = values
    return data


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs", "a\\b", "..\\x", ".hidden", "a\x00b"])
def test_push_name_must_be_one_path_component(name):
    with pytest.raises(ConfigError) as e:
        validate_config(base_config(push={"name": name}))
    assert "\npush.name: " in str(e.value) and "not a valid name" in str(e.value)


@pytest.mark.parametrize("name", [None, "tiny-ko-cpt", "gemma.v2", "a..b", "x-"])
def test_push_name_accepts_a_plain_folder_name(name):
    assert validate_config(base_config(push={"name": name})).push.name == name


def test_cpt_validate_reports_a_bad_push_name(capsys):
    from flows.cli import main

    assert main(["validate", "--set", "corpus.paths=[a]", "--set", "model.id=m", "--set", "push.name=../x"]) == 2
    err = capsys.readouterr().err
    assert "push.name: Value error, '../x' is not a valid name" in err


def seed_fields(model=CptConfig, prefix=""):
    """Every int field named like a seed, anywhere in the tree, as its dotted path."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, CptConfig.__mro__[1]):
            out += seed_fields(ann, f"{prefix}{name}.")
        elif "seed" in name:
            out.append(f"{prefix}{name}")
    return out


def test_every_seed_field_is_found():
    assert {"shuffle.seed", "train.seed", "evaluate.generation.seed"} <= set(seed_fields())


@pytest.mark.parametrize("field", seed_fields())
def test_every_seed_is_within_numpys_range(field):
    for bad in (-1, SEED_MAX + 1):
        with pytest.raises(ConfigError) as e:
            load_config(None, ["corpus.paths=[a]", "model.id=m", f"{field}={bad}"])
        assert f"\n{field}: Input should be" in str(e.value), str(e.value)
    for good in (0, SEED_MAX):
        cfg = load_config(None, ["corpus.paths=[a]", "model.id=m", f"{field}={good}"])
        node = cfg
        for part in field.split("."):
            node = getattr(node, part)
        assert node == good


def test_seed_max_is_what_numpy_and_transformers_set_seed_accept():
    import numpy as np

    assert SEED_MAX == 2**32 - 1
    np.random.seed(SEED_MAX)  # transformers' set_seed seeds numpy's legacy generator: the narrowest of them
    np.random.default_rng(SEED_MAX)
    for bad in (-1, SEED_MAX + 1):
        with pytest.raises(ValueError):
            np.random.seed(bad)


def test_optimizer_names_are_transformers_own():
    from transformers.training_args import OptimizerNames

    assert OPTIMIZERS == tuple(o.value for o in OptimizerNames)


@pytest.mark.parametrize("field, value, close", [("train.optim", "paged_adamw_8bits", "paged_adamw_8bit"),
                                                 ("train.optim", "adamw", "adamw_8bit"),
                                                 ("train.optim_fallback", "adam_torch", "adamw_torch")])
def test_an_unknown_optimizer_fails_validation_with_close_names(field, value, close):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["corpus.paths=[a]", "model.id=m", f"{field}={value}"])
    msg = str(e.value)
    assert f"\n{field}: Value error, unknown optimizer {value!r}" in msg and close in msg.split("did you mean")[1]


def test_every_optimizer_name_validates():
    for name in OPTIMIZERS:
        cfg = load_config(None, ["corpus.paths=[a]", "model.id=m", f"train.optim={name}",
                                 f"train.optim_fallback={name}"])
        assert cfg.train.optim == cfg.train.optim_fallback == name


def test_overlap_bound_is_the_bos_aware_one():
    """The config accepts exactly the (max_seq_length, overlap) pairs the chunker accepts with a BOS-adding tokenizer,
    so no tokenizer can fail the chunk stage on a config that validated."""
    from tasks.data.windows import window_plan

    for max_len in range(2, 40):
        for overlap in range(0, max_len + 1):
            try:
                window_plan(ChunkConfig.model_construct(max_seq_length=max_len, overlap=overlap, mask_overlap=True),
                            has_bos=True)
                chunker_ok = True
            except ConfigError:
                chunker_ok = False
            try:
                ChunkConfig(max_seq_length=max_len, overlap=overlap)
                config_ok = True
            except ValueError as e:
                config_ok = False
                assert "a tokenizer that adds BOS" in str(e)
            assert config_ok == chunker_ok, (max_len, overlap)


def test_overlap_one_below_the_length_is_refused_with_why():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["corpus.paths=[a]", "model.id=m", "chunk.max_seq_length=64", "chunk.overlap=63"])
    assert "chunk: Value error, overlap (63) must be at most max_seq_length - 2 (62)" in str(e.value)
    assert "at least one new token" in str(e.value)
    assert load_config(None, ["corpus.paths=[a]", "model.id=m", "chunk.max_seq_length=64",
                              "chunk.overlap=62"]).chunk.overlap == 62


def test_min_improvement_and_a_worse_allowance_exclude_each_other():
    assert GateConfig().min_improvement == 0.0
    assert GateConfig(min_improvement=0.01).min_improvement == 0.01
    assert GateConfig(max_validation_increase=0.05).max_validation_increase == 0.05
    with pytest.raises(ConfigError) as e:
        load_config(None, ["corpus.paths=[a]", "model.id=m", "gate.min_improvement=0.01",
                           "gate.max_validation_increase=0.05"])
    assert "gate: Value error, min_improvement (0.01) and max_validation_increase (0.05)" in str(e.value)
    for bad, why in (("-0.1", "greater than or equal to 0"), ("1", "less than 1")):
        with pytest.raises(ConfigError, match=f"gate.min_improvement: Input should be {why}"):
            load_config(None, ["corpus.paths=[a]", "model.id=m", f"gate.min_improvement={bad}"])
