"""Pipeline run directories on object storage (`s3://`, `gs://`, any fsspec URL).

The stages read and write a local working copy; `RunMirror` keeps it in step with the remote run:

- `pull()` before the pipeline starts: copies the remote run down (files missing or changed
  locally); the remote is the truth, so a local stage marker the remote lacks is dropped.
- `push()` after each stage: uploads new or changed files and removes remote files that were
  synced before and are gone locally. The pipeline then writes the stage marker and pushes again,
  so a marker on the remote always means the stage's outputs are complete there. A run killed
  between the two pushes reruns that stage (stages skip their finished work).

The activation store (`store/`) and Ray Train's checkpoints (`ray/`) are written to the remote
by their stages directly and never copied down. A run started on one machine resumes on another
from the remote alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec

from diffing.logs import get_logger
from diffing.store import check_writable
from jobs.stamps import _version, corpus_stamp, file_stamp, info_time, is_remote  # noqa: F401 (re-exported)

REMOTE_ONLY = ("store", "ray")  # top-level entries that live only on the remote
WEIGHTS = ("crosscoder",)  # what `label` and `report` skip: they read the analysis, not the weights
SYNC_FILE = ".sync.json"  # last sync: {relative path: {"local": [size, mtime_ns], "remote": version}}


def join(uri: str, rel: str) -> str:
    return f"{uri.rstrip('/')}/{rel}"


def default_work_dir(out: str) -> Path:
    """$CROSSDIFF_CACHE/runs/<hash of the remote URL>: the same remote gets the same local copy."""
    from diffing.embedded.base import cache_root

    return cache_root() / "runs" / hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:16]


class RunMirror:
    """`skip`: more top-level entries this mirror leaves alone (never fetched, uploaded or deleted),
    e.g. `("crosscoder",)` for a command that only reads the analysis."""

    def __init__(
        self, remote: str, local: Path, skip: tuple[str, ...] = (), guard: Callable[[], None] | None = None
    ):
        self.remote = remote.rstrip("/")
        # called before every upload or remote delete: raises once this process no longer holds the
        # run (jobs.runlock: its lease was taken over), so it never writes beside the new holder
        self.guard = guard
        self.skip = (*REMOTE_ONLY, *skip)
        self.fs, self.root = fsspec.core.url_to_fs(self.remote)
        self.root = self.root.rstrip("/")
        self.local = Path(local)
        self.log = get_logger("pipeline.mirror", remote=self.remote, local=str(self.local))
        self._lock = threading.RLock()  # pull/push/delete: the background sync and the stage's own
        try:
            self._synced: dict[str, dict] = json.loads((self.local / SYNC_FILE).read_text())
        except (OSError, ValueError):
            self._synced = {}

    def _check_held(self) -> None:
        if self.guard is not None:
            self.guard()

    def _save(self) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        tmp = self.local / f"{SYNC_FILE}.tmp"
        tmp.write_text(json.dumps(self._synced, sort_keys=True))
        tmp.replace(self.local / SYNC_FILE)

    def _skip(self, rel: str) -> bool:
        from jobs.runlock import LEASE_FILE, LOCK_FILE

        top = rel.split("/", 1)[0]
        # the lease lives only in the bucket, the lock file only here: neither is ever copied
        return (
            top in self.skip
            or top.startswith(SYNC_FILE)
            or top in (LOCK_FILE, LEASE_FILE)
            or rel.endswith(".tmp")
        )

    def _linked(self, path: Path) -> bool:
        """A symlink, or under one (compare/<A>-vs-<B>/ links the shared crosscoder): never synced;
        whoever reads the run recreates the links."""
        return any(
            p.is_symlink() for p in [path, *path.parents] if p != self.local and self.local in p.parents
        )

    def _stamp(self, rel: str) -> list[int]:
        st = (self.local / rel).stat()
        return [st.st_size, st.st_mtime_ns]

    def remote_files(self) -> dict[str, dict]:
        """{relative path: info} of the remote run's files (store/, ray/ and `skip` left out)."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in found.items():
            rel = path[len(self.root) :].lstrip("/")
            if path.endswith("/"):  # a "folder" placeholder object (S3 console), not a file
                continue
            if rel and not _safe_rel(rel):
                # S3 and GCS accept any key: "run/../../.bashrc" would be written outside the copy
                self.log.warning("pipeline.unsafe_object_skipped", object=path)
                continue
            if rel and info.get("type", "file") == "file" and not self._skip(rel):
                out[rel] = info
        return out

    def check_writable(self) -> None:
        check_writable(
            self.fs,
            self.root,
            f"out={self.remote}",
            "; check the bucket, credentials and AWS_ENDPOINT_URL (or use a local out)",
        )

    def pull(self, *, prune: bool = False) -> int:
        """Copy the remote run down; returns how many files were fetched. The remote is the truth:
        a file synced before and gone from the remote is deleted here too. `prune`: so is every
        other local file the remote lacks (a copy only its owner writes, e.g. a placed analysis's:
        what a killed attempt left unsynced must not be resumed or uploaded)."""
        with self._lock:
            return self._pull(prune)

    def _pull(self, prune: bool = False) -> int:
        remote = self.remote_files()
        fetched = 0
        if prune and self.local.is_dir():
            for path in [q for q in self.local.rglob("*") if q.is_file() or q.is_symlink()]:
                rel = path.relative_to(self.local).as_posix()
                if rel not in remote and not self._skip(rel) and not self._linked(path):
                    path.unlink()
                    self._synced.pop(rel, None)
        for rel in [r for r in self._synced if r not in remote and not self._skip(r)]:
            (self.local / rel).unlink(missing_ok=True)
            del self._synced[rel]
        for rel, info in sorted(remote.items()):
            dst = self.local / rel
            last = self._synced.get(rel) or {}
            if self._linked(dst):
                continue
            if (
                dst.is_file()
                and last.get("local") == self._stamp(rel)
                and last.get("remote") == _version(info)
            ):
                continue  # neither side changed it since the last sync
            if not dst.resolve().is_relative_to(self.local.resolve()):  # e.g. through a symlink
                self.log.warning("pipeline.unsafe_object_skipped", object=rel)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".tmp")
            self.fs.get_file(f"{self.root}/{rel}", str(tmp))
            os.replace(tmp, dst)
            if (t := info_time(info)) is not None:  # the remote's order of writes, not the download's
                os.utime(dst, (t, t))
            self._synced[rel] = {"local": self._stamp(rel), "remote": _version(info)}
            fetched += 1
        stages = self.local / "stages"
        for marker in stages.glob("*.json") if stages.is_dir() else ():
            rel = f"stages/{marker.name}"
            if rel not in remote:  # finished here but never confirmed on the remote
                marker.unlink()
                self._synced.pop(rel, None)
        self._save()
        if fetched:
            self.log.info("pipeline.pull", files=fetched)
        return fetched

    def push(self) -> int:
        """Upload new or changed local files and drop remote files deleted locally since the last sync."""
        with self._lock:
            self._check_held()
            return self._push()

    def _push(self) -> int:
        sent = 0
        present = set()
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = path.relative_to(self.local).as_posix()
            if self._skip(rel) or self._linked(path):
                continue
            present.add(rel)
            stamp = self._stamp(rel)
            if (self._synced.get(rel) or {}).get("local") == stamp:
                continue
            dst = f"{self.root}/{rel}"
            self.fs.put_file(str(path), dst)  # object stores need no parent "directories"
            self._synced[rel] = {"local": stamp, "remote": _version(self.fs.info(dst))}
            sent += 1
        for rel in [r for r in self._synced if r not in present and not self._skip(r)]:
            self.delete(rel)
        self._save()
        if sent:
            self.log.info("pipeline.push", files=sent)
        return sent

    @contextmanager
    def syncing(self, every_s: float) -> Iterator[None]:
        """Push in the background every `every_s` seconds while the body runs (0: never), so work a
        stage has written so far (labels, evidence ranges) survives the machine. Files are stamped
        before upload: one that changes during its upload is sent again next time."""
        if every_s <= 0:
            yield
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    self.push()
                except Exception as e:  # the stage goes on; the push after it reports for real
                    self.log.warning("pipeline.sync_failed", error=f"{type(e).__name__}: {e}")

        thread = threading.Thread(target=loop, name="crossdiff-run-sync", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def put(self, rel: str) -> None:
        """Upload one file now (a stage marker: a replaced machine must see it at once)."""
        with self._lock:
            self._check_held()
            dst = f"{self.root}/{rel}"
            self.fs.put_file(str(self.local / rel), dst)
            self._synced[rel] = {"local": self._stamp(rel), "remote": _version(self.fs.info(dst))}
            self._save()

    def delete(self, rel: str) -> None:
        """Remove one file from the remote (a marker that no longer holds, a file deleted locally)."""
        with self._lock:
            self._check_held()
            self._synced.pop(rel, None)
            path = f"{self.root}/{rel}"
            if self.fs.exists(path):
                self.fs.rm(path)
            self._save()


def _safe_rel(rel: str) -> bool:
    """An object name under the run that stays inside the local copy: no "..", ".", empty or
    absolute parts, no backslash (a Windows separator a pull would not treat as one)."""
    parts = rel.split("/")
    return "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


def reader_dir(run: str | Path) -> Path | None:
    """A remote run's working copy for a command that only reads it (and adds files of its own,
    as `report` does): its own, never the one a pipeline on this machine syncs, whose pull would
    replace that pipeline's unsynced work. None for a local run (read in place)."""
    if not is_remote(str(run)):
        return None
    d = default_work_dir(str(run))
    return d.with_name(f"{d.name}-read")


@contextmanager
def local_copy(
    run: str | Path,
    work_dir: str | Path | None = None,
    skip: tuple[str, ...] = (),
    *,
    prune: bool = False,
    sync_every_s: float = 0.0,
    hold: bool = True,
) -> Iterator[Path]:
    """A local directory for the standalone commands (`analyze`, `label`, `report`) and a placed
    analysis: `run` itself, or for a remote run a pulled working copy that is pushed back when the
    body ends (also when it fails, so resumable work such as labels already written is kept).
    `skip`: top-level entries the body does not read (`label` and `report` leave the crosscoder's
    weights in the bucket); `prune`: see RunMirror.pull; `sync_every_s`: also push meanwhile;
    `hold`: hold the run meanwhile (jobs.runlock), refused while a pipeline or another command
    works on it (False: a placed analysis, which works for the pipeline that holds it)."""
    from contextlib import nullcontext

    from jobs.runlock import hold_run

    run = str(run)
    # a comparison of a pipeline run (RUN/compare/<A>-vs-<B>) is held as its pipeline run (as
    # jobs.compare.run_roots finds it: the immediate parent named `compare`, not any such folder)
    head, parent, _ = (run.rstrip("/").rsplit("/", 2) + ["", ""])[:3]
    root = head if parent == "compare" and head else run
    if not is_remote(run):
        # a path that is not there is the command's to report (and gets no lock file)
        with hold_run(Path(root)) if hold and Path(run).is_dir() else nullcontext():
            yield Path(run)
        return
    local = Path(work_dir) if work_dir else default_work_dir(run)
    mirror = RunMirror(run, local, skip=skip)
    mirror.check_writable()  # before the lease: an unwritable bucket's own clear message
    lock_dir = local if root == run else default_work_dir(root)
    with hold_run(lock_dir, root) if hold else nullcontext() as held:
        mirror.guard = held.check if held else None
        mirror.pull(prune=prune)
        try:
            with mirror.syncing(sync_every_s):
                yield mirror.local
        except BaseException:
            try:  # keep what the failed command wrote; its own error is the one raised
                mirror.push()
            except Exception as e:
                mirror.log.warning("pipeline.push_failed", error=f"{type(e).__name__}: {e}")
            raise
        mirror.push()


def ray_train_storage_problem(out: str) -> str | None:
    """Why Ray Train cannot checkpoint to this object-storage run, or None. It parses the URL:
    "run #1" is cut at "#" (two runs sharing checkpoints), "%20" decoded, a space or "é" refused
    once the workers have started."""
    if "://" in out and (not out.isascii() or any(c in out for c in " #?%")):
        return (
            "a Ray Train fit's object-storage run name must be plain ASCII without spaces, #, ? or %; "
            "rename the run (e.g. run-1)"
        )
    return None
