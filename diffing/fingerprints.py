"""Fingerprints of what a harvest read, recorded in its store so a later run can tell whether it
still has the same thing: a local model directory's contents, a tokenizer's vocabulary."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_stamp(path: str) -> str | None:
    """A local model directory's version: its config.json and, per weight file, the name, size
    and the sha256 of its first and last MiB (a retrained checkpoint differs in every byte; reading
    18 GB of weights would take minutes). None for a hub id or a path this machine cannot read."""
    root = Path(path)
    try:
        if not root.is_dir():
            return None
        h = hashlib.sha256((root / "config.json").read_bytes())
        for f in sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(_WEIGHTS)):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with open(f, "rb") as fh:
                if size <= 2 << 20:
                    h.update(fh.read())
                else:
                    h.update(fh.read(1 << 20))
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read(1 << 20))
        return h.hexdigest()[:16]
    except OSError:
        return None


def tokenizer_fingerprint(tok) -> str | None:
    """A tokenizer's vocabulary (every token and its id, added ones included) as a sha256 prefix: two
    tokenizers with one fingerprint read a store's token ids as the same text. None if it has none."""
    try:
        vocab = tok.get_vocab()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()[:16]
