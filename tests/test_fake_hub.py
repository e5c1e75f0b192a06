"""FakeHub driven through the real huggingface_hub client, as an upload step would use it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fake_hub import FakeHub, online
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

# Every test here drives an HTTP server (FakeHub, in a thread): `make test-fast` starts no server.
pytestmark = pytest.mark.slow
TOKEN = "hf_test_0123456789abcdef"
REPO = "test-user/tiny-model"


@pytest.fixture
def hub(monkeypatch):
    with FakeHub() as hub:
        online(monkeypatch, hub.url)
        yield hub


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_bytes(os.urandom(3 * 1024 * 1024) + bytes(range(256)))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}), encoding="utf-8")
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}), encoding="utf-8")
    (d / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny model\n한국어 의료 텍스트\n", encoding="utf-8")
    return d


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_create_repo_twice_and_branch(hub):
    api = HfApi(endpoint=hub.url, token=TOKEN)
    url = api.create_repo(repo_id=REPO, private=True, exist_ok=True, repo_type="model")
    again = api.create_repo(repo_id=REPO, private=True, exist_ok=True, repo_type="model")
    assert url.repo_id == again.repo_id == REPO
    with pytest.raises(HfHubHTTPError):
        api.create_repo(repo_id=REPO, exist_ok=False)

    api.create_branch(REPO, branch="ckpt-100", exist_ok=True)
    api.create_branch(REPO, branch="ckpt-100", exist_ok=True)
    assert hub.repos[REPO] == {"private": True, "branches": {"main", "ckpt-100"}, "type": "model"}


def test_upload_folder_round_trip_to_main_and_branch(hub, model_dir):
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(repo_id=REPO, private=True, exist_ok=True, repo_type="model")
    api.create_branch(REPO, branch="ckpt-100", exist_ok=True)
    local = _local_files(model_dir)

    main = api.upload_folder(repo_id=REPO, folder_path=model_dir, revision=None, commit_message="Upload final")
    branch = api.upload_folder(
        repo_id=REPO, folder_path=model_dir, revision="ckpt-100", commit_message="Upload step 100"
    )

    assert [(c["repo_id"], c["revision"], c["message"]) for c in hub.commits] == [
        (REPO, "main", "Upload final"),
        (REPO, "ckpt-100", "Upload step 100"),
    ]
    for commit in hub.commits:
        assert commit["files"] == local  # binary safetensors byte-for-byte, text files too
    assert hub.files(REPO, "main") == hub.files(REPO, "ckpt-100") == local
    assert [main.oid, branch.oid] == [c["oid"] for c in hub.commits]
    assert api.repo_info(REPO, revision="ckpt-100").sha == branch.oid

    # The same folder again changes nothing: no commit, as on the real Hub.
    api.upload_folder(repo_id=REPO, folder_path=model_dir, commit_message="Again")
    assert len(hub.commits) == 2

    # Nothing went to Xet, LFS or anywhere outside the routes the fake implements.
    assert not [p for _, p, _ in hub.requests if "xet" in p or ".git/info/lfs" in p]


def test_every_request_carries_the_token(hub, model_dir):
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(repo_id=REPO, private=True, exist_ok=True)
    api.upload_folder(repo_id=REPO, folder_path=model_dir, commit_message="Upload")
    assert {m for m, _, _ in hub.requests} == {"POST"}
    assert {p.split("/")[-2] for _, p, _ in hub.requests if p.startswith("/api/models/")} == {"preupload", "commit"}
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h in hub.requests)


def test_hf_endpoint_default_and_module_level_functions(hub, model_dir):
    import huggingface_hub

    assert HfApi().endpoint == hub.url  # constants.ENDPOINT patched by online()
    huggingface_hub.create_repo(REPO, token=TOKEN, exist_ok=True)
    huggingface_hub.upload_folder(repo_id=REPO, folder_path=model_dir, token=TOKEN, commit_message="module level")
    assert hub.commits[-1]["message"] == "module level"


def test_failed_commit_raises_without_xet_then_succeeds(monkeypatch, model_dir):
    # Without hf_xet, upload_folder -> create_commit posts the commit once: the 500 reaches the caller.
    with FakeHub(fail_commits=1) as hub:
        online(monkeypatch, hub.url, disable_xet=True)
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo(repo_id=REPO, exist_ok=True)
        with pytest.raises(HfHubHTTPError) as err:
            api.upload_folder(repo_id=REPO, folder_path=model_dir, commit_message="Upload")
        assert err.value.response.status_code == 500
        assert hub.commits == [] and hub.commit_attempts == 1

        api.upload_folder(repo_id=REPO, folder_path=model_dir, commit_message="Upload")
        assert hub.commit_attempts == 2
        assert hub.files(REPO) == _local_files(model_dir)


def test_failed_commit_is_retried_inside_xet_pipeline(monkeypatch, model_dir):
    # With hf_xet installed (the default here), the commit goes through http_backoff: one 500 costs ~1 s.
    with FakeHub(fail_commits=1) as hub:
        online(monkeypatch, hub.url)
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo(repo_id=REPO, exist_ok=True)
        api.upload_folder(repo_id=REPO, folder_path=model_dir, commit_message="Upload")
        assert hub.commit_attempts == 2 and len(hub.commits) == 1


@pytest.mark.parametrize("disable_xet", [False, True])
def test_a_commit_whose_parent_is_not_the_head_is_refused(monkeypatch, model_dir, disable_xet):
    """create_commit/upload_folder(parent_commit=…) as on the Hub: 412 when the branch moved since."""
    with FakeHub() as hub:
        online(monkeypatch, hub.url, disable_xet=disable_xet)
        api = HfApi(token=TOKEN)
        api.create_repo(REPO)
        first = api.upload_folder(repo_id=REPO, folder_path=str(model_dir), parent_commit=hub.head(REPO)).oid
        assert hub.head(REPO) == first
        (model_dir / "config.json").write_text("{}")
        with pytest.raises(HfHubHTTPError) as e:
            api.upload_folder(repo_id=REPO, folder_path=str(model_dir), parent_commit="0" * 40)
        assert e.value.response.status_code == 412 and hub.head(REPO) == first
