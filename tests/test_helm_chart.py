"""The Helm chart ``helm/fedprint``, checked by the real Helm engine (helm-python-sdk embeds Helm's
Go SDK) and validated against the Kubernetes 1.30 schemas (kubernetes-validate, strict), in the four
configurations operators run: the defaults, GPU shards, a sharded gallery, an external PostgreSQL.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from federation.config import CoordinatorConfig
from federation.policy import ThreatPolicy
from ice_service.config import IceConfig
from nodes.gallery.config import NodeConfig

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "fedprint"
KUBERNETES = "1.30.0"
RELEASE, NAMESPACE = "prod", "fedprint"

GPU_SHARDS = {
    "gpu": 1,
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu": {
        "cudaImage": {"tag": "0.1.0-cuda12"},
        "gallery": {"iafis": {"shards": GPU_SHARDS}, "ident": {"shards": GPU_SHARDS}},
    },
    "sharded": {
        "gallery": {"iafis": {"shards": {"count": 3, "replicas": 2}}, "ident": {"shards": {"count": 2}}},
        # With traces to a collector, and the egress to reach it.
        "tracing": {"endpoint": "http://otel-collector.observability:4317", "sampleRatio": 0.25},
        "networkPolicy": {
            "extraEgress": [
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "observability"}
                            }
                        }
                    ],
                    "ports": [{"port": 4317, "protocol": "TCP"}],
                }
            ]
        },
    },
    "external-postgresql": {
        "postgresql": {"enabled": False},
        "externalDatabase": {
            "existingSecret": "fedprint-database-urls",
            "peers": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
        },
        "coordinator": {
            "bookingKey": {"existingSecret": "fedprint-booking-key", "key": "key.hex"},
            "auditKey": {"existingSecret": "fedprint-audit-key", "key": "key.hex"},
            "auditCheckpoints": {"existingClaim": "fedprint-audit-checkpoints"},
        },
    },
}


class _NoDuplicateKeys(yaml.SafeLoader):
    """A YAML loader that refuses a mapping with a key twice, as the Kubernetes API server does."""


def _mapping(loader: _NoDuplicateKeys, node: yaml.MappingNode) -> dict[Any, Any]:
    keys = [loader.construct_object(k) for k, _ in node.value]
    duplicated = {k for k in keys if keys.count(k) > 1}
    if duplicated:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicated}", node.start_mark)
    return loader.construct_mapping(node)


_NoDuplicateKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


@dataclass(frozen=True)
class Manifest:
    template: str
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])

    def __repr__(self) -> str:
        return f"{self.kind}/{self.name}"


@functools.cache
def chart() -> helm.Chart:
    helm.disable_logging()
    return helm.Chart.load(CHART)


@functools.cache
def render(configuration: str) -> tuple[Manifest, ...]:
    """Every object the chart renders for a configuration (parsed refusing duplicate keys)."""
    values = CONFIGURATIONS[configuration]
    rendered = chart().render(values, name=RELEASE, namespace=NAMESPACE)
    return tuple(
        Manifest(template, doc)
        for template, text in sorted(rendered.items())
        if template.endswith(".yaml")
        for doc in yaml.load_all(text, Loader=_NoDuplicateKeys)
        if doc
    )


def of_kind(manifests: tuple[Manifest, ...], *kinds: str) -> list[Manifest]:
    return [m for m in manifests if m.kind in kinds]


def pod_spec(m: Manifest) -> dict[str, Any]:
    return dict(m.doc["spec"]["template"]["spec"])


def pod_labels(m: Manifest) -> dict[str, str]:
    return dict(m.doc["spec"]["template"]["metadata"]["labels"])


def workloads(manifests: tuple[Manifest, ...]) -> list[Manifest]:
    return of_kind(manifests, "Deployment", "StatefulSet")


def containers(manifests: tuple[Manifest, ...]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    for w in workloads(manifests):
        spec = pod_spec(w)
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            yield w, c


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels and In/NotIn/Exists) selects ``labels``."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and labels.get(key) in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


def component(w: Manifest) -> str:
    return pod_labels(w)["app.kubernetes.io/component"]


def config_of(manifests: tuple[Manifest, ...], w: Manifest) -> dict[str, Any]:
    """The config.yaml a fedprint workload mounts from its ConfigMap."""
    volume = next(v for v in pod_spec(w)["volumes"] if v["name"] == "config")
    cm = next(m for m in of_kind(manifests, "ConfigMap") if m.name == volume["configMap"]["name"])
    loaded = yaml.safe_load(cm.doc["data"]["config.yaml"])
    assert isinstance(loaded, dict)
    return loaded


def fedprint_workloads(manifests: tuple[Manifest, ...]) -> list[Manifest]:
    return [w for w in workloads(manifests) if component(w) != "postgresql"]


parametrize_configurations = pytest.mark.parametrize("configuration", list(CONFIGURATIONS))


# -- the Helm engine and the Kubernetes schemas -----------------------------------------------------


@parametrize_configurations
def test_helm_lint_is_clean(configuration: str) -> None:
    report = helm.lint(CHART, CONFIGURATIONS[configuration], strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 (info) is only "icon is recommended".
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@parametrize_configurations
def test_every_manifest_passes_the_kubernetes_schemas_strictly(configuration: str) -> None:
    manifests = render(configuration)
    assert len(manifests) > 30
    for m in manifests:
        try:
            kubernetes_validate.validate(m.doc, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as error:  # pragma: no cover - the failure message
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{m!r} ({m.template}) is invalid at {path}: {error.message}")
        # A kind without a schema raises SchemaNotFoundError here, and fails the test too.


@parametrize_configurations
def test_the_values_pass_the_chart_schema(configuration: str) -> None:
    chart().validate_schema(CONFIGURATIONS[configuration])


# -- properties every configuration must have -------------------------------------------------------


@parametrize_configurations
def test_every_container_has_probes_and_resources(configuration: str) -> None:
    for w, c in containers(render(configuration)):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in c, f"{w!r}/{c['name']} has no {probe}"
        assert c["resources"]["requests"] and c["resources"]["limits"], f"{w!r}/{c['name']}"
        assert {"cpu", "memory"} <= set(c["resources"]["limits"]), f"{w!r}/{c['name']}"


@parametrize_configurations
def test_fedprint_probes_ask_grpc_health_on_the_plaintext_port(configuration: str) -> None:
    services = {
        "coordinator": "fedprint.booking.v1.BookingService",
        "router": "fedprint.gallery.v1.GalleryService",
        "shard": "fedprint.gallery.v1.GalleryService",
        "ice": "fedprint.ice.v1.IceNotificationService",
    }
    manifests = render(configuration)
    for w in fedprint_workloads(manifests):
        (c,) = pod_spec(w)["containers"]
        health = next(p["containerPort"] for p in c["ports"] if p["name"] == "health")
        assert config_of(manifests, w)["health_listen"].endswith(f":{health}")
        assert c["readinessProbe"]["grpc"] == {"port": health, "service": services[component(w)]}
        assert c["livenessProbe"]["grpc"] == {"port": health}
    shard = next(w for w in fedprint_workloads(manifests) if component(w) == "shard")
    startup = pod_spec(shard)["containers"][0]["startupProbe"]
    # A shard loading a large gallery gets half an hour before liveness counts.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800


@parametrize_configurations
def test_no_container_runs_as_root_or_writes_its_image(configuration: str) -> None:
    for w in workloads(render(configuration)):
        pod = pod_spec(w)["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0 and pod["runAsGroup"] != 0, repr(w)
        assert pod["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod_spec(w)["automountServiceAccountToken"] is False
        for c in pod_spec(w)["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc.get("runAsUser", 1) != 0
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert sc.get("privileged", False) is False


@parametrize_configurations
def test_every_pod_is_selected_by_a_network_policy_that_opens_its_port(configuration: str) -> None:
    manifests = render(configuration)
    policies = of_kind(manifests, "NetworkPolicy")
    deny = next(p for p in policies if p.name.endswith("-default-deny"))
    assert "ingress" not in deny.doc["spec"] and "egress" not in deny.doc["spec"]
    for w in workloads(manifests):
        labels = pod_labels(w)
        assert selects(deny.doc["spec"]["podSelector"], labels), f"{w!r} escapes the default deny"
        main_port = next(p["containerPort"] for p in pod_spec(w)["containers"][0]["ports"])
        opening = [
            p
            for p in policies
            if selects(p.doc["spec"]["podSelector"], labels)
            and any(
                port["port"] == main_port
                for rule in p.doc["spec"].get("ingress", [])
                for port in rule["ports"]
            )
        ]
        assert opening, f"no NetworkPolicy lets anything reach {w!r} on {main_port}"


@parametrize_configurations
def test_network_policies_allow_only_the_calls_of_the_design(configuration: str) -> None:
    manifests = render(configuration)
    grpc_port = 50051
    pods = {
        (component(w), pod_labels(w).get("fedprint.io/node")): pod_labels(w) for w in workloads(manifests)
    }

    def callers(target: tuple[str, str | None]) -> set[tuple[str, str | None]]:
        """Which of the release's pods may open the target's gRPC port (by ingress rules)."""
        found: set[tuple[str, str | None]] = set()
        for p in of_kind(manifests, "NetworkPolicy"):
            if not selects(p.doc["spec"]["podSelector"], pods[target]):
                continue
            for rule in p.doc["spec"].get("ingress", []):
                if not any(port["port"] == grpc_port for port in rule["ports"]):
                    continue
                for peer in rule.get("from", [{"podSelector": {}}]):  # no "from": from anywhere
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        found |= {k for k, labels in pods.items() if selects(peer["podSelector"], labels)}
        return found - {target} if target[0] != "coordinator" else found

    assert callers(("router", "iafis")) == {("coordinator", None)}
    assert callers(("router", "ident")) == {("coordinator", None)}
    assert callers(("shard", "iafis")) == {("router", "iafis")}
    assert callers(("shard", "ident")) == {("router", "ident")}
    assert callers(("ice", None)) == {("coordinator", None)}
    if configuration != "external-postgresql":
        db = next(p for p in of_kind(manifests, "NetworkPolicy") if p.name.endswith("-postgresql"))
        (rule,) = db.doc["spec"]["ingress"]
        (peer,) = rule["from"]
        allowed = {k for k, labels in pods.items() if selects(peer["podSelector"], labels)}
        assert {k[0] for k in allowed} == {"coordinator", "shard", "ice"}  # routers keep no data


@parametrize_configurations
def test_gpus_are_requested_by_shards_only(configuration: str) -> None:
    manifests = render(configuration)
    with_gpu = []
    for w, c in containers(manifests):
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        if "nvidia.com/gpu" in limits or "nvidia.com/gpu" in requests:
            assert component(w) == "shard", f"{w!r} asks for a GPU"
            assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == 1
            assert c["image"] == "fedprint-cuda:0.1.0-cuda12"
            assert config_of(manifests, w)["device"] == "cuda"
            assert pod_spec(w)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert pod_spec(w)["tolerations"][0]["key"] == "nvidia.com/gpu"
            with_gpu.append(w)
        else:
            assert c["image"].split(":")[0] != "fedprint-cuda"
    shards = [w for w in workloads(manifests) if component(w) == "shard"]
    assert with_gpu == (shards if configuration == "gpu" else [])


@parametrize_configurations
def test_services_configs_load_with_the_services_own_settings(
    configuration: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart and the settings classes cannot drift apart: each rendered config.yaml loads as
    the service loads it (``--config``, under the container's environment, which gives each shard
    StatefulSet its partition)."""
    manifests = render(configuration)
    settings = {"coordinator": CoordinatorConfig, "ice": IceConfig, "router": NodeConfig, "shard": NodeConfig}
    for w in fedprint_workloads(manifests):
        config = config_of(manifests, w)
        (c,) = pod_spec(w)["containers"]
        path = tmp_path / f"{w.name}.yaml"
        path.write_text(yaml.safe_dump(config))
        with monkeypatch.context() as env:
            for variable in c.get("env", []):
                if variable["name"].startswith("FEDPRINT_") and "value" in variable:
                    env.setenv(variable["name"], variable["value"])
            loaded = settings[component(w)].load(path)
        assert loaded.tls is not None
        if isinstance(loaded, NodeConfig):
            assert loaded.role == component(w)
            if loaded.role == "shard":
                assert loaded.shard is not None and loaded.shard.index == int(
                    w.doc["metadata"]["labels"]["fedprint.io/shard"]
                )
            else:
                assert loaded.shards and loaded.shard is None
        # Every file the config names is mounted: TLS files from the identity's Secret, the
        # database URL from its Secret.
        mounted = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
        for path in (loaded.tls.ca, loaded.tls.cert, loaded.tls.key):
            volume = volumes[mounted[str(path.parent)]]
            assert path.name in {item["path"] for item in volume["secret"]["items"]}, path
        # The CA's revocation list from an optional ConfigMap: absent, nothing is revoked.
        assert loaded.tls.crl is not None
        crl = volumes[mounted[str(loaded.tls.crl.parent)]]["configMap"]
        assert crl["name"] == f"{RELEASE}-fedprint-crl" and crl["optional"] is True
        assert {item["path"] for item in crl["items"]} == {loaded.tls.crl.name}
        # A router too: it keeps what it returned to whom in the node's database.
        assert loaded.database_url_file is not None
        volume = volumes[mounted[str(loaded.database_url_file.parent)]]
        expected = (
            "fedprint-database-urls"
            if configuration == "external-postgresql"
            else f"{RELEASE}-fedprint-database"
        )
        assert volume["secret"]["secretName"] == expected
        # No secret value sits in a ConfigMap.
        assert "database_url" not in config and "password" not in json.dumps(config)


@parametrize_configurations
def test_keys_come_from_secrets_never_from_the_data_volume(configuration: str) -> None:
    """A copy of a data volume (or of the database) opens no sealed booking and re-chains no audit
    log: every key file a service reads is mounted, read-only, from a Secret of its own."""
    manifests = render(configuration)
    for w in fedprint_workloads(manifests):
        config = config_of(manifests, w)
        (c,) = pod_spec(w)["containers"]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
        keys = [config[k] for k in ("booking_key_file", "audit_key_file") if k in config]
        keys += [config["tls"]["key"]]
        if component(w) == "coordinator":
            assert len(keys) == 3
        for key in keys:
            assert not key.startswith(config["data_dir"] + "/"), key
            mount = mounts[str(Path(key).parent)]
            assert mount["readOnly"] is True and mount["name"] != "data", key
            secret = volumes[mount["name"]]["secret"]
            assert secret["defaultMode"] == 0o400 and Path(key).name in {i["path"] for i in secret["items"]}


@parametrize_configurations
def test_services_select_their_pods_and_name_real_ports(configuration: str) -> None:
    manifests = render(configuration)
    for svc in of_kind(manifests, "Service"):
        matched = [
            w
            for w in workloads(manifests)
            if selects({"matchLabels": svc.doc["spec"]["selector"]}, pod_labels(w))
        ]
        assert matched, f"{svc!r} selects no pod"
        for w in matched:
            names = {p["name"] for c in pod_spec(w)["containers"] for p in c["ports"]}
            assert {p["targetPort"] for p in svc.doc["spec"]["ports"]} <= names, repr(svc)
    for pdb in of_kind(manifests, "PodDisruptionBudget"):
        assert any(selects(pdb.doc["spec"]["selector"], pod_labels(w)) for w in workloads(manifests)), repr(
            pdb
        )


@parametrize_configurations
def test_the_metrics_port_is_exposed_and_announced(configuration: str) -> None:
    manifests = render(configuration)
    for w in fedprint_workloads(manifests):
        (c,) = pod_spec(w)["containers"]
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
        assert config_of(manifests, w)["metrics_listen"].endswith(f":{port}")
        annotations = w.doc["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(port)


# -- each configuration's own shape -----------------------------------------------------------------


def test_default_deploys_every_part_with_an_autoscaled_coordinator() -> None:
    manifests = render("default")
    names = {repr(m) for m in manifests}
    for expected in (
        "Deployment/prod-fedprint-coordinator",
        "HorizontalPodAutoscaler/prod-fedprint-coordinator",
        "Deployment/prod-fedprint-iafis-router",
        "Deployment/prod-fedprint-ident-router",
        "StatefulSet/prod-fedprint-iafis-shard-0",
        "StatefulSet/prod-fedprint-ident-shard-0",
        "Deployment/prod-fedprint-ice",
        "StatefulSet/prod-fedprint-postgresql",
        "ConfigMap/prod-fedprint-coordinator-policy",
        "Secret/prod-fedprint-booking-key",
    ):
        assert expected in names
    coordinator = next(m for m in manifests if repr(m) == "Deployment/prod-fedprint-coordinator")
    assert "replicas" not in coordinator.doc["spec"]  # the autoscaler owns it
    hpa = next(m for m in of_kind(manifests, "HorizontalPodAutoscaler"))
    assert hpa.doc["spec"]["scaleTargetRef"]["name"] == coordinator.name
    config = config_of(manifests, coordinator)
    assert config["iafis_address"] == "prod-fedprint-iafis:50051"  # the router's Service
    # The shards' cache lives on a claim per pod.
    shard = next(m for m in manifests if repr(m) == "StatefulSet/prod-fedprint-iafis-shard-0")
    assert shard.doc["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_the_policy_config_map_is_the_policy_fedprint_ships(tmp_path: Path) -> None:
    policy = next(m for m in render("default") if repr(m) == "ConfigMap/prod-fedprint-coordinator-policy")
    shipped = (ROOT / "federation" / "threat_policy.yaml").read_text()
    assert policy.doc["data"]["threat_policy.yaml"].strip() == shipped.strip()
    path = tmp_path / "policy.yaml"
    path.write_text(policy.doc["data"]["threat_policy.yaml"])
    assert ThreatPolicy.load(path).version == ThreatPolicy.load(None).version


def test_an_operators_policy_replaces_it() -> None:
    custom = "version: custom-1\ndefault_level: 3\nlevels: {}\n"
    rendered = chart().render({"coordinator": {"threatPolicy": custom}}, name=RELEASE, namespace=NAMESPACE)
    assert "version: custom-1" in rendered["fedprint/templates/coordinator.yaml"]


def test_sharded_galleries_get_one_stateful_set_per_partition_and_a_router_that_knows_them() -> None:
    manifests = render("sharded")
    for node, count, replicas in (("iafis", 3, 2), ("ident", 2, 1)):
        shards = [
            w for w in of_kind(manifests, "StatefulSet") if pod_labels(w).get("fedprint.io/node") == node
        ]
        assert [s.name for s in shards] == [f"prod-fedprint-{node}-shard-{i}" for i in range(count)]
        indexes = []
        for s in shards:
            assert s.doc["spec"]["replicas"] == replicas
            assert s.doc["spec"]["serviceName"] == s.name
            (c,) = pod_spec(s)["containers"]
            indexes.append(next(e["value"] for e in c["env"] if e["name"] == "FEDPRINT_SHARD__INDEX"))
            assert config_of(manifests, s)["shard"] == {"count": count}
            assert config_of(manifests, s)["role"] == "shard"
            headless = next(m for m in of_kind(manifests, "Service") if m.name == s.name)
            assert headless.doc["spec"]["clusterIP"] == "None"
        assert indexes == [str(i) for i in range(count)]
        router = next(m for m in of_kind(manifests, "Deployment") if m.name == f"prod-fedprint-{node}-router")
        config = config_of(manifests, router)
        assert config["role"] == "router"
        assert config["shards"] == [f"prod-fedprint-{node}-shard-{i}:50051" for i in range(count)]
    for w in fedprint_workloads(manifests):
        assert config_of(manifests, w)["tracing"] == {
            "exporter": "otlp",
            "endpoint": "http://otel-collector.observability:4317",
            "insecure": True,
            "sample_ratio": 0.25,
        }
    assert "tracing" not in config_of(render("default"), fedprint_workloads(render("default"))[0])


def test_external_postgresql_deploys_no_database_and_reads_the_urls_from_the_given_secret() -> None:
    manifests = render("external-postgresql")
    assert not [m for m in manifests if "postgresql" in m.name]
    assert not [m for m in of_kind(manifests, "Secret")]  # every secret is the operator's
    coordinator = next(m for m in of_kind(manifests, "Deployment") if m.name.endswith("-coordinator"))
    assert config_of(manifests, coordinator)["audit_checkpoint_dir"] == "/var/lib/fedprint/audit-checkpoints"
    volumes = {v["name"]: v for v in pod_spec(coordinator)["volumes"]}
    assert volumes["audit-checkpoints"]["persistentVolumeClaim"] == {
        "claimName": "fedprint-audit-checkpoints"
    }
    assert volumes["audit-key"]["secret"]["secretName"] == "fedprint-audit-key"
    clients = next(m for m in of_kind(manifests, "NetworkPolicy") if m.name.endswith("-database-clients"))
    (rule,) = clients.doc["spec"]["egress"]
    assert rule["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert rule["ports"] == [{"port": 5432, "protocol": "TCP"}]
    coordinator = next(m for m in of_kind(manifests, "Deployment") if m.name.endswith("-coordinator"))
    key = next(v for v in pod_spec(coordinator)["volumes"] if v["name"] == "booking-key")
    assert key["secret"]["secretName"] == "fedprint-booking-key"
    assert key["secret"]["items"] == [{"key": "key.hex", "path": "booking.key"}]


def test_insecure_mounts_no_tls_and_says_so() -> None:
    rendered = chart().render({"insecure": True}, name=RELEASE, namespace=NAMESPACE)
    assert "insecure: true" in rendered["fedprint/templates/ice.yaml"]
    assert "/etc/fedprint/tls" not in "".join(rendered.values())
    assert "WARNING: insecure is true" in rendered["fedprint/templates/NOTES.txt"]


# -- what the chart refuses -------------------------------------------------------------------------

BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "no shards": ({"gallery": {"iafis": {"shards": {"count": 0}}}}, "/gallery/iafis/shards/count"),
    "shard count as text": (
        {"gallery": {"iafis": {"shards": {"count": "3"}}}},
        "/gallery/iafis/shards/count",
    ),
    "negative GPUs": ({"gallery": {"ident": {"shards": {"gpu": -1}}}}, "/gallery/ident/shards/gpu"),
    "misspelt key": ({"gallery": {"ident": {"shard": {"count": 2}}}}, "'shard' not allowed"),
    "a third node": ({"gallery": {"eurodac": {}}}, "'eurodac' not allowed"),
    "pull policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "secret in a config": (
        {"coordinator": {"config": {"database_url": "postgresql://u:p@db/x"}}},
        "database_url",
    ),
    "TLS in a config": ({"ice": {"config": {"tls": {"ca": "/x"}}}}, "'tls'"),
    "address in a config": ({"coordinator": {"config": {"iafis_address": "x:1"}}}, "iafis_address"),
    "role in a shard config": ({"gallery": {"iafis": {"shards": {"config": {"role": "router"}}}}}, "'role'"),
    "cpu not a quantity": ({"coordinator": {"resources": {"limits": {"cpu": "lots"}}}}, "/limits/cpu"),
    "root": ({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser"),
    "two PDB bounds": (
        {"coordinator": {"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}}},
        "/coordinator/podDisruptionBudget",
    ),
    "misspelt peer": ({"networkPolicy": {"agencyPeers": [{"ipBlok": {"cidr": "10.0.0.0/8"}}]}}, "'ipBlok'"),
    "port out of range": ({"ports": {"grpc": 70000}}, "/ports/grpc"),
    "log level": ({"logLevel": "verbose"}, "/logLevel"),
    "tracing endpoint": ({"tracing": {"endpoint": "otel:4317"}}, "/tracing/endpoint"),
    "sample ratio": ({"tracing": {"sampleRatio": 2}}, "/tracing/sampleRatio"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_values_are_rejected_by_the_schema(case: str) -> None:
    values, where = BAD_VALUES[case]
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        chart().validate_schema(values)
    with pytest.raises(helm.HelmValuesError):  # and an install would not render them either
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"postgresql": {"enabled": False}}, "no database"),
        ({"externalDatabase": {"existingSecret": "urls"}}, "both set"),
        ({"coordinator": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}, "exceeds maxReplicas"),
    ],
)
def test_contradictory_values_fail_the_render(values: dict[str, Any], reason: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=reason):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


def test_a_broken_template_fails_lint_and_render(tmp_path: Path) -> None:
    broken = tmp_path / "fedprint"
    shutil.copytree(CHART, broken, symlinks=False)
    template = broken / "templates" / "ice.yaml"
    template.write_text(template.read_text().replace("{{- end }}", "", 1))  # an unclosed `if`
    report = helm.lint(broken, strict=True)
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])
    with pytest.raises(helm.HelmError):
        helm.Chart.load(broken).render({}, name=RELEASE, namespace=NAMESPACE)


def test_a_template_rendering_invalid_kubernetes_is_caught(tmp_path: Path) -> None:
    broken = tmp_path / "fedprint"
    shutil.copytree(CHART, broken, symlinks=False)
    template = broken / "templates" / "ice.yaml"
    template.write_text(template.read_text().replace("replicas: {{ $c.replicas | int }}", "replicas: many"))
    rendered = helm.Chart.load(broken).render({}, name=RELEASE, namespace=NAMESPACE)
    docs = [d for d in yaml.safe_load_all(rendered["fedprint/templates/ice.yaml"]) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    with pytest.raises(kubernetes_validate.ValidationError, match="many"):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


@pytest.mark.parametrize("configuration", sorted(CONFIGURATIONS))
def test_each_coordinator_replica_is_named_by_its_pod(configuration: str) -> None:
    manifests = render(configuration)
    [coordinator] = [w for w in workloads(manifests) if component(w) == "coordinator"]
    [container] = pod_spec(coordinator)["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["FEDPRINT_REPLICA_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
