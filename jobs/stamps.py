"""Version stamps of files, corpora and remote objects: what tells a later run whether its input
changed (a harvest's corpus, a run mirror's files), from one listing where the storage allows."""

from __future__ import annotations

import hashlib
import os

import fsspec


def _version(info: dict) -> str:
    """What identifies one version of a remote object (ETag on S3, md5 on GCS, else size + mtime)."""
    for key in ("ETag", "etag", "md5Hash", "LastModified", "updated", "mtime"):
        if info.get(key):
            return str(info[key])
    return f"size={info.get('size')}"


def info_time(info: dict) -> float | None:
    """Seconds since the epoch of an fsspec info record's last change (None: it holds none)."""
    t = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("last_modified")
    t = t or info.get("created")  # fsspec's memory filesystem (written once per version)
    if t is None:
        return None
    if hasattr(t, "timestamp"):
        return float(t.timestamp())
    if isinstance(t, str):
        from datetime import datetime

        try:
            return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return float(t)


def file_stamp(uri: str) -> str | None:
    """One version of a file, to tell later whether it changed: size and ETag/md5 of a remote
    object, size and sha256 of a local file; None where it cannot be read."""
    name = uri.split("?", 1)[0] if is_remote(uri) else uri
    try:
        fs, path = fsspec.core.url_to_fs(name)
        fs.invalidate_cache()
        info = fs.info(path)
        if is_remote(uri):
            return f"{info.get('size')}:{_version(info)}"
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        return f"{info.get('size')}:{digest.hexdigest()[:16]}"
    except Exception:  # noqa: BLE001 - unreadable here: nothing to compare
        return None


def _listed_stamps(files: list[str]) -> list[str | None]:
    """file_stamp of many remote objects from one listing per folder instead of a HEAD request per
    object (a corpus of 1,000 shards); an object the listing lacks gets its own file_stamp."""
    fs, _ = fsspec.core.url_to_fs(files[0])
    fs.invalidate_cache()
    paths = [fsspec.core.url_to_fs(f)[1] for f in files]
    infos: dict[str, dict] = {}
    for folder in sorted({p.rsplit("/", 1)[0] for p in paths}):
        try:
            infos |= {i["name"].rstrip("/"): i for i in fs.ls(folder, detail=True)}
        except Exception:  # noqa: BLE001 - each object on its own below
            pass
    return [
        f"{infos[p].get('size')}:{_version(infos[p])}" if p in infos else file_stamp(f)
        for f, p in zip(files, paths, strict=True)
    ]


def corpus_stamp(uri: str, fmt: str = "auto") -> str | None:
    """file_stamp of a corpus; of a directory or glob corpus, one stamp over its files' names and
    stamps (a file added, removed or changed changes it). None where any cannot be read."""
    from diffing.corpus import corpus_files

    try:
        files = corpus_files(uri, fmt)
    except Exception:  # noqa: BLE001 - no files: nothing to compare (the harvest names the problem)
        return None
    if files == [uri]:
        return file_stamp(uri)
    stamps = _listed_stamps(files) if is_remote(files[0]) else [file_stamp(f) for f in files]
    if any(s is None for s in stamps):
        return None
    # names below the files' common folder: a run moved with its corpus keeps its stamp
    common = os.path.commonprefix(files).rsplit("/", 1)[0]
    # by name, not read order: a change of how shards are ordered (2026-12-07: by number) is no new
    # corpus; the harvest's own hash covers the records' order
    joined = "\n".join(sorted(f"{f[len(common) :]} {s}" for f, s in zip(files, stamps, strict=True)))
    return f"{len(files)} files:{hashlib.sha256(joined.encode()).hexdigest()[:16]}"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")
