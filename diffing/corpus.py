"""Prompt corpora: where they are and how they are read (what a record must look like:
`diffing.corpus_records`).

A corpus is JSON Lines (or one JSON array), Parquet, or plain text with one document per line,
local or on object storage, optionally compressed (.gz, .bz2, .xz, .zip, .zst by suffix); one file,
a directory of them (a dataset exported in shards), or a glob. Every record
is checked here, before any model loads or any shard is written, and a bad one is an error that
names the record (file line or row), the field and the fix.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import fsspec
from pydantic import Field

from diffing.config import Frozen
from diffing.corpus_records import _record
from diffing.logs import get_logger
from diffing.models import HarvestInputError

# name suffixes fsspec decompresses by (gz, bz2, xz, lzma, zip; zstd and lz4 once their packages are in)
_COMPRESSION = tuple(f".{suffix}" for suffix in fsspec.utils.compressions)
_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"\xfd7zXZ": "xz",
    b"PK\x03\x04": "zip",
}


class CorpusSpec(Frozen):
    uri: str = Field(
        description="Corpus file: .jsonl/.json (JSON Lines, or one JSON array of records), .parquet, or .txt "
        "(one document per line); local or s3://; .gz/.bz2/.xz/.zip/.zst compression by suffix. Or a "
        "directory (every such file under it, by path; hidden and _-prefixed files skipped) or a glob "
        "(data/train-*.parquet): their records in path order (numbers by value: part-2 before part-10); "
        "their files must share one format."
    )
    format: Literal["auto", "jsonl", "parquet", "text"] = Field(
        "auto", description="File format; auto uses the suffix (after any compression suffix)."
    )
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N records.")
    text_field: str = Field("text", description="Column with raw text.")
    messages_field: str = Field(
        "messages",
        description="Column with chat messages [{role, content}] (a list, or that list as a JSON string; "
        "ShareGPT's {from, value} turns are read as {role, content}: human -> user, gpt -> assistant); "
        "used instead of the text column when a record has both.",
    )
    source_field: str = Field(
        "source", description="Column tagging each record's source (kept in the store, not shown to models)."
    )
    id_field: str = Field("id", description="Column with a record id (default: the row number).")


# compression suffixes fsspec reads once an optional package is installed (some under another
# suffix than it infers): suffix -> (fsspec codec, module, pip package)
_NEEDS_PACKAGE = {
    ".zst": ("zstd", "zstandard", "zstandard"),
    ".zstd": ("zstd", "zstandard", "zstandard"),
    ".lz4": ("lz4", "lz4", "lz4"),
    ".sz": ("snappy", "snappy", "python-snappy"),
}
_UNREAD = (".csv", ".tsv", ".xlsx", ".arrow", ".feather", ".avro")


def _format(spec: CorpusSpec, uri: str | None = None) -> str:
    uri = spec.uri if uri is None else uri
    if spec.format != "auto":
        return spec.format
    low = _name(uri).lower()
    for suffix in (*_COMPRESSION, *_NEEDS_PACKAGE):
        low = low.removesuffix(suffix)
    if low.endswith(_UNREAD):
        raise HarvestInputError(
            f"corpus.uri: {uri} is a .{low.rsplit('.', 1)[-1]} file, which is not read; a corpus is "
            "JSON Lines (.jsonl/.json), Parquet (.parquet) or text (.txt, one document per line): convert "
            "it (e.g. pandas.read_csv(...).to_parquet(...)), or set corpus.format if it is one of those"
        )
    return "parquet" if low.endswith(".parquet") else "text" if low.endswith(".txt") else "jsonl"


def _read_bytes(uri: str) -> bytes:
    name = _name(uri)
    compression = fsspec.utils.infer_compression(name)
    for suffix, (codec, module, package) in _NEEDS_PACKAGE.items():
        if compression is None and name.lower().endswith(suffix):
            import importlib.util

            if importlib.util.find_spec(module) is None or codec not in fsspec.utils.compressions.values():
                raise HarvestInputError(
                    f"corpus.uri: {uri} is {suffix}-compressed and reading it needs the `{package}` "
                    f"package: pip install {package}, or decompress the file"
                )
            compression = codec
    try:
        with fsspec.open(uri, "rb", compression=compression) as f:
            return f.read()
    except FileNotFoundError:
        where = (
            "" if "://" in uri or Path(uri).is_absolute() else f" (a relative path is read from {Path.cwd()})"
        )
        raise HarvestInputError(f"corpus.uri: {uri} does not exist{where}") from None
    except Exception as e:  # unreachable bucket, bad credentials, a corrupt archive
        raise HarvestInputError(f"corpus.uri: cannot read {uri}: {type(e).__name__}: {e}") from None


def _decode(data: bytes, uri: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError as e:
        for magic, codec in _MAGIC.items():
            if data.startswith(magic):
                raise HarvestInputError(
                    f"corpus.uri: {uri} is {codec}-compressed but its name does not say so; name it with "
                    f"its suffix ({', '.join(_COMPRESSION)} are read) or decompress it"
                ) from None
        raise HarvestInputError(
            f"corpus.uri: {uri} is not UTF-8 (byte {e.start}: {e.reason}); re-encode it as UTF-8"
        ) from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of the non-blank lines, one at a time (a list of every line was
    another copy of the corpus; a `max_prompts` read stops early). Splits on newlines only: JSON
    strings may hold U+2028 or U+0085 and prose may hold form feeds, which str.splitlines() would
    split on."""
    if "\r" in text:  # Windows and old Mac line ends
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    start, n = 0, 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        n += 1
        line = text[start:end]
        if line.strip():
            yield n, line
        start = end + 1


def _json_rows(text: str, uri: str, limit: int | None) -> list[tuple[str, Any]]:
    if text.lstrip().startswith("["):  # one JSON array of records (a .json export)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise HarvestInputError(f"corpus {uri} line {e.lineno}: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # a number of over 4300 digits; nesting too deep
            raise HarvestInputError(f"corpus {uri}: unreadable JSON ({str(e)[:200]})") from None
        return [(f"item {i}", r) for i, r in enumerate(rows)]
    out = []
    for n, line in itertools.islice(_lines(text), limit):
        try:
            out.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise HarvestInputError(
                f"corpus {uri} line {n}: {e.msg} (column {e.colno}); a .jsonl corpus holds one JSON "
                "object per line (or the whole file is one JSON array)"
            ) from None
        except (ValueError, RecursionError) as e:  # a number of over 4300 digits; nesting too deep
            raise HarvestInputError(f"corpus {uri} line {n}: unreadable JSON ({str(e)[:200]})") from None
    return out


_SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",), "text": (".txt",)}


def _bare(name: str) -> str:
    """A file name, lower-cased, without its compression suffix."""
    low = name.lower()
    for suffix in (*_COMPRESSION, *_NEEDS_PACKAGE):
        low = low.removesuffix(suffix)
    return low


def _is_corpus_file(rel: str, fmt: str) -> bool:
    """A file a directory or glob corpus reads (`rel`: its path below the corpus root): nothing
    hidden or `_`-prefixed on the way (_SUCCESS, _temporary/, .ipynb_checkpoints/), and a corpus
    suffix (with `fmt` set: that format's suffix, or none, as Spark's part files have)."""
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p.startswith((".", "_")) for p in parts):
        return False
    low = _bare(parts[-1])
    if fmt != "auto":
        return low.endswith(_SUFFIXES[fmt]) or "." not in low
    return low.endswith(sum(_SUFFIXES.values(), ()))


def _glob_root(path: str) -> str:
    """The folder a glob's matches lie under: its path up to the first wildcard's folder."""
    first = min(path.index(c) for c in "*?[" if c in path)
    return path[:first].rsplit("/", 1)[0]


def _path_order(path: str) -> tuple[list[tuple[int, str | int]], str]:
    """Sort key: a path with its digit runs compared as numbers, so unpadded shard names keep their
    numbering (part-2 before part-10); zero-padded names sort as they always did, and names equal
    as numbers (7, 007) by their text."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", path) if t], path


def _is_versioned(uri: str) -> bool:
    """s3://b/c.jsonl?versionId=...: one object (a query string), not a `?` wildcard."""
    return "://" in uri and "=" in uri.split("?", 1)[-1] and "?" in uri


def _name(uri: str) -> str:
    """The file's name, whose suffixes tell its format: before a URL's query string
    (s3://b/c.jsonl.gz?versionId=..., https://h/c.jsonl?raw); a local path's `?` is part of it."""
    return uri.split("?", 1)[0] if "://" in uri else uri


def corpus_files(uri: str, fmt: str = "auto") -> list[str]:
    """The files a corpus URI names, in the order their records are read: the file itself; every
    corpus file under a directory (recursively, by path); or a glob's matches (a matched folder:
    the corpus files under it), by path. Several files must share one format, so a dataset's
    README.txt or dataset_infos.json is never read as prompts."""
    if _is_versioned(uri) or uri.startswith(("http://", "https://")):
        return [uri]
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.isfile(path):  # also a name with [ or ? in it
            return [uri]
        if fs.isdir(path):  # also a folder named so ("corpus [v2]")
            root, found = path, fs.find(path)
        elif any(c in path for c in "*?["):
            root, found = _glob_root(path), []
            for p in fs.glob(path):
                found += fs.find(p) if fs.isdir(p) else [p]
        else:
            return [uri]  # not there: the read says so
    except Exception:  # noqa: BLE001 - unreachable: the read names the cause
        return [uri]
    found = sorted({p for p in found if _is_corpus_file(p[len(root.rstrip("/")) :], fmt)}, key=_path_order)
    if not found:
        raise HarvestInputError(
            f"corpus.uri: {uri} names no corpus files (.jsonl, .json, .parquet, .txt, maybe compressed; "
            "hidden and _-prefixed files and folders are skipped); point it at a file, a directory of "
            "them or a glob"
        )
    if fmt == "auto":
        kinds: dict[str, list[str]] = {}
        for p in found:
            kind = next(k for k, suffixes in _SUFFIXES.items() if _bare(p).endswith(suffixes))
            kinds.setdefault(kind, []).append(p.rsplit("/", 1)[-1])
        if len(kinds) > 1:
            seen = "; ".join(f"{len(v)} {k} (e.g. {v[0]})" for k, v in kinds.items())
            raise HarvestInputError(
                f"corpus.uri: {uri} holds files of several formats ({seen}); a corpus's shards share "
                f"one: narrow it with a glob (e.g. {uri.rstrip('/')}/*.parquet) or set corpus.format"
            )
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    return [p if local else fs.unstrip_protocol(p) for p in found]


def _file_rows(spec: CorpusSpec, uri: str, limit: int | None) -> list[tuple[str, Any]]:
    fmt = _format(spec, uri)
    data = _read_bytes(uri)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return [(f"row {i}", r) for i, r in enumerate(pq.read_table(pa.BufferReader(data)).to_pylist())]
        except pa.ArrowException as e:
            raise HarvestInputError(f"corpus.uri: {uri} is not a readable Parquet file: {e}") from None
    if fmt == "text":
        return [(f"line {n}", {spec.text_field: line}) for n, line in _lines(_decode(data, uri))]
    return _json_rows(_decode(data, uri), uri, limit)


def read_corpus(spec: CorpusSpec) -> list[dict[str, Any]]:
    """Records {id, source, text | messages} in file order (path order for several files), every
    one checked; ids default to the record's position in the whole corpus."""
    import gc

    was = gc.isenabled()
    gc.disable()  # millions of new objects, no cycles: the collector's passes were half the read time
    try:
        return _read_corpus(spec)
    finally:
        if was:
            gc.enable()


def _read_corpus(spec: CorpusSpec) -> list[dict[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for uri in corpus_files(spec.uri, spec.format):
        left = None if spec.max_prompts is None else spec.max_prompts - len(rows)
        rows += [(f"{uri} {where}", r) for where, r in _file_rows(spec, uri, left)]
        if spec.max_prompts and len(rows) >= spec.max_prompts:
            break
    if spec.max_prompts:
        rows = rows[: spec.max_prompts]
    if not rows:
        raise HarvestInputError(f"corpus.uri: {spec.uri} holds no records")
    records = [_record(r, i, where, spec) for i, (where, r) in enumerate(rows)]
    _warn_repeated_ids(records, rows, spec)
    return records


def _warn_repeated_ids(records: list[dict[str, Any]], rows: list[tuple[str, Any]], spec: CorpusSpec) -> None:
    """Explicit ids that repeat (two shards numbering their rows from 0, say) are kept: the store
    numbers documents by position, so nothing is merged, but examples and errors that name a
    record by its id become ambiguous. Said once, with the first repeat's two places."""
    first: dict[str, str] = {}
    repeats = 0
    for rec, (where, _) in zip(records, rows, strict=True):
        if rec["id"] in first:
            if not repeats:
                example = (rec["id"], first[rec["id"]], where)
            repeats += 1
        else:
            first[rec["id"]] = where
    if repeats:
        get_logger("corpus").warning(
            "corpus_ids_repeat",
            uri=spec.uri,
            id_field=spec.id_field,
            repeats=repeats,
            example=f"id {example[0]!r} at {example[1]} and {example[2]}",
            fix="give records unique ids, or set corpus.id_field to a column that has them",
        )
