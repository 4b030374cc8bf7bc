"""Offline rendering of the kustomize overlays in k8s/ (no kubectl or kustomize binary needed).

A small subset of kustomize, exactly what k8s/ uses, with kustomize's semantics:

* `resources`: files (multi-document YAML) and directories holding a kustomization.yaml;
* `namespace`: set on every object;
* `labels: [{pairs: {...}}]`: added to every object's metadata.labels;
* `images: [{name, newName, newTag}]`: rewrites `image` in every `containers` / `initContainers` list
  anywhere in an object (kustomize's behaviour for custom resources);
* `patches: [{path, target: {kind, name}}]`: JSON patches (RFC 6902: add / replace / remove), whose
  meaning does not depend on schemas, so kustomize and this renderer agree.

Anything else in a kustomization is refused rather than silently ignored.

`python -m cluster.kube render OVERLAY` prints the rendered YAML (OVERLAY: gpu, cpu-dev, or a path under
k8s/ such as on-cluster/gpu); `python -m cluster.kube sync` rewrites
each overlay's serve-config patch from serve/config/ (the RayService's serveConfigV2 is that file).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from cluster.runtime_env import PROJECT_ROOT

K8S_DIR = PROJECT_ROOT / "k8s"
OVERLAYS = ("gpu", "cpu-dev")
# the pipeline RayJob on each overlay's RayCluster: created on demand, not with the overlay
ON_CLUSTER = {o: f"on-cluster/{o}" for o in OVERLAYS}
SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
SERVE_SOURCE_ANNOTATION = "crossdiff.dev/serve-config-source"


# where the manifests are: an installed crossdiff (a wheel) carries the code, not k8s/
_WHERE = (
    "; the overlays are k8s/overlays/<name> or k8s/<path> of a crossdiff source checkout (the installed "
    "package does not carry the manifests): run this from a checkout, or give a kustomization directory"
)


class RenderError(ValueError):
    """A kustomization this renderer cannot honour exactly."""


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """Apply RFC 6902 add / replace / remove operations (returns a new document)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last, kind = parts[-1], op["op"]
        if isinstance(parent, list):
            idx = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(idx, copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[idx] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[idx]
            else:
                raise RenderError(f"unsupported JSON patch op {kind!r}")
        else:
            if kind in ("replace", "remove") and last not in parent:
                raise RenderError(f"JSON patch {kind} of missing path {op['path']}")
            if kind in ("add", "replace"):
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[last]
            else:
                raise RenderError(f"unsupported JSON patch op {kind!r}")
    return doc


def _containers(obj: Any):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                yield from (c for c in v if isinstance(c, dict))
            else:
                yield from _containers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _containers(v)


def _set_image(obj: dict, images: list[dict[str, str]]) -> None:
    for c in _containers(obj):
        image = c.get("image", "")
        name, _, tag = image.partition(":")
        for rule in images:
            if name == rule["name"]:
                c["image"] = f"{rule.get('newName', name)}:{rule.get('newTag', tag or 'latest')}"


def render(path: str | Path) -> list[dict[str, Any]]:
    """Render the kustomization in `path` (an overlay name under k8s/overlays, or a directory)."""
    d = Path(path)
    if not d.is_absolute() and not (d / "kustomization.yaml").exists():
        d = K8S_DIR / "overlays" / str(path)
        if not (d / "kustomization.yaml").exists():  # e.g. on-cluster/gpu
            d = K8S_DIR / str(path)
    if not (d / "kustomization.yaml").exists():
        raise RenderError(f"no kustomization.yaml in {d}{_WHERE}")
    k = yaml.safe_load((d / "kustomization.yaml").read_text()) or {}
    unknown = set(k) - SUPPORTED
    if unknown:
        raise RenderError(f"{d}/kustomization.yaml: unsupported fields {sorted(unknown)}")
    objs: list[dict[str, Any]] = []
    for r in k.get("resources", []):
        p = d / r
        if p.is_dir():
            objs += render(p.resolve())
        else:
            objs += [o for o in yaml.safe_load_all(p.read_text()) if o]
    for patch in k.get("patches", []):
        ops = yaml.safe_load((d / patch["path"]).read_text())
        target = patch["target"]
        hits = [
            i
            for i, o in enumerate(objs)
            if o["kind"] == target["kind"]
            and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])
        ]
        if not hits:
            raise RenderError(f"patch {patch['path']} matches no object ({target})")
        for i in hits:
            try:
                objs[i] = json_patch(objs[i], ops)
            except (KeyError, IndexError, ValueError) as e:
                raise RenderError(f"patch {patch['path']} does not apply to {target}: {e!r}") from None
    for o in objs:
        if "namespace" in k:
            o["metadata"]["namespace"] = k["namespace"]
        for group in k.get("labels", []):
            o["metadata"].setdefault("labels", {}).update(group["pairs"])
        _set_image(o, k.get("images", []))
    return objs


# ---------------------------------------------------------------- the RayService's Serve config


def serve_config_source(overlay: str) -> Path | None:
    """The Serve config serve/ ships for this overlay: serve/config/<overlay>.yaml, else a file whose
    name says gpu/cpu, else the only file there. None while serve/config/ has none."""
    d = PROJECT_ROOT / "serve" / "config"
    files = sorted(d.glob("*.yaml")) if d.exists() else []
    if not files:
        return None
    want = "gpu" if overlay == "gpu" else "cpu"
    for f in files:
        if f.stem == overlay:
            return f
    for f in files:
        if want in f.stem:
            return f
    return files[0] if len(files) == 1 else None


PLACEHOLDER_SERVE_CONFIG = {
    "proxy_location": "EveryNode",
    "http_options": {"host": "0.0.0.0", "port": 8000},
    "applications": [
        {
            "name": "labeller",
            "route_prefix": "/",
            "import_path": "serve.app:build_app",
            "args": {},
        }
    ],
}


def serve_config_text(overlay: str) -> tuple[str, str]:
    """(serveConfigV2 text, its source) for an overlay."""
    src = serve_config_source(overlay)
    if src is None:
        return yaml.safe_dump(PLACEHOLDER_SERVE_CONFIG, sort_keys=False), "placeholder"
    return src.read_text(), str(src.relative_to(PROJECT_ROOT))


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so the generated patch reads like the Serve config."""


def _str(dumper: yaml.SafeDumper, s: str):
    if "\n" in s:
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", s)


_BlockDumper.add_representer(str, _str)


def sync_serve_config(overlays: tuple[str, ...] = OVERLAYS) -> list[Path]:
    """Write k8s/overlays/<o>/serve-config.patch.yaml from serve/config/ (run after changing it)."""
    if not K8S_DIR.is_dir():
        raise RenderError(f"no {K8S_DIR}{_WHERE}")
    written = []
    for o in overlays:
        text, source = serve_config_text(o)
        ops = [
            {"op": "replace", "path": "/spec/serveConfigV2", "value": text},
            {
                "op": "add",
                "path": "/metadata/annotations/" + SERVE_SOURCE_ANNOTATION.replace("/", "~1"),
                "value": source,
            },
        ]
        p = K8S_DIR / "overlays" / o / "serve-config.patch.yaml"
        header = (
            "# Generated by `python -m cluster.kube sync` from the Serve config serve/ ships; do not edit.\n"
        )
        p.write_text(header + yaml.dump(ops, Dumper=_BlockDumper, sort_keys=False, width=1000))
        written.append(p)
    return written


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["render"] and len(argv) == 2:
            sys.stdout.write(yaml.safe_dump_all(render(argv[1]), sort_keys=False))
            return 0
        if argv[:1] == ["sync"]:
            for p in sync_serve_config():
                print(p)
            return 0
    except RenderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("usage: python -m cluster.kube render OVERLAY | sync", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
