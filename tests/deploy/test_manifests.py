"""The deployment files (``deploy/``) are valid and agree with the application.

The Kubernetes manifests are validated against the API schemas that
``kubernetes-validate`` ships (no cluster), then checked against the code: the
probes name real routes, the commands are real ``nbo`` commands and options, every
``NBO_*`` variable is a setting, ports, labels and the shutdown budget line up. The
compose file is checked the same way as parsed YAML (no Docker daemon).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import typer.main
import yaml
from starlette.routing import Match

from service.app import create_app
from service.cli.main import app as cli_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
# The oldest Kubernetes still commonly run that has every field used here.
KUBERNETES_VERSION = "1.30.0"
NOT_MANIFESTS = {"kustomization.yaml"}
EXAMPLE_ONLY = {"secret.example.yaml"}

Doc = dict[str, Any]


def _documents(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name not in NOT_MANIFESTS)


def _manifests() -> list[tuple[str, Doc]]:
    return [(path.name, doc) for path in _manifest_files() for doc in _documents(path)]


def _one(kind: str) -> Doc:
    found = [doc for name, doc in _manifests() if doc["kind"] == kind and name not in EXAMPLE_ONLY]
    assert len(found) == 1, f"expected one {kind} among the manifests, found {len(found)}"
    return found[0]


def _container(workload: Doc) -> Doc:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per pod"
    container: Doc = containers[0]
    return container


def _serve_container() -> Doc:
    return _container(_one("Deployment"))


def _check_nbo_command(argv: list[str]) -> None:
    """``argv`` is an ``nbo`` command line whose subcommand and options all exist."""
    assert argv[0] == "nbo", argv
    command: Any = typer.main.get_command(cli_app)
    path: list[str] = []
    for word in argv[1:]:  # descend groups; what remains are options and their values
        children = getattr(command, "commands", None)
        if not children or word.startswith("-"):
            break
        assert word in children, f"`nbo {' '.join(path)}` has no command {word!r}"
        path.append(word)
        command = children[word]
    assert not getattr(command, "commands", None), f"`nbo {' '.join(path)}` is a group"
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in argv[1:]:
        if word.startswith("-"):
            assert word in options, f"`nbo {' '.join(path)}` has no option {word}"


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _is_get_route(path: str) -> bool:
    app = create_app(Settings(_env_file=None))  # type: ignore[call-arg]
    scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "headers": []}
    return any(route.matches(scope)[0] is Match.FULL for route in app.router.routes)


def _quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (``100m``, ``1``, ``512Mi``, ``2G``) as a number."""
    units = {
        "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    }  # fmt: skip
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match and match.group(2) in units, f"unreadable quantity {value!r}"
    return float(match.group(1)) * units[match.group(2)]


def _env_names(container: Doc) -> list[str]:
    return [item["name"] for item in container.get("env", [])]


# ---------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_every_manifest_is_valid_for_kubernetes(path: Path) -> None:
    """Each document validates strictly (no unknown field) against the API schema."""
    documents = _documents(path)
    assert documents, f"{path.name} holds no manifest"
    for doc in documents:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kustomization = _documents(K8S / "kustomization.yaml")[0]
    expected = {p.name for p in _manifest_files()} - EXAMPLE_ONLY
    assert sorted(kustomization["resources"]) == sorted(expected)
    images = {image["name"] for image in kustomization.get("images", [])}
    used = {
        _serve_container()["image"].split(":")[0],
        _container(_one("Job"))["image"].split(":")[0],
    }
    assert used <= images, "the images: entry must retag every image the manifests use"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_builds_the_manifests() -> None:
    """``kubectl kustomize`` (offline) renders the whole set."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(out.stdout) if doc)
    assert kinds == ["ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Service"]


def test_probes_call_real_routes() -> None:
    container = _serve_container()
    probes = {
        name: container[name]["httpGet"]
        for name in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes["readinessProbe"]["path"] == "/health/ready"
    assert probes["livenessProbe"]["path"] == "/health/live"
    for name, probe in probes.items():
        assert _is_get_route(probe["path"]), f"{name} calls {probe['path']}, not a GET route"
        port = probe["port"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert port in ports or port in ports.values(), f"{name} probes port {port!r}"
    startup = container["startupProbe"]
    # Loading a large bank takes about a minute (README, Benchmarks): allow several.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180


def test_service_routes_to_the_serving_port_and_pods() -> None:
    deployment, service, job = _one("Deployment"), _one("Service"), _one("Job")
    container = _serve_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (service_port,) = service["spec"]["ports"]
    target = service_port["targetPort"]
    assert ports.get(target, target) in ports.values(), (
        f"targetPort {target!r} is no container port"
    )
    serve_port = int(_option(container["command"], "--port"))
    assert ports.get(target, target) == serve_port, "the Service must reach the port nbo listens on"
    assert _option(container["command"], "--host") == "0.0.0.0"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == serve_port
    assert _is_get_route(annotations["prometheus.io/path"])
    selector = service["spec"]["selector"].items()
    assert selector <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert not selector <= job["spec"]["template"]["metadata"]["labels"].items(), (
        "the Service must not send requests to the migration pod"
    )


def test_deployment_serves_without_migrating_and_rolls_safely() -> None:
    deployment = _one("Deployment")
    command = _serve_container()["command"]
    assert command[:2] == ["nbo", "serve"]
    assert "--no-migrate" in command, "the migration Job migrates; replicas must not"
    _check_nbo_command(command)
    assert deployment["spec"]["replicas"] >= 2
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1


def test_migration_job_runs_db_upgrade() -> None:
    job = _one("Job")
    container = _container(job)
    assert container["command"] == ["nbo", "db", "upgrade"]
    _check_nbo_command(container["command"])
    assert job["spec"]["backoffLimit"] >= 1
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    assert "NBO_DATABASE_URL" in _env_names(container)


def test_grace_period_covers_the_prestop_sleep_and_the_shutdown_timeout() -> None:
    deployment = _one("Deployment")
    config = _one("ConfigMap")["data"]
    default = Settings.model_fields["shutdown_timeout_seconds"].default
    shutdown = float(config.get("NBO_SHUTDOWN_TIMEOUT_SECONDS", default))
    pre_stop = _serve_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(pre_stop[1]) + shutdown, (
        f"grace {grace} s <= preStop {pre_stop[1]} s + shutdown timeout {shutdown} s"
    )


def test_every_nbo_variable_is_a_setting_with_a_valid_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Names of ConfigMap keys and container variables are Settings fields, and the
    ConfigMap's values parse (a typo would be ignored silently by pydantic-settings)."""
    fields = set(Settings.model_fields)
    config = _one("ConfigMap")["data"]
    names = set(config)
    for workload in (_one("Deployment"), _one("Job")):
        names |= set(_env_names(_container(workload)))
    assert names, "no variables found"
    for name in sorted(names):
        assert name.startswith("NBO_"), name
        assert name.removeprefix("NBO_").lower() in fields, f"{name} is not a setting"
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    Settings(_env_file=None)  # type: ignore[call-arg]


def test_database_url_comes_from_the_secret() -> None:
    (secret,) = _documents(K8S / "secret.example.yaml")
    for workload in (_one("Deployment"), _one("Job")):
        env = {item["name"]: item for item in _container(workload).get("env", [])}
        ref = env["NBO_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    assert "NBO_DATABASE_URL" not in _one("ConfigMap")["data"]
    assert "CHANGE-ME" in secret["stringData"]["url"], "the example must hold no real password"


def test_resources_requests_at_most_limits() -> None:
    for workload in (_one("Deployment"), _one("Job")):
        container = _container(workload)
        requests = container["resources"]["requests"]
        limits = container["resources"]["limits"]
        assert {"cpu", "memory"} <= requests.keys() and "memory" in limits
        for resource in requests.keys() & limits.keys():
            assert _quantity(requests[resource]) <= _quantity(limits[resource]), (
                f"{container['name']}: {resource} request {requests[resource]} "
                f"> limit {limits[resource]}"
            )


def test_pod_runs_as_the_image_user_on_a_read_only_root() -> None:
    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _serve_container()
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's nbo user
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in pod["volumes"]}
    data_dir = _one("ConfigMap")["data"]["NBO_DATA_DIR"]
    assert data_dir in mounts, "NBO_DATA_DIR must be a writable volume"
    assert "/tmp" in mounts, "the multiprocess metrics and temporary files need /tmp"
    assert set(mounts.values()) <= volumes


def test_disruption_budget_selects_the_deployment_pods() -> None:
    deployment, pdb = _one("Deployment"), _one("PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels
    assert 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]


# ---------------------------------------------------------------- compose


def _compose() -> Doc:
    compose: Doc = yaml.safe_load(COMPOSE.read_text())
    return compose


def _service_env(service: Doc) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def test_compose_services_start_in_order() -> None:
    services = _compose()["services"]
    assert {"nbo", "migrate", "postgres", "prometheus", "grafana"} <= services.keys()
    nbo, migrate, postgres = services["nbo"], services["migrate"], services["postgres"]
    assert nbo["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert nbo["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert migrate["command"] == ["nbo", "db", "upgrade"]
    _check_nbo_command(migrate["command"])
    assert nbo["command"][:2] == ["nbo", "serve"] and "--no-migrate" in nbo["command"]
    _check_nbo_command(nbo["command"])
    for name in ("nbo", "migrate"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == REPO / "Dockerfile"


def test_compose_images_are_pinned() -> None:
    for name, service in _compose()["services"].items():
        image = service.get("image", "")
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: image {image!r} has no tag"
        assert not image.endswith(":latest"), f"{name}: {image} is not pinned"


def test_compose_mounts_exist_in_the_repository() -> None:
    """Bind mounts are relative to deploy/; each must name a file or folder there."""
    compose = _compose()
    binds = 0
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                binds += 1
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    assert binds >= 3


def test_compose_settings_ports_and_wiring() -> None:
    services = _compose()["services"]
    fields = set(Settings.model_fields)
    for name in ("nbo", "migrate"):
        for variable in _service_env(services[name]):
            assert variable.removeprefix("NBO_").lower() in fields, f"{variable} is not a setting"
    nbo = services["nbo"]
    env = _service_env(nbo)
    assert urlsplit(env["NBO_DATABASE_URL"]).hostname == "postgres"
    assert env["NBO_DATABASE_URL"] == _service_env(services["migrate"])["NBO_DATABASE_URL"]
    port = _option(nbo["command"], "--port")
    assert _option(nbo["command"], "--host") == "0.0.0.0"
    assert any(mapping.endswith(f":{port}") for mapping in nbo["ports"])
    # Prometheus scrapes the nbo service on its port, unless /metrics needs a key.
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    ]
    assert f"nbo:{port}" in targets
    if not any("authorization" in job for job in scrape["scrape_configs"]):
        assert env.get("NBO_OPS_ENDPOINTS") == "open", "Prometheus would be refused /metrics"
    # Grafana's datasource is the prometheus service; its dashboards folder holds nbo.json.
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert urlsplit(source["url"]).hostname == "prometheus"
    dashboard = json.loads((DEPLOY / "grafana" / "nbo.json").read_text())
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "datasource":  # picks the default source of its type
            assert variable["query"] == source["type"] and source["isDefault"] is True
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "nbo.yaml").read_text())[
        "providers"
    ]
    dashboard_mounts = [
        v.split(":")[1]
        for v in services["grafana"]["volumes"]
        if v.startswith("./grafana/nbo.json")
    ]
    assert [str(Path(m).parent) for m in dashboard_mounts] == [provider["options"]["path"]]
    grace = float(re.fullmatch(r"(\d+)s", nbo["stop_grace_period"]).group(1))  # type: ignore[union-attr]
    assert grace > float(env["NBO_SHUTDOWN_TIMEOUT_SECONDS"])


def _docker_compose() -> list[str] | None:
    """The Compose v2 client (``docker compose``), if installed; v1 reads another spec."""
    if shutil.which("docker") is None:
        return None
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return ["docker", "compose"] if probe.returncode == 0 else None


@pytest.mark.skipif(_docker_compose() is None, reason="no docker compose client")
def test_compose_file_passes_docker_compose_config() -> None:
    """The compose client's own check (no daemon needed for `config`)."""
    client = _docker_compose()
    assert client is not None
    out = subprocess.run(
        [*client, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
