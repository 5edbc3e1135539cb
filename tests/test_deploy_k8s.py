"""Kubernetes manifests and the Grafana dashboard: schema-valid, safe, and true to the code.

Every manifest document under deploy/k8s is validated against the Kubernetes OpenAPI
schemas bundled in the `kubernetes-validate` package, strictly (unknown fields are
errors), for one Kubernetes version. Then the structure Parley relies on is checked:
probes, resources, security contexts, secrets only from Secrets, the GPU, the Discord
shard count, the environment variable names, and the dashboard's metric names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "parley-dashboard.json"

# The Kubernetes version the manifests are validated against (strict schemas).
K8S_VERSION = "1.33.0"

# The contract with the bots: every Prometheus metric they export, with its labels.
PARLEY_METRICS: dict[str, set[str]] = {
    "parley_messages_received_total": {"platform"},
    "parley_messages_answered_total": {"platform"},
    "parley_errors_total": {"platform", "kind"},
    "parley_rate_limited_total": {"platform", "reason"},
    "parley_platform_rate_limited_total": {"platform"},
    "parley_replies_in_flight": {"platform"},
    "parley_time_to_first_token_seconds": {"platform"},
    "parley_reply_seconds": {"platform"},
}
PARLEY_HISTOGRAMS = {"parley_time_to_first_token_seconds", "parley_reply_seconds"}
# vLLM's metrics the dashboard must chart (at least one name of each group).
VLLM_PANELS: dict[str, set[str]] = {
    "running requests": {"vllm:num_requests_running"},
    "waiting requests": {"vllm:num_requests_waiting"},
    "KV-cache usage": {"vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"},
    "TTFT": {"vllm:time_to_first_token_seconds_bucket"},
    "prompt tokens": {"vllm:prompt_tokens_total"},
    "generation tokens": {"vllm:generation_tokens_total"},
    "prefix-cache hits": {"vllm:prefix_cache_hits_total"},
    "prefix-cache queries": {"vllm:prefix_cache_queries_total"},
}

# Variables the code reads that .env.example does not list yet, standard ones, and the
# ones third-party images read (redis-cli, vLLM's router).
NEW_VARIABLES = {
    "DISCORD_SHARD_COUNT",
    "DISCORD_SHARD_IDS",
    "REDIS_SENTINELS",
    "REDIS_SENTINEL_MASTER",
    "OPS_HOST",
    "OPS_PORT",
    "LOG_FORMAT",
}
STANDARD_VARIABLES = {"HOSTNAME", "HOME"}
THIRD_PARTY_VARIABLES = {"REDISCLI_AUTH", "VLLM_API_KEY"}
# Names whose values are secrets: they may only come from a Secret.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|AUTH|^REDIS_URL$")

BOTS_IMAGE = "ghcr.io/parley/bots:"
INFERENCE_IMAGE = "ghcr.io/parley/inference:"
OPS_PORT = 9464
BOTS_SHUTDOWN_GRACE_S = 20
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}

Doc = dict[str, Any]


def load_documents(path: Path) -> list[Doc]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def all_documents() -> list[tuple[Path, Doc]]:
    return [(path, doc) for path in manifest_files() for doc in load_documents(path)]


def kustomization() -> Doc:
    docs = load_documents(K8S / "kustomization.yaml")
    assert len(docs) == 1
    return docs[0]


def core_documents() -> list[Doc]:
    """The documents `kubectl apply -k deploy/k8s` creates."""
    resources: list[str] = kustomization()["resources"]
    return [doc for name in resources for doc in load_documents(K8S / name)]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} documents"
    return found[0]


def workloads(docs: list[Doc]) -> Iterator[Doc]:
    return (d for d in docs if d["kind"] in WORKLOAD_KINDS)


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Doc) -> list[Doc]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_id(workload: Doc, container: Doc) -> str:
    return f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"


def port_number(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert len(numbers) == 1, f"container {container['name']}: no port named {port}"
    number: int = numbers[0]
    return number


def documented_variables() -> set[str]:
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))


def config_maps(docs: list[Doc]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}


def environment(container: Doc, docs: list[Doc]) -> dict[str, Doc]:
    """Every variable a container gets: name -> its env entry (ConfigMap keys as values)."""
    maps = config_maps(docs)
    env: dict[str, Doc] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, "envFrom only from ConfigMaps (secrets one by one)"
        data = maps[source["configMapRef"]["name"]]
        env.update({name: {"name": name, "value": value} for name, value in data.items()})
    env.update({entry["name"]: entry for entry in container.get("env", [])})
    return env


# --- schema -------------------------------------------------------------------------------


def test_the_schema_version_is_bundled() -> None:
    versions = kubernetes_validate.utils.all_versions()
    assert K8S_VERSION in versions, f"kubernetes-validate ships {versions[0]}..{versions[-1]}"


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_is_valid_kubernetes(path: Path) -> None:
    docs = load_documents(path)
    assert docs, f"{path}: no documents"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: no apiVersion or kind"
        assert doc["metadata"].get("name"), f"{path}: a {doc['kind']} without a name"
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # A CRD (Prometheus Operator): not in the core schema; checked below.
            assert path.parent.name == "optional"
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_kustomization_lists_every_core_manifest_and_nothing_optional() -> None:
    k = kustomization()
    resources = k["resources"]
    assert len(resources) == len(set(resources))
    for name in resources:
        assert (K8S / name).is_file(), name
        assert "/" not in name, f"{name}: optional manifests stay out of the kustomization"
    top_level = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == top_level - {"secret.example.yaml"}
    assert k["namespace"] == "parley"
    for doc in core_documents():
        assert not doc["apiVersion"].startswith("monitoring.coreos.com/")
        assert doc["kind"] != "Secret", "the Secret template is applied by hand, never by -k"
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "parley"


def test_the_prometheus_operator_examples_scrape_the_named_ports() -> None:
    docs = load_documents(K8S / "optional" / "podmonitors.yaml")
    ports = {
        p["name"]
        for w in workloads(core_documents())
        for c in containers(w)
        for p in c.get("ports", [])
    }
    assert docs
    for doc in docs:
        assert doc["kind"] == "PodMonitor"
        for endpoint in doc["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


# --- structure ----------------------------------------------------------------------------


def test_every_container_has_resources_probes_and_a_locked_down_security_context() -> None:
    docs = core_documents()
    checked = 0
    for workload in workloads(docs):
        pod = pod_spec(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in containers(workload):
            where = container_id(workload, c)
            resources = c["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], where
            assert resources["limits"]["memory"], where
            assert "livenessProbe" in c and "readinessProbe" in c, where
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            assert sc.get("privileged") is not True, where
            checked += 1
    assert checked >= 6


def test_every_bot_serves_ops_probes_and_outlives_its_shutdown_grace() -> None:
    docs = core_documents()
    bots = {
        w["metadata"]["name"]: w
        for w in workloads(docs)
        if any(c["image"].startswith(BOTS_IMAGE) for c in containers(w))
    }
    assert set(bots) == {"discord", "telegram", "http", "chatwoot"}
    for name, workload in bots.items():
        pod = pod_spec(workload)
        assert pod["terminationGracePeriodSeconds"] > BOTS_SHUTDOWN_GRACE_S, name
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert {"/tmp", "/data"} <= mounts, name
        (bot,) = pod["containers"]
        assert bot["args"] == [name]
        live, ready = bot["livenessProbe"]["httpGet"], bot["readinessProbe"]["httpGet"]
        assert live["path"] == "/healthz" and port_number(bot, live["port"]) == OPS_PORT
        assert ready["path"] == "/readyz" and port_number(bot, ready["port"]) == OPS_PORT
        env = environment(bot, docs)
        assert env["OPS_HOST"]["value"] == "0.0.0.0"
        assert env["OPS_PORT"]["value"] == str(OPS_PORT)
        assert env["DATA_DIR"]["value"] == "/data"
        assert env["LOG_FORMAT"]["value"] == "json"
        assert env["LLM_BASE_URL"]["value"] == "http://inference:8000/v1"
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(OPS_PORT)
        assert any(
            d["kind"] == "PodDisruptionBudget"
            and d["spec"]["selector"]["matchLabels"].items()
            <= workload["spec"]["template"]["metadata"]["labels"].items()
            for d in docs
        ), f"{name}: no PodDisruptionBudget"


def test_secrets_come_only_from_secrets() -> None:
    docs = core_documents()
    template = load_documents(K8S / "secret.example.yaml")
    (secret,) = template
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "parley-secrets"
    for value in secret["stringData"].values():
        assert "CHANGE-ME" in value, "the template holds placeholders only"
    for name, data in config_maps(docs).items():
        for key in data:
            assert not SECRET_NAME.search(key), f"ConfigMap {name} holds the secret {key}"
    seen = set()
    for workload in workloads(docs):
        for c in containers(workload):
            for entry in c.get("env", []):
                if not SECRET_NAME.search(entry["name"]):
                    continue
                where = f"{container_id(workload, c)}: {entry['name']}"
                assert "value" not in entry, where
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "parley-secrets", where
                assert ref["key"] in secret["stringData"], where
                seen.add(entry["name"])
            assert "--requirepass" not in " ".join(c.get("command", []))
    assert {"DISCORD_TOKEN", "TELEGRAM_TOKEN", "TELEGRAM_WEBHOOK_SECRET", "REDIS_URL"} <= seen


def test_every_variable_is_documented_or_part_of_the_contract() -> None:
    docs = core_documents()
    known = documented_variables() | NEW_VARIABLES | STANDARD_VARIABLES | THIRD_PARTY_VARIABLES
    assert {"REDIS_URL", "LLM_BASE_URL", "TELEGRAM_WEBHOOK_URL"} <= documented_variables()
    names = {key for data in config_maps(docs).values() for key in data}
    for workload in workloads(docs):
        for c in containers(workload):
            names |= set(environment(c, docs))
    unknown = names - known
    assert not unknown, f"not in .env.example nor the contract: {sorted(unknown)}"


def test_the_engines_get_a_gpu_each_behind_the_session_router() -> None:
    docs = core_documents()
    engine = named(docs, "Deployment", "inference-engine")
    assert engine["spec"]["replicas"] >= 2
    (c,) = pod_spec(engine)["containers"]
    assert c["image"].startswith(INFERENCE_IMAGE)
    assert c["command"] == ["python", "-m", "inference", "serve"]
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert str(c["resources"]["requests"]["nvidia.com/gpu"]) == "1"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
        assert port_number(c, c[probe]["httpGet"]["port"]) == 8000
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model load"
    env = environment(c, docs)
    assert env["INFERENCE_HOST"]["value"] == "0.0.0.0"
    assert env["INFERENCE_PORT"]["value"] == "8000"
    volumes = {v["name"]: v for v in pod_spec(engine)["volumes"]}
    assert any("persistentVolumeClaim" in v for v in volumes.values()), "model volume"

    router = named(docs, "Deployment", "inference-router")
    (r,) = pod_spec(router)["containers"]
    args = r["args"]
    flag = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert flag["--routing-logic"] == "session"
    assert flag["--session-key"].lower() == "x-session-id"
    assert flag["--service-discovery"] == "k8s"
    selector = dict(s.split("=") for s in flag["--k8s-label-selector"].split(","))
    assert selector.items() <= engine["spec"]["template"]["metadata"]["labels"].items()
    assert pod_spec(router)["serviceAccountName"] == "inference-router"

    service = named(docs, "Service", "inference")
    assert (
        service["spec"]["selector"].items()
        <= router["spec"]["template"]["metadata"]["labels"].items()
    )
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]


def test_the_discord_shards_match_the_replicas() -> None:
    docs = core_documents()
    discord = named(docs, "StatefulSet", "discord")
    (bot,) = pod_spec(discord)["containers"]
    env = environment(bot, docs)
    assert int(env["DISCORD_SHARD_COUNT"]["value"]) == discord["spec"]["replicas"]
    assert env["DISCORD_SHARD_IDS"]["value"] == "ordinal"
    service = named(docs, "Service", discord["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"


def test_telegram_runs_webhooks_on_replicas_and_http_on_any_pod() -> None:
    docs = core_documents()
    telegram = named(docs, "Deployment", "telegram")
    assert telegram["spec"]["replicas"] == 3
    (bot,) = pod_spec(telegram)["containers"]
    env = environment(bot, docs)
    assert env["TELEGRAM_WEBHOOK_URL"]["value"].startswith("https://")
    assert env["TELEGRAM_WEBHOOK_URL"]["value"].endswith("/telegram")
    assert port_number(bot, "webhook") == int(env["TELEGRAM_WEBHOOK_PORT"]["value"])
    assert "secretKeyRef" in env["TELEGRAM_WEBHOOK_SECRET"]["valueFrom"]

    http = named(docs, "Deployment", "http")
    assert http["spec"]["replicas"] >= 2
    service = named(docs, "Service", "http")
    assert "sessionAffinity" not in service["spec"], "any pod serves any conversation"
    ingress = load_documents(K8S / "optional" / "ingress-http.yaml")[0]
    assert "nginx.ingress.kubernetes.io/upstream-hash-by" not in ingress["metadata"]["annotations"]


def test_every_service_selects_a_workload_and_names_its_ports() -> None:
    docs = core_documents()
    for service in (d for d in docs if d["kind"] == "Service"):
        name = service["metadata"]["name"]
        targets = [
            w
            for w in workloads(docs)
            if service["spec"]["selector"].items()
            <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, f"Service {name} selects {len(targets)} workloads"
        ports = {p["name"] for c in containers(targets[0]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name}: {port['targetPort']}"


def test_references_resolve() -> None:
    docs = core_documents()
    maps = config_maps(docs)
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    for workload in workloads(docs):
        pod = pod_spec(workload)
        if "serviceAccountName" in pod:
            assert pod["serviceAccountName"] in accounts
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        templates = {
            t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
        }
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
        for c in containers(workload):
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in maps
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates


# --- dashboard ----------------------------------------------------------------------------


def dashboard() -> Doc:
    data: Doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panel_exprs(panels: list[Doc]) -> Iterator[tuple[str, str]]:
    for panel in panels:
        yield from panel_exprs(panel.get("panels", []))
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:parley_|vllm:)[A-Za-z0-9_:]+", expr))


def base_metric(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        stem = name.removesuffix(suffix)
        if stem != name and stem in PARLEY_HISTOGRAMS:
            return stem
    return name


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 39
    assert d["uid"] and d["title"]
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for panel in d["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]


def test_the_dashboard_charts_every_parley_metric_and_only_those() -> None:
    used: dict[str, set[str]] = {}
    for title, expr in panel_exprs(dashboard()["panels"]):
        for name in metric_names(expr):
            if name.startswith("parley_"):
                used.setdefault(base_metric(name), set()).add(title)
    unknown = set(used) - set(PARLEY_METRICS)
    assert not unknown, f"not exported by the bots: {sorted(unknown)}"
    assert set(used) == set(PARLEY_METRICS), f"missing: {set(PARLEY_METRICS) - set(used)}"
    for name in PARLEY_HISTOGRAMS:
        quantiles = [
            expr
            for _, expr in panel_exprs(dashboard()["panels"])
            if f"{name}_bucket" in expr and "histogram_quantile" in expr
        ]
        assert {q.split(",")[0] for q in quantiles} >= {
            "histogram_quantile(0.5",
            "histogram_quantile(0.95",
            "histogram_quantile(0.99",
        }, name


def test_the_dashboard_groups_by_labels_the_bots_export() -> None:
    for title, expr in panel_exprs(dashboard()["panels"]):
        names = {base_metric(n) for n in metric_names(expr) if n.startswith("parley_")}
        if not names:
            continue
        labels = set.intersection(*(PARLEY_METRICS[n] for n in names)) | {"le"}
        for group in re.findall(r"by \(([^)]*)\)", expr):
            grouped = {g.strip() for g in group.split(",")}
            assert grouped <= labels, f"{title}: by ({group})"


def test_the_dashboard_has_the_vllm_panels() -> None:
    used = {n for _, expr in panel_exprs(dashboard()["panels"]) for n in metric_names(expr)}
    missing = [panel for panel, names in VLLM_PANELS.items() if not names & used]
    assert not missing, f"no vLLM panel for: {missing}"
    exprs = [expr for _, expr in panel_exprs(dashboard()["panels"])]
    assert any(
        "vllm:prefix_cache_hits_total" in e and "vllm:prefix_cache_queries_total" in e
        for e in exprs
    ), "the prefix-cache hit rate is hits / queries"
    assert any(
        "histogram_quantile(0.99" in e and "vllm:time_to_first_token_seconds_bucket" in e
        for e in exprs
    )
