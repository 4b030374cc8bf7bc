"""Reading users' corpora: every record checked up front, errors that name the record and the fix."""

import bz2
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffing.config import ConfigError, apply_overrides, load_config
from diffing.corpus import CorpusSpec, _format, read_corpus
from diffing.harvest import HarvestConfig
from diffing.models import HarvestInputError

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def _read(path, **kw):
    return read_corpus(CorpusSpec(uri=str(path), **kw))


def test_jsonl_lines_split_on_newlines_only(tmp_path):
    # U+2028 and U+0085 are legal raw inside a JSON string (json.dumps(ensure_ascii=False) writes
    # them); str.splitlines() would cut the record there. A BOM and CRLF line ends are tolerated.
    recs = [{"id": "a", "text": "one\u2028two\u0085three"}, {"id": "b", "messages": CHAT}]
    body = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\r\n\r\n"
    (tmp_path / "c.jsonl").write_bytes(b"\xef\xbb\xbf" + body.encode())
    out = _read(tmp_path / "c.jsonl")
    assert [r["id"] for r in out] == ["a", "b"]
    assert out[0]["text"] == "one\u2028two\u0085three" and out[1]["messages"] == CHAT
    assert out[0]["source"] == "unknown"


def test_text_files_are_one_document_per_line(tmp_path):
    (tmp_path / "c.txt").write_bytes("\ufeffFirst\fpage two\r\n\nSecond \u2028 line\n".encode())
    assert [r["text"] for r in _read(tmp_path / "c.txt")] == ["First\fpage two", "Second \u2028 line"]
    (tmp_path / "latin.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(HarvestInputError, match="latin.txt is not UTF-8.*re-encode"):
        _read(tmp_path / "latin.txt")


@pytest.mark.parametrize("suffix,opener", [(".jsonl.gz", gzip.open), (".jsonl.bz2", bz2.open)])
def test_compressed_corpora(tmp_path, suffix, opener):
    path = tmp_path / f"c{suffix}"
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "hello", "source": "s"}) + "\n")
    assert _read(path) == [{"id": "0", "source": "s", "text": "hello", "messages": None}]


def test_zstd_corpora_and_formats_that_are_not_read(tmp_path):
    import zstandard

    path = tmp_path / "c.jsonl.zst"  # the common form of large public corpora
    path.write_bytes(zstandard.ZstdCompressor().compress(json.dumps({"text": "zstd"}).encode() + b"\n"))
    assert [r["text"] for r in _read(path)] == ["zstd"]
    (tmp_path / "c.jsonl.zstd").write_bytes(path.read_bytes())  # the long suffix fsspec does not infer
    assert [r["text"] for r in _read(tmp_path / "c.jsonl.zstd")] == ["zstd"]
    (tmp_path / "c.csv").write_text("text\nhello\n")
    with pytest.raises(HarvestInputError, match=r"c.csv is a .csv file, which is not read.*Parquet"):
        _read(tmp_path / "c.csv")
    assert [r["text"] for r in _read(tmp_path / "c.csv", format="text")] == ["text", "hello"]  # as asked


def test_a_suffix_whose_codec_is_not_installed_names_the_package(tmp_path, monkeypatch):
    import importlib.util

    import fsspec.utils

    monkeypatch.setattr(fsspec.utils, "infer_compression", lambda name: None)  # as without lz4/zstandard
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    (tmp_path / "c.jsonl.lz4").write_bytes(b"\x04\x22\x4d\x18")
    with pytest.raises(HarvestInputError, match="needs the `lz4` package: pip install lz4"):
        _read(tmp_path / "c.jsonl.lz4")


def test_line_ends_mixed_corpora_and_extra_keys(tmp_path):
    (tmp_path / "mac.txt").write_bytes(b"first\rsecond\r")  # old Mac line ends
    assert [r["text"] for r in _read(tmp_path / "mac.txt")] == ["first", "second"]
    named = [{"role": "user", "content": "Hi", "name": "ann"}, CHAT[1]]
    pq.write_table(  # a mixed corpus: text rows carry an empty messages list
        pa.table({"text": ["plain", None], "messages": [[], named]}), tmp_path / "mixed.parquet"
    )
    out = _read(tmp_path / "mixed.parquet")
    assert out[0]["text"] == "plain" and out[0]["messages"] is None
    assert out[1]["messages"][0] == named[0]  # extra keys reach the chat template
    # Parquet structs share one schema, so the other turn reads name: None; that key is dropped
    # (a template testing `'name' in message` would print "None")
    assert out[1]["messages"][1] == CHAT[1]
    lines = ['{"text": "a"}', '{"text": "b"}', "not json"]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    assert len(_read(tmp_path / "c.jsonl", max_prompts=2)) == 2  # nothing past max_prompts is parsed


def test_compressed_data_under_a_plain_name_is_named(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(gzip.compress(b'{"text": "x"}\n'))
    with pytest.raises(HarvestInputError, match="c.jsonl is gzip-compressed but its name does not say so"):
        _read(tmp_path / "c.jsonl")
    assert _format(CorpusSpec(uri="s3://b/c.txt.gz?versionId=3")) == "text"


def test_a_json_array_file_is_accepted(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps([{"text": "a"}, {"messages": CHAT}], indent=2))
    assert [r["text"] for r in _read(tmp_path / "c.json")] == ["a", None]


@pytest.mark.parametrize(
    "lines,match",
    [
        (['{"text": "ok"}', '{"text": "cut'], "line 2: Unterminated string"),
        (['{"text": "ok"}', '"just a string"'], "line 2: a record must be a JSON object, got str"),
        (['{"text": "ok"}', '{"text": 42}'], "line 2: 'text' must be a string, got int"),
        (['{"text": null}'], "line 1: 'text' is null"),
        (
            ['{"prompt": "hi"}'],
            "line 1 has neither a 'text' nor a 'messages' field.*'prompt'.*text_field: prompt",
        ),
        (['{"prompt": "hi", "chosen": [], "rejected": []}'], "preference-pair.*messages_field: chosen"),
        (['{"instruction": "a", "input": "", "output": "b"}'], "corpus.text_field: instruction"),
        (['{"messages": []}'], "line 1: 'messages' is empty"),
        (['{"messages": "not json"}'], "'messages' is a string that is not JSON"),
        (
            ['{"messages": [{"from": "narrator", "value": "hi"}]}'],
            r"messages\[0\]: a ShareGPT turn from 'narrator'",
        ),
        (['{"conversations": []}'], "a ShareGPT corpus: corpus.messages_field: conversations"),
        (
            ['{"messages": [{"role": "assistant", "content": null}]}'],
            "content must be a string",
        ),
    ],
)
def test_bad_records_name_the_line_and_the_fix(tmp_path, lines, match):
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(HarvestInputError, match=match):
        _read(tmp_path / "c.jsonl")


def test_unreadable_json_lines_name_the_line_not_a_traceback(tmp_path):
    """Found by fuzzing (2026-12-08): Python's int-digit limit and deep nesting raised ValueError /
    RecursionError, which the JSON reader did not catch."""
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": "x", "id": ' + "7" * 5000 + "}\n")
    with pytest.raises(HarvestInputError, match="c.jsonl line 2: unreadable JSON"):
        _read(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(HarvestInputError, match="d.jsonl line 2: unreadable JSON"):
        _read(tmp_path / "d.jsonl")


def test_text_rows_whose_messages_column_holds_an_empty_json_string_are_text(tmp_path):
    rows = [{"text": "plain", "messages": "[]"}, {"text": "also", "messages": " null "}, {"messages": CHAT}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = _read(tmp_path / "c.jsonl")
    assert [(r["text"], r["messages"]) for r in out[:2]] == [("plain", None), ("also", None)]
    assert out[2]["messages"] == CHAT
    (tmp_path / "e.jsonl").write_text('{"messages": "[]"}\n')  # no text: still an empty chat
    with pytest.raises(HarvestInputError, match="line 1: 'messages' is empty"):
        _read(tmp_path / "e.jsonl")


def test_a_bad_record_anywhere_is_found_before_any_work(tmp_path):
    recs = [{"text": f"doc {i}"} for i in range(400)]
    recs[300] = {"messages": [{"role": "human"}]}
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with pytest.raises(HarvestInputError, match="line 301"):
        _read(tmp_path / "c.jsonl")
    assert len(_read(tmp_path / "c.jsonl", max_prompts=300)) == 300  # not read past max_prompts


def test_sharegpt_turns_read_as_role_and_content(tmp_path):
    rec = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi?"},
            {"from": "gpt", "value": "Hello.", "weight": 1},
        ]
    }
    (tmp_path / "c.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps({"conversations": CHAT}) + "\n")
    (got, plain) = _read(tmp_path / "c.jsonl", messages_field="conversations")
    assert got["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello.", "weight": 1},
    ]
    assert plain["messages"] == CHAT  # {role, content} turns as given


def test_parquet_corpora(tmp_path):
    table = pa.table(
        {
            "body": ["plain", None, None],
            "turns": [None, CHAT, CHAT],  # a list of structs
            "tag": ["x", "y", None],
        }
    )
    pq.write_table(table, tmp_path / "c.parquet")
    out = _read(tmp_path / "c.parquet", text_field="body", messages_field="turns", source_field="tag")
    assert [r["text"] for r in out] == ["plain", None, None]
    assert out[1]["messages"] == CHAT and out[2]["messages"] == CHAT
    assert [r["source"] for r in out] == ["x", "y", "unknown"]
    pq.write_table(pa.table({"messages": [json.dumps(CHAT)]}), tmp_path / "s.parquet")  # as a JSON string
    assert _read(tmp_path / "s.parquet")[0]["messages"] == CHAT
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(HarvestInputError, match=r"null.parquet row 1: 'text' is null"):
        _read(tmp_path / "null.parquet")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(HarvestInputError, match="not a readable Parquet file"):
        _read(tmp_path / "fake.parquet")


# --------------------------------------------------------------------------- --set value parsing


def _harvest_cfg(tmp_path, *sets):
    base = tmp_path / "h.yaml"
    base.write_text(
        "models: [{name: a, path: x}, {name: b, path: y}]\nlayer: 1\ncorpus: {uri: c.jsonl}\nstore: s\n"
    )
    return load_config(HarvestConfig, base, list(sets))


def test_set_values_keep_what_the_user_typed(tmp_path):
    cfg = _harvest_cfg(
        tmp_path,
        "corpus.uri=/data/run #2/c.jsonl",  # '#' is not a YAML comment here
        "store=2024-01-01",  # not a date
        "corpus.id_field=no",  # not a bool
        "corpus.source_field=1.10",  # not a float: the field wants a string
        "corpus.text_field=None",  # not null: the field wants a string
        "context_length=512",
        "outlier_norm_mult=None",
    )
    assert cfg.corpus.uri == "/data/run #2/c.jsonl" and cfg.store == "2024-01-01"
    assert (cfg.corpus.id_field, cfg.corpus.source_field, cfg.corpus.text_field) == ("no", "1.10", "None")
    assert cfg.context_length == 512 and cfg.outlier_norm_mult is None
    assert apply_overrides({}, ["a=[x, y]", "b=true", "c='quoted'", "d=1e-3"]) == {
        "a": ["x", "y"],
        "b": True,
        "c": "quoted",
        "d": "1e-3",  # YAML 1.1 reads this as a string; pydantic then reads the float
    }


def test_a_date_in_a_config_file_stays_the_string_typed(tmp_path):
    """YAML reads 2024-06-01 as a date, which no field takes and JSON cannot hold (a TypeError)."""
    base = tmp_path / "h.yaml"
    base.write_text(
        "models: [{name: a, path: x}, {name: b, path: y}]\nlayer: 1\ncorpus: {uri: c.jsonl}\n"
        "store: 2024-06-01\n"
    )
    assert load_config(HarvestConfig, base).store == "2024-06-01"
    base.write_text(base.read_text().replace("store: 2024-06-01", "store: !!binary aGk="))
    with pytest.raises(ConfigError, match="h.yaml: .*bytes"):
        load_config(HarvestConfig, base)
    with pytest.raises(ConfigError, match="a key part is empty"):
        _harvest_cfg(tmp_path, ".layer=2")
    for name in ("deep.yaml", "deep.json"):
        (tmp_path / name).write_text("[" * 100_000 + "]" * 100_000)
        with pytest.raises(ConfigError, match=f"{name} is nested too deeply"):
            load_config(HarvestConfig, tmp_path / name)


def test_nan_is_refused_infinity_is_no_limit(tmp_path):
    with pytest.raises(ConfigError, match="outlier_norm_mult: "):
        _harvest_cfg(tmp_path, "outlier_norm_mult=.nan")
    assert _harvest_cfg(tmp_path, "outlier_norm_mult=.inf").outlier_norm_mult == float("inf")
    with pytest.raises(ConfigError, match="context_length"):
        _harvest_cfg(tmp_path, "context_length=lots")


def test_evidence_files_keep_tokens_with_unicode_line_separators(tmp_path):
    # model_dump_json writes U+2028 / U+0085 raw; str.splitlines() would cut the line there
    from diffing.evidence import Example, LatentEvidence, read_jsonl, write_jsonl

    ev = LatentEvidence(
        latent=3, group="g", top=[Example(tokens=["a\u2028b", "c\x85"], acts=[1.0, 0.0], peak=0)]
    )
    write_jsonl(tmp_path / "e.jsonl", [ev, ev.model_copy(update={"latent": 4})])
    assert [e.top[0].tokens for e in read_jsonl(tmp_path / "e.jsonl", LatentEvidence)] == [
        ["a\u2028b", "c\x85"]
    ] * 2


def test_a_directory_or_glob_of_shards_is_one_corpus_in_path_order(tmp_path):
    """A dataset exported in shards (JSON Lines parts, compressed or not, beside what Spark, Jupyter
    and the hub leave there): their records in path order, ids by position in the whole corpus,
    errors naming the file."""
    d = tmp_path / "corpus"
    for sub in ("b", "_temporary/0", ".ipynb_checkpoints"):
        (d / sub).mkdir(parents=True)
    (d / "a.jsonl").write_text('{"text": "a0"}\n{"text": "a1"}\n')
    (d / "b" / "part-1.jsonl").write_text('{"text": "b0"}\n{"messages": ' + json.dumps(CHAT) + "}\n")
    with gzip.open(d / "c.json.gz", "wt") as f:
        f.write('{"text": "c0"}\n')
    for skipped in (
        "_SUCCESS",
        ".a.jsonl.crc",
        "README.md",
        "_temporary/0/part-9.jsonl",
        ".ipynb_checkpoints/a.jsonl",
    ):
        (d / skipped).write_text('{"text": "never read"}\n')
    recs = _read(d)
    assert [r["text"] or r["messages"][0]["content"] for r in recs] == ["a0", "a1", "b0", "Hi", "c0"]
    assert [r["id"] for r in recs] == [str(i) for i in range(5)]
    assert [r["text"] for r in _read(d, max_prompts=3)] == ["a0", "a1", "b0"]  # stops early
    # a glob: what it matches (a matched folder: the corpus files under it), with the same filter
    assert [r["text"] for r in _read(f"{d}/*")] == ["a0", "a1", "b0", None, "c0"]
    assert [r["text"] for r in _read(f"{d}/b*")] == ["b0", None]
    assert [r["text"] for r in _read(f"{d}/?.jsonl")] == ["a0", "a1"]
    # a file whose name looks like a glob is that file
    (tmp_path / "c[v2].jsonl").write_text('{"text": "v2"}\n')
    assert [r["text"] for r in _read(tmp_path / "c[v2].jsonl")] == ["v2"]
    # a bad record names its file
    (d / "d.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(HarvestInputError, match=r"d\.jsonl line 1 has neither"):
        _read(d)
    # shards of one format only: a dataset's README.txt or dataset_infos.json is not prompts
    (d / "d.jsonl").unlink()
    (d / "notes.txt").write_text("a note\n")
    with pytest.raises(HarvestInputError, match=r"several formats .*1 text \(e\.g\. notes\.txt\).*glob"):
        _read(d)
    assert len(_read(f"{d}/*.json*")) == 3  # the glob the error suggests
    with pytest.raises(HarvestInputError, match="names no corpus files"):
        _read(f"{d}/nothing-*.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarvestInputError, match="names no corpus files"):
        _read(tmp_path / "empty")
    # Parquet parts without a suffix (Spark) are read with corpus.format set
    p = tmp_path / "spark"
    p.mkdir()
    pq.write_table(pa.Table.from_pylist([{"text": "p0"}]), p / "part-00000")
    (p / "_SUCCESS").write_text("")
    assert [r["text"] for r in _read(p, format="parquet")] == ["p0"]


def test_a_corpus_on_s3_can_be_a_prefix_of_shards(s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3")
    for i in range(3):
        fs.pipe_file(f"crossdiff-test/corpus-shards/part-{i}.jsonl", f'{{"text": "s{i}"}}\n'.encode())
    fs.pipe_file("crossdiff-test/corpus-shards/_SUCCESS", b"")
    assert [r["text"] for r in _read("s3://crossdiff-test/corpus-shards")] == ["s0", "s1", "s2"]
    assert [r["text"] for r in _read("s3://crossdiff-test/corpus-shards/part-[12].jsonl")] == ["s1", "s2"]


def test_the_stamp_of_a_sharded_corpus_changes_with_any_shard(tmp_path):
    from jobs.stamps import corpus_stamp, file_stamp

    one = tmp_path / "c.jsonl"
    one.write_text('{"text": "a"}\n')
    assert corpus_stamp(str(one)) == file_stamp(str(one))  # one file: the stamp runs already have
    d = tmp_path / "d"
    d.mkdir()
    (d / "0.jsonl").write_text('{"text": "a"}\n')
    first = corpus_stamp(str(d))
    assert first and first == corpus_stamp(str(d))
    (d / "1.jsonl").write_text('{"text": "b"}\n')  # a shard added
    second = corpus_stamp(str(d))
    assert second != first
    (d / "0.jsonl").write_text('{"text": "c"}\n')  # one edited in place
    third = corpus_stamp(str(d))
    assert third not in (first, second)
    moved = tmp_path / "elsewhere" / "d"  # a run moved with its corpus keeps its stamp
    moved.parent.mkdir()
    d.rename(moved)
    assert corpus_stamp(str(moved)) == third


def test_shards_numbered_without_padding_read_in_number_order_and_repeated_ids_are_named(tmp_path):
    """part-2 before part-10 (a character sort reads part-10 first); padded names keep their order.
    Explicit ids repeated across shards (each numbering its rows from 0) are kept, with one
    warning naming the first repeat's two places."""
    from structlog.testing import capture_logs

    from diffing.logs import get_logger

    get_logger()  # configured before the capture, which a first configure() would undo
    d = tmp_path / "corpus"
    d.mkdir()
    for n in (10, 2, 1):
        (d / f"part-{n}.jsonl").write_text(f'{{"id": 0, "text": "p{n}"}}\n{{"id": 1, "text": "q{n}"}}\n')
    with capture_logs() as logs:
        recs = _read(d)
    assert [r["text"] for r in recs] == ["p1", "q1", "p2", "q2", "p10", "q10"]
    assert [r["id"] for r in recs] == ["0", "1"] * 3  # kept as given: the store numbers documents itself
    (warning,) = [e for e in logs if e["event"] == "corpus_ids_repeat"]
    assert warning["repeats"] == 4 and warning["log_level"] == "warning"
    assert "part-1.jsonl line 1" in warning["example"] and "part-2.jsonl line 1" in warning["example"]
    # zero-padded names, and names equal as numbers, in a fixed order
    p = tmp_path / "padded"
    p.mkdir()
    for name in ("part-010", "part-002", "part-10", "part-2"):
        (p / f"{name}.jsonl").write_text(f'{{"text": "{name}"}}\n')
    with capture_logs() as logs:
        assert [r["text"] for r in _read(p)] == ["part-002", "part-2", "part-010", "part-10"]
    assert not [e for e in logs if e["event"] == "corpus_ids_repeat"]  # position ids never repeat


def test_a_sharded_corpus_stamp_does_not_depend_on_read_order(tmp_path, monkeypatch):
    """Runs stamped when shards were read in character order (before 2026-12-07) keep their stamp."""
    import diffing.corpus as dc
    from jobs.stamps import corpus_stamp

    d = tmp_path / "c"
    d.mkdir()
    for n in (1, 2, 10):
        (d / f"part-{n}.jsonl").write_text(f'{{"text": "{n}"}}\n')
    now = corpus_stamp(str(d))
    real = dc.corpus_files
    monkeypatch.setattr(dc, "corpus_files", lambda uri, fmt="auto": sorted(real(uri, fmt)))  # character order
    assert corpus_stamp(str(d)) == now


def test_a_sharded_s3_corpus_is_stamped_from_one_listing(s3_endpoint, monkeypatch):
    """One listing per folder, not a HEAD per shard, and the same stamp a HEAD gives each shard."""
    import fsspec
    import s3fs

    from jobs import stamps

    fs = fsspec.filesystem("s3")
    for i in range(4):
        fs.pipe_file(f"crossdiff-test/stamped/part-{i}.jsonl", f'{{"text": "s{i}"}}\n'.encode())
    files = [f"s3://crossdiff-test/stamped/part-{i}.jsonl" for i in range(4)]
    want = [stamps.file_stamp(f) for f in files]
    heads = []
    real_info = s3fs.S3FileSystem._info
    monkeypatch.setattr(
        s3fs.S3FileSystem, "_info", lambda self, *a, **k: heads.append(a) or real_info(self, *a, **k)
    )
    assert stamps._listed_stamps(files) == want and heads == []
    stamp = stamps.corpus_stamp("s3://crossdiff-test/stamped")
    fs.pipe_file("crossdiff-test/stamped/part-2.jsonl", b'{"text": "changed"}\n')
    assert stamps.corpus_stamp("s3://crossdiff-test/stamped") != stamp


def test_lines_come_one_at_a_time_as_the_split_gave_them():
    """The line reader yields what `text.split("\\n")` (after CR normalising) kept, numbering included."""
    from diffing.corpus import _lines

    def split(text):
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        return [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]

    for text in [
        "",
        "\n",
        "a",
        "a\n",
        "a\nb",
        "a\r\nb\r\n\r\nc",
        "x\ry\n\n  \nz\u2028w\n",
        "\n\n\na\n\n",
        "\f\na",
    ]:
        assert list(_lines(text)) == split(text), text


def test_local_paths_with_query_and_pattern_characters_are_read_as_named(tmp_path):
    """A local `?` is part of the name (the .txt suffix after it still says text), and a folder
    named like a pattern ("corpus [1]") is a folder, not a glob that matches nothing."""
    odd = tmp_path / "corpus 中文 #%?x"
    odd.mkdir()
    (odd / "c.txt").write_text("first line\nsecond line\n")
    assert [r["text"] for r in _read(odd / "c.txt")] == ["first line", "second line"]
    folder = tmp_path / "corp [1]"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "one"}\n')
    (folder / "b.jsonl").write_text('{"text": "two"}\n')
    assert [r["text"] for r in _read(folder)] == ["one", "two"]


def test_a_relative_path_that_exists_only_beside_the_config_is_named(tmp_path, monkeypatch):
    """Relative paths are read from the current directory; a config written to run from its own
    folder gets a warning naming the field and the path to give instead (nothing is moved)."""
    from structlog.testing import capture_logs

    from diffing.config_io import read_config_file
    from diffing.logs import get_logger

    get_logger()  # configured before the capture, which a first configure() would undo
    (tmp_path / "cfgs" / "data").mkdir(parents=True)
    (tmp_path / "cfgs" / "data" / "prompts.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "cfgs" / "p.yaml").write_text(
        "harvest:\n  corpus: {uri: data/prompts.jsonl}\n  models:\n"
        "    - {name: base, path: google/gemma-2-9b}\n  store: here.txt\n"
    )
    (tmp_path / "here.txt").write_text("")  # exists where it is read: no warning
    monkeypatch.chdir(tmp_path)
    with capture_logs() as logs:
        data = read_config_file("cfgs/p.yaml")
    assert data["harvest"]["corpus"]["uri"] == "data/prompts.jsonl"  # as written
    said = [x for x in logs if x["event"] == "config.relative_path"]
    assert [(x["field"], x["value"]) for x in said] == [("harvest.corpus.uri", "data/prompts.jsonl")]
    assert "give 'cfgs/data/prompts.jsonl'" in said[0]["note"]
    monkeypatch.chdir(tmp_path / "cfgs")  # run from the config's folder: nothing to say
    with capture_logs() as logs:
        read_config_file("p.yaml")
    assert not [x for x in logs if x["event"] == "config.relative_path"]
