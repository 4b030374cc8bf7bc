"""A local Ray cluster for job submission: `crossdiff cluster up` / `crossdiff cluster down`.

`up` runs a real `ray start --head --block` from this Python environment (so job entrypoints can run
`crossdiff`), on free ports, with its own temp dir and the dashboard (job API) on 127.0.0.1, and
records what it started in a state file. `down` ends exactly those processes: the `ray start` process,
its descendants, and any process whose command line names the cluster's own temp dir. It never runs
`ray stop`, which would end every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Collection
from pathlib import Path
from typing import Any

STATE_DIR = Path(os.environ.get("CROSSDIFF_CLUSTER_STATE", Path.home() / ".cache" / "crossdiff" / "clusters"))


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_range(width: int, avoid: Collection[int] = ()) -> int:
    """Start of `width` consecutive ports that are free right now and hold none of `avoid` (the
    ports already picked for Ray's other components, free again once probed): Ray's worker ports."""
    import random

    for _ in range(200):
        start = random.randint(20000, 60000 - width)
        if any(start <= p < start + width for p in avoid):
            continue
        if all(_port_free(p) for p in range(start, start + width)):
            return start
    raise RuntimeError("no free port range for Ray workers")


def state_path(name: str = "local", state_dir: Path | None = None) -> Path:
    return Path(state_dir or STATE_DIR) / f"{name}.json"


def read_state(name: str = "local", state_dir: Path | None = None) -> dict[str, Any] | None:
    """The recorded state, live or not; None without a state file."""
    p = state_path(name, state_dir)
    if not p.exists():
        return None
    try:
        state = json.loads(p.read_text())
        for key in ("pid", "temp_dir", "dashboard", "address"):
            state[key]  # noqa: B018 - every reader needs them
        return state
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(
            f"the cluster state file {p} is corrupt or incomplete ({type(e).__name__}: {e}); stop "
            f"what it started, if anything (processes naming /tmp/cdr-*), then delete the file"
        ) from None


def load_state(name: str = "local", state_dir: Path | None = None) -> dict[str, Any] | None:
    """The state of a cluster that is up: its `ray start` process is still the one `up` started."""
    state = read_state(name, state_dir)
    return state if state is not None and _root(state) is not None else None


def _root(state: dict[str, Any]):
    """The `ray start` process `up` started, or None: a pid alone is not enough (pids are reused
    after a reboot or a crash), so its start time and its own temp dir on its command line must
    match too."""
    import psutil

    try:
        p = psutil.Process(int(state["pid"]))
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        created = state.get("pid_create_time")
        if created is not None and abs(p.create_time() - float(created)) > 1.0:
            return None
        if not any(f"--temp-dir={state['temp_dir']}" == a for a in p.cmdline()):
            return None
        return p
    except (psutil.Error, ValueError, TypeError):
        return None


def _dashboard_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def up(
    name: str = "local",
    *,
    num_cpus: int = 4,
    num_gpus: int = 0,
    state_dir: Path | None = None,
    timeout_s: float = 240,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start a head node and wait until its job API answers. Returns the recorded state."""
    import fcntl

    sp = state_path(name, state_dir)
    sp.parent.mkdir(parents=True, exist_ok=True)
    lock = open(sp.with_suffix(".lock"), "w")  # two `up`s of one name: the second waits, then sees it
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        return _up_locked(name, num_cpus, num_gpus, state_dir, timeout_s, env)
    finally:
        lock.close()


def _up_locked(
    name: str, num_cpus: int, num_gpus: int, state_dir: Path | None, timeout_s: float, env: dict | None
) -> dict[str, Any]:
    existing = load_state(name, state_dir)
    if existing is not None:
        raise RuntimeError(
            f"cluster {name!r} is already up (dashboard {existing['dashboard']}); "
            f"`crossdiff cluster down --name {name}` first"
        )
    if read_state(name, state_dir) is not None:  # a cluster that died: its leftovers go first
        down(name, state_dir=state_dir)
    # Short path: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="cdr-", dir="/tmp")
    gcs, dash, node_mgr, obj_mgr, client_port, agent, agent_grpc, rt_agent, metrics = _free_ports(9)
    wmin = _free_range(
        200, avoid=(gcs, dash, node_mgr, obj_mgr, client_port, agent, agent_grpc, rt_agent, metrics)
    )
    bin_dir = Path(sys.executable).parent
    ray_bin = bin_dir / "ray"
    cmd = [
        str(ray_bin if ray_bin.exists() else "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--num-cpus={num_cpus}",
        f"--num-gpus={num_gpus}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_agent}",
        f"--metrics-export-port={metrics}",
        f"--min-worker-port={wmin}",
        f"--max-worker-port={wmin + 199}",
        "--object-store-memory=500000000",
    ]
    child_env = dict(os.environ)
    child_env.update(env or {})
    # Job entrypoints run `crossdiff` and `python` from the cluster's environment: this one.
    child_env["PATH"] = f"{bin_dir}{os.pathsep}{child_env.get('PATH', '')}"
    child_env.setdefault("RAY_AUTH_MODE", "disabled")
    child_env.pop("RAY_ADDRESS", None)
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
        )
    dashboard = f"http://127.0.0.1:{dash}"
    import psutil

    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        created = None
    state = {
        "name": name,
        "pid": proc.pid,
        "pid_create_time": created,
        "temp_dir": temp_dir,
        "address": f"127.0.0.1:{gcs}",
        "dashboard": dashboard,
        "log": str(log_path),
        "num_cpus": num_cpus,
    }
    sp = state_path(name, state_dir)
    tmp = sp.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(sp)
    deadline = time.monotonic() + timeout_s
    while not _dashboard_up(dashboard) or not _jobs_api_up(dashboard):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log_path.read_text(errors="replace")[-3000:]
            down(name, state_dir=state_dir)
            raise RuntimeError(f"`ray start --head` did not come up (see {log_path}):\n{tail}")
        time.sleep(1.0)
    return state


def _jobs_api_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/jobs/", timeout=5) as r:
            return r.status == 200
    except Exception:
        return False


def _our_processes(state: dict[str, Any]) -> list:
    """The `ray start` process, its descendants, and processes naming our temp dir (by pid)."""
    import psutil

    procs: dict[int, Any] = {}
    root = _root(state)  # only the process `up` started: a reused pid is someone else's
    if root is not None:
        procs[root.pid] = root
        try:
            for c in root.children(recursive=True):
                procs[c.pid] = c
        except psutil.Error:
            pass
    marker = state["temp_dir"]
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in (a or "") for a in (p.info["cmdline"] or [])):
                procs.setdefault(p.pid, p)
        except psutil.Error:
            continue
    procs.pop(os.getpid(), None)
    return list(procs.values())


def down(name: str = "local", *, state_dir: Path | None = None, grace_s: float = 20) -> bool:
    """Stop the cluster `up` started (only its processes) and forget it. False when none of its
    processes was running (a stale state file is removed all the same)."""
    import psutil

    sp = state_path(name, state_dir)
    state = read_state(name, state_dir)
    if state is None:
        return False
    root = _root(state)
    procs = _our_processes(state)
    # `ray start --block` shuts its node down on SIGTERM; then whatever is left gets SIGKILL.
    if root is not None:
        try:
            root.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    if str(state["temp_dir"]).startswith("/tmp/cdr-"):  # only a temp dir `up` made
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
    sp.unlink(missing_ok=True)
    return bool(procs)
