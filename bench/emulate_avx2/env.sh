# source bench/emulate_avx2/env.sh, then run `make demo` (or anything) as usual: see sitecustomize.py
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export EMULATE_AVX2=1 PYTHONPATH="$_here${PYTHONPATH:+:$PYTHONPATH}"
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
