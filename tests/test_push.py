import pytest

from tasks.push import PushFailed, default_name, hub_token, model_card, save_release


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_token_comes_from_a_prefect_secret_block_or_the_environment(monkeypatch):
    from prefect.blocks.system import Secret

    Secret(value="hf_test_value_from_block").save("cpt-hub-token", overwrite=True)
    monkeypatch.setenv("HF_TOKEN", "hf_test_value_from_env")
    assert hub_token("cpt-hub-token") == "hf_test_value_from_block"
    assert hub_token(None) == "hf_test_value_from_env"
    with pytest.raises(PushFailed, match="push.token_secret: cannot load Prefect Secret block 'missing'"):
        hub_token("missing")


def test_card_holds_base_model_data_config_and_eval(tmp_path):
    card = model_card("org/base", {"fingerprint": "abc", "counts": {"documents": 3}},
                      {"train": {"learning_rate": 0.1}}, "# Before / after\n| x |")
    assert card.startswith("---\nbase_model: org/base\n")
    assert "`abc`" in card and "| documents | 3 |" in card and "learning_rate: 0.1" in card and "Before / after" in card


def test_release_replaces_an_older_one_atomically(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    dest = tmp_path / "models" / "m"
    save_release(model, dest, "card 1")
    (model / "extra.bin").write_bytes(b"x")
    save_release(model, dest, "card 2")
    assert (dest / "README.md").read_text() == "card 2" and (dest / "extra.bin").exists()
    assert [p.name for p in dest.parent.iterdir()] == ["m"]


def test_default_name_follows_base_and_key():
    assert default_name("unsloth/gemma-3-1b-pt", "push-0123456789abcdef") == "gemma-3-1b-pt-cpt-01234567"
