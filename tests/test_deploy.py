"""The image and the Kubernetes pool, as far as they can be checked without a Docker daemon or a cluster: the
base job template keeps prefect-kubernetes' default and renders a valid Job for a flow run (GPU, scratch volume for
CPT_SCRATCH, credentials from a Secret, non-root); the image's install steps (deploy/install.sh) build the wheel
and install it in a fresh venv outside the checkout, where `cpt` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from helpers import ROOT

TEMPLATE = ROOT / "deploy" / "k8s" / "base-job-template.json"


def _render(values: dict) -> dict:
    import anyio
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(TEMPLATE.read_text())

    async def render():  # what the worker does: the variables' defaults, a deployment's job variables over them
        cfg = await KubernetesWorkerJobConfiguration.from_template_and_values(template, values)
        cfg.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="brave-otter", flow_id=uuid.uuid4()))
        return cfg

    return anyio.run(render).job_manifest


def test_the_template_keeps_prefect_kubernetes_default():
    """Every variable and placeholder of the default template is still there (a worker upgrade that changed
    the default shows here), with cpt's additions."""
    from prefect_kubernetes.worker import KubernetesWorker

    default = KubernetesWorker.get_default_base_job_template()
    ours = json.loads(TEMPLATE.read_text())
    assert set(default["variables"]["properties"]) <= set(ours["variables"]["properties"])
    for name, schema in default["variables"]["properties"].items():
        assert {k: v for k, v in schema.items() if k not in ("default", "description")} == \
            {k: v for k, v in ours["variables"]["properties"][name].items() if k not in ("default", "description")}
    assert set(default["job_configuration"]) == set(ours["job_configuration"])
    assert {"gpus", "scratch_size", "store_secret", "artifacts"} <= set(ours["variables"]["properties"])


@pytest.mark.slow  # rendering resolves block references through a client: the Prefect test server
def test_the_template_renders_a_valid_job_for_a_flow_run(prefect_harness):
    from kubernetes_asyncio.client import ApiClient, V1Job  # prefect-kubernetes' own client

    manifest = _render({"image": "registry.example/cpt:cuda", "gpus": 8, "store_secret": "team-ml-store",
                        "env": {"PREFECT_API_URL": "http://prefect:4200/api"}})
    # The Kubernetes API's own models, strictly: read into V1Job and written back, the manifest must come out the
    # same (a misspelled or misplaced field is dropped on the way and fails here; a missing required one raises).
    import anyio

    async def roundtrip():  # kubernetes_asyncio's client wants a running loop
        async with ApiClient() as api:
            job = api._ApiClient__deserialize(manifest, V1Job)
            return job, api.sanitize_for_serialization(job)

    job, written = anyio.run(roundtrip)
    expected = json.loads(json.dumps(manifest))
    for c in expected["spec"]["template"]["spec"]["containers"]:  # quantities are int-or-string; the model says str
        for kind in ("limits", "requests"):
            c["resources"][kind] = {k: str(v) for k, v in c["resources"][kind].items()}
    assert written == expected
    assert job.kind == "Job" and job.api_version == "batch/v1"
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert container.image == "registry.example/cpt:cuda"
    assert container.resources.limits["nvidia.com/gpu"] == "8"
    assert manifest["spec"]["completions"] == 1  # Job fields in the Job's spec (the default has them in the pod's)
    env = {e.name: e.value for e in container.env}
    assert env["CPT_SCRATCH"] == "/scratch" and env["PREFECT_API_URL"] == "http://prefect:4200/api"
    assert env["CPT_ARTIFACTS"] == "s3://team-ml/cpt" and "PREFECT__FLOW_RUN_ID" in env
    assert container.env_from[0].secret_ref.name == "team-ml-store"  # credentials: the Secret, never a value
    assert not any(k.startswith("AWS_") for k in env)
    mounts = {m.name: m.mount_path for m in container.volume_mounts}
    volumes = {v.name: v for v in pod.volumes}
    assert mounts == {"scratch": "/scratch", "shm": "/dev/shm"}
    assert volumes["scratch"].empty_dir.size_limit == "200Gi" and volumes["shm"].empty_dir.medium == "Memory"
    assert container.security_context.run_as_non_root and container.security_context.run_as_user == 1000
    assert pod.restart_policy == "Never"
    # The CPU pool: the same template, no GPU asked for.
    cpu = _render({"image": "registry.example/cpt:cpu", "gpus": 0})
    assert cpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 0


def test_dockerfile_installs_the_wheel_as_a_non_root_user_with_a_scratch_volume():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE=cpu" in text and "FROM base-${BASE}" in text and "AS base-cuda" in text
    assert "deploy/install.sh" in text and "USER cpt" in text and 'VOLUME ["/scratch"]' in text
    assert "CPT_HOME=/opt/cpt" in text and "CPT_SCRATCH=/scratch" in text
    assert "pip install -e" not in text


@pytest.mark.slow  # builds a wheel and a venv
def test_the_image_install_steps_work_outside_the_checkout(tmp_path):
    """deploy/install.sh as the Dockerfile runs it, into a fresh venv in a temp folder: the wheel holds every
    subpackage, and `cpt validate` runs from the installed package (its dependencies are taken from this venv's
    site-packages by path, not installed again: no network here; the checkout is not on the path)."""
    import site

    import shutil

    # The build context as `docker build` sends it: the repository's files, copied (the Dockerfile's COPY).
    src = tmp_path / "src"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    done = subprocess.run(["sh", str(src / "deploy" / "install.sh"), str(src), str(py)], cwd=tmp_path,
                          env={**os.environ, "CPT_INSTALL_NO_DEPS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    target = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    # Dependencies by path only: a plain path entry does not run the editable install's .pth finder.
    with open(os.path.join(target, "zz_deps.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    probe = ("import tasks, tasks.ml.memory, tasks.core.config.tree, flows.cli, sys; "
             f"assert not tasks.__file__.startswith({str(ROOT)!r}), tasks.__file__; print(tasks.__file__)")
    done = subprocess.run([str(py), "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(venv) in done.stdout
    config = tmp_path / "c.yaml"
    config.write_text((ROOT / "configs" / "llama3.1-8b-fsdp-8gpu.yaml").read_text())
    done = subprocess.run([str(venv / "bin" / "cpt"), "validate", "--config", str(config)], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sharding: fsdp" in done.stdout
