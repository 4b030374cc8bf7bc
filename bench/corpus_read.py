"""The harvest driver's corpus work: `read_corpus` with the garbage collector paused (as shipped)
against it running (the baseline), and `_records_hash` fed one record at a time against the whole
JSON string; seconds and peak traced memory, same synthetic corpus, same process.

    python bench/corpus_read.py [--records 200000]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import random
import tempfile
import time
import tracemalloc


def _corpus(path: str, n: int) -> None:
    """Half plain text, half 1-3 turn chats; about 1.5 KB per record."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    with open(path, "w") as f:
        for i in range(n):
            if i % 2:
                turns = rng.randint(1, 3)
                msgs = []
                for _ in range(turns):
                    msgs += [
                        {"role": "user", "content": text(60)},
                        {"role": "assistant", "content": text(90)},
                    ]
                f.write(json.dumps({"messages": msgs, "source": "chat"}) + "\n")
            else:
                f.write(json.dumps({"text": text(250), "source": "text"}) + "\n")


def _peak_mib(fn) -> float:
    """Peak memory traced while `fn` runs (tracemalloc slows it: timed separately)."""
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return round(peak / 2**20, 1)


def _seconds(fn):
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t0, 2)


def main() -> None:
    from diffing.corpus import CorpusSpec, _read_corpus, read_corpus
    from jobs.harvest import _records_hash

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    args = ap.parse_args()
    path = os.path.join(tempfile.mkdtemp(), "corpus.jsonl")
    _corpus(path, args.records)
    spec = CorpusSpec(uri=path)
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "records": args.records,
        "file_gib": round(os.path.getsize(path) / 2**30, 3),
    }
    read_running, res["read_gc_running_s"] = _seconds(lambda: _read_corpus(spec))
    del read_running
    records, res["read_gc_paused_s"] = _seconds(lambda: read_corpus(spec))
    res["read_speedup"] = round(res["read_gc_running_s"] / res["read_gc_paused_s"], 2)

    def whole():
        return hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()

    digest, res["hash_whole_string_s"] = _seconds(whole)
    streamed, res["hash_per_record_s"] = _seconds(lambda: _records_hash(records))
    assert digest == streamed, "the streamed digest must equal the whole string's"
    res["hash_whole_string_peak_mib"] = _peak_mib(whole)
    res["hash_per_record_peak_mib"] = _peak_mib(lambda: _records_hash(records))
    os.remove(path)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
