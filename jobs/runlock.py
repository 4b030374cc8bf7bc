"""One writer per run: a pipeline (or a single-stage command) holds its run while it works.

Two processes on one run directory would clear, rewrite and resume each other's outputs (a Ray
job resubmitted while its first driver still runs, `make demo` in two terminals, one `out` used
from two machines). So a run is held:

- **local run directory**: an advisory `fcntl.flock` on `RUN/.crossdiff.lock`. The kernel drops it
  when the holder dies, however it dies, so a killed run resumes at once. The file names the
  holder (host, pid, command, since) for the message of whoever is refused.
- **remote run (`s3://`, `gs://`)**: a lease object `RUN/.crossdiff-lease.json` the holder
  rewrites every `heartbeat_s`. Another process takes it over once it is stale (no heartbeat for
  `stale_s`) or at once when its holder ran on the same host and that pid is gone; the holder marks
  it `released` when it stops (`crossdiff status` reads that). Object stores
  have no portable compare-and-set, so after writing its lease a taker reads it back a moment
  later: of two takers at once, the one whose lease was overwritten backs off.

The local working copy of a remote run is flocked too (two drivers on one machine share it).
`steal=True` (`--steal-lock`) takes a run whatever holds it: for a holder known to be gone whose
lease has not gone stale yet. Nothing here decides what a stage does; it only says who may.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec

from diffing.logs import get_logger

LOCK_FILE = ".crossdiff.lock"
LEASE_FILE = ".crossdiff-lease.json"
HEARTBEAT_S = 30.0
STALE_S = 120.0  # four missed heartbeats: the holder is gone (or cut off from the bucket)
SETTLE_S = 1.0  # a taker reads its lease back after this long (two takers at once: one backs off)


_HELD: set[str] = set()  # lock files this process holds: holding one again is a no-op


class RunBusy(RuntimeError):
    """Another live process holds the run. Retryable: it is free once that one finishes."""

    retryable = True


def _machine() -> dict[str, Any]:
    """What must match before a pid is looked up here: containers sharing a host name (host
    networking) have pid namespaces of their own, where another's live pid looks dead."""
    out: dict[str, Any] = {"host": socket.gethostname()}
    try:
        out["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        out["pid_ns"] = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pass
    return out


def _me(command: str) -> dict[str, Any]:
    return {**_machine(), "pid": os.getpid(), "command": command, "since": time.time()}


def _same_machine(owner: dict[str, Any]) -> bool:
    here = _machine()
    return len(here) == 3 and all(owner.get(k) == v for k, v in here.items())


def _describe(owner: dict[str, Any]) -> str:
    since = owner.get("since")
    age = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if since else ""
    return (
        f"{owner.get('command', 'crossdiff')} (pid {owner.get('pid', '?')} on {owner.get('host', '?')}{age})"
    )


def object_age(info: dict[str, Any]) -> float | None:
    """Seconds since an object was written, from its listing info (S3 `LastModified`, GCS
    `updated`, fsspec's `mtime` / `created`); None when it has none."""
    from datetime import datetime

    for key in ("LastModified", "updated", "mtime", "created"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, str):
            try:
                v = datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(v, datetime):
            return time.time() - v.timestamp()
        if isinstance(v, int | float):
            return time.time() - float(v)
    return None


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's process, or no pid: assume alive
    return True


def _acquire(run: Path, path: Path, target: str):
    """The run's lock file, open and flocked by this process. A lock taken on a file its holder
    removed on the way out (a failed command cleaning up the directory it made) is not the run's
    lock: the file at ``path`` is opened again."""
    import fcntl

    owner: dict = {}
    for attempt in range(5):  # `crossdiff status` probes with a shared lock for an instant
        run.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")  # noqa: SIM115 - held open while the lock is: the lock lives with it
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                owner = json.loads(f.read() or "{}")
            except ValueError:
                owner = {}
            f.close()
            if attempt < 4:
                time.sleep(0.1)
            continue
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()  # locked a removed file: try the one at `path` now
    raise RunBusy(
        f"{target} is in use by {_describe(owner)}: wait for it to finish (`crossdiff status "
        f"{target}` follows it), or stop it first. Two processes on one run would undo each "
        "other's work."
    )


@contextmanager
def _flock(run: Path, command: str, target: str) -> Iterator[None]:
    made = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    path = run / LOCK_FILE
    key = str(path.resolve())
    if key in _HELD:  # this process holds it already (a store that is its run's own directory)
        yield
        return
    f = _acquire(run, path, target)
    try:
        f.seek(0)
        f.truncate()
        f.write(json.dumps(_me(command)))
        f.flush()
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        try:
            if made and [p.name for p in run.iterdir()] == [LOCK_FILE]:
                # a command that failed before writing anything leaves no directory of only its
                # lock; a process waiting on the removed file sees it gone (_acquire) and retries
                path.unlink(missing_ok=True)
                run.rmdir()
        except OSError:  # another process made the file again meanwhile: it keeps the directory
            pass
        finally:
            f.close()  # releases the flock


def holder(run: Path) -> dict[str, Any] | None:
    """Who holds a local run now (its lock file's owner), or None when nobody does. A probe: it
    takes the flock for an instant when it is free."""
    import fcntl

    path = Path(run) / LOCK_FILE
    if not path.exists():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(Path(path).read_text() or "{}")
            except (OSError, ValueError):
                return {}
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


class Lease:
    """The remote run's lease: taken, kept alive by a heartbeat thread, given back."""

    def __init__(
        self, remote: str, command: str, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S
    ):
        self.fs, root = fsspec.core.url_to_fs(remote.rstrip("/"))
        self.path = f"{root.rstrip('/')}/{LEASE_FILE}"
        self.remote = remote.rstrip("/")
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.me = {**_me(command), "lease": uuid.uuid4().hex}
        self._stop = threading.Event()
        self.lost: dict[str, Any] | None = None  # the lease's new holder, once another took it
        self._thread: threading.Thread | None = None
        self.log = get_logger("pipeline.lease", run=self.remote)

    def read(self) -> dict[str, Any] | None:
        self.fs.invalidate_cache()
        try:
            owner = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # torn: nobody can be said to hold it
        return owner if isinstance(owner, dict) else {}

    def _write(self) -> None:
        with self.fs.open(self.path, "wb") as f:
            f.write(json.dumps({**self.me, "heartbeat": time.time()}).encode())

    def written_age(self) -> float | None:
        """Seconds since the lease object was last written, by the object store's own clock (its
        modification time) against this machine's; None where the store gives none."""
        try:
            return object_age(self.fs.info(self.path))
        except Exception:  # noqa: BLE001 - no second opinion: the heartbeat alone decides
            return None

    def _free(self, owner: dict[str, Any] | None) -> tuple[bool, str]:
        if not owner or owner.get("lease") == self.me["lease"] or owner.get("released"):
            return True, "free"
        age = time.time() - float(owner.get("heartbeat") or 0)
        if age > self.stale_s:
            # the heartbeat is the holder's clock: a holder whose clock runs minutes behind still
            # rewrites the object every heartbeat_s, which the store's own time shows
            written = self.written_age()
            if written is None or written > self.stale_s:
                return True, f"stale ({age:.0f} s without a heartbeat)"
            age = written
        if _same_machine(owner) and not _pid_alive(owner.get("pid")):
            return True, "its holder's process on this host is gone"
        return False, f"heartbeat {age:.0f} s ago"

    def acquire(self, *, steal: bool = False) -> None:
        owner = self.read()
        free, why = self._free(owner)
        if not free and not steal:
            self._busy(owner, why)
        if owner and owner.get("lease") != self.me["lease"] and not owner.get("released"):  # not a rerun
            self.log.warning(
                "pipeline.lease_taken_over", previous=_describe(owner), reason=why if free else "--steal-lock"
            )
        self._write()
        time.sleep(SETTLE_S)
        now = self.read()
        if now and now.get("lease") != self.me["lease"]:  # another taker wrote after us
            self._busy(now, "it took the lease at the same moment")
        self._thread = threading.Thread(target=self._beat, name="crossdiff-lease", daemon=True)
        self._thread.start()

    def _busy(self, owner: dict[str, Any] | None, why: str):
        raise RunBusy(
            f"{self.remote} is in use by {_describe(owner or {})} ({why}): wait for it to finish "
            f"(`crossdiff status {self.remote}`), or, if it is gone, rerun after {self.stale_s:.0f} s "
            "without its heartbeat, or with --steal-lock. Two processes on one run would undo each "
            "other's work."
        )

    def check(self) -> None:
        """Raise RunBusy when another process has taken the lease over (--steal-lock, or this one
        was cut off from the bucket past the stale limit): called before every stage marker and
        upload, so a holder that lost its run stops instead of writing beside the new one."""
        if self.lost is None:
            owner = self.read()
            if owner and owner.get("lease") != self.me["lease"]:
                self.lost = owner
        if self.lost is not None:
            self._stop.set()
            raise RunBusy(
                f"{self.remote} was taken over by {_describe(self.lost)} while this process held it "
                "(--steal-lock, or this one lost the bucket for longer than the stale limit): this one "
                "stops so that only one writes the run"
            )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                owner = self.read()
                if owner and owner.get("lease") != self.me["lease"]:
                    self.lost = owner
                    self.log.error(
                        "pipeline.lease_lost",
                        holder=_describe(owner),
                        detail="another process took this run over; this one stops at its next write",
                    )
                    return
                if self._stop.is_set():  # released meanwhile: its `released` mark must stay
                    return
                self._write()
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried; the lease goes stale only after several
                self.log.warning("pipeline.lease_heartbeat_failed", error=f"{type(e).__name__}: {e}"[:200])

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)  # an in-flight heartbeat lands before the release mark
        try:
            owner = self.read()
            if owner and owner.get("lease") == self.me["lease"]:  # kept, marked given back: `crossdiff
                with self.fs.open(self.path, "wb") as f:  # status` tells a stopped run from a live one
                    f.write(json.dumps({**owner, "released": time.time()}).encode())
        except Exception as e:  # noqa: BLE001 - it goes stale on its own
            self.log.warning("pipeline.lease_release_failed", error=f"{type(e).__name__}: {e}"[:200])


class Hold:
    """A held run; `check()` raises RunBusy once a remote run's lease was taken over."""

    def __init__(self, lease: Lease | None = None):
        self.lease = lease

    def check(self) -> None:
        if self.lease is not None:
            self.lease.check()


@contextmanager
def hold_run(
    run: Path, remote: str | None = None, *, command: str | None = None, steal: bool = False
) -> Iterator[Hold]:
    """Hold a run (or a store) for the duration: the local directory's flock and, for a remote
    one, its lease. Raises RunBusy, naming the holder, when another live process has it."""
    command = command or " ".join(["crossdiff", *sys.argv[1:2]]).strip()
    target = remote or str(run)
    if str((Path(run) / LOCK_FILE).resolve()) in _HELD:  # held by this process already, lease and all
        yield Hold()
        return
    with _flock(Path(run), command, target):
        if remote is None:
            yield Hold()
            return
        lease = Lease(remote, command)
        lease.acquire(steal=steal)
        try:
            yield Hold(lease)
        finally:
            lease.release()
