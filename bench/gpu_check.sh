#!/usr/bin/env bash
# The GPU checks, as one script for a GPU node with torch (CUDA) installed: the gpu-marked tests
# (cuda vs cpu parity, Ray Train over NCCL, harvest on a GPU actor) and the Ray glue benchmark on
# the GPU at two crosscoder shapes (Gemma-2-2b-like and the Gemma-2-9b target). Results go to
# $OUT (default /tmp/crossdiff-gpu-check). Python packages missing from the node's image may be
# given as wheels in .whl/ (installed into /tmp/site, nothing else touched): `bash bench/gpu_wheels.sh`
# makes them here (Ray's wheel stripped to fit a 64 MiB transfer).
#
#     bash bench/gpu_check.sh            # every section; each has its own time limit
#     SECTIONS="tests" bash bench/gpu_check.sh
#     SECTIONS="fit prefetch9b prefetch2b" bash bench/gpu_check.sh   # the in-process read-ahead
#     SECTIONS="harvest9b" bash bench/gpu_check.sh    # harvest actor: forward vs store write
#     SECTIONS="layers9b" bash bench/gpu_check.sh     # harvest actor's GPU memory: layers 0-20 vs all
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/crossdiff-gpu-check}
SECTIONS=${SECTIONS:-"tests glue2b glue9b"}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" RAY_AUTH_MODE=disabled CROSSDIFF_LOG_JSON=0
export PYTHONUNBUFFERED=1 CROSSDIFF_CACHE=${CROSSDIFF_CACHE:-/tmp/crossdiff-cache}
export RAY_TRAIN_V2_ENABLED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, ray, transformers, pyarrow; print('torch', torch.__version__, 'ray', ray.__version__,
'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__, 'cuda', torch.cuda.is_available(),
'cpus', __import__('os').cpu_count())" | tee -a "$OUT/gpu.txt"

for s in $SECTIONS; do
  t0=$(date +%s)
  case $s in
    tests)
      timeout 240 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/test_gpu.py >"$OUT/tests.log" 2>&1
      echo "== tests rc=$? ($(($(date +%s) - t0)) s)"; grep -E "passed|failed|error|FAILED|ERROR" "$OUT/tests.log" | tail -12 ;;
    parity)  # the training-step parity tests alone (seconds)
      timeout 90 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/test_gpu.py -k train_steps \
        >"$OUT/parity.log" 2>&1
      echo "== parity rc=$? ($(($(date +%s) - t0)) s)"; tail -3 "$OUT/parity.log" ;;
    glue2b)  # Gemma-2-2b-like residual width, 16x dictionary
      timeout 240 python3 bench/fit_ray_throughput.py --device cuda --workers 1 --threads 8 --ray-cpus 12 \
        --d-model 2304 --n-latents 32768 --k 64 --batch 4096 --features 2048 --tokens 393216 \
        --json "$OUT/glue2b.json" >"$OUT/glue2b.log" 2>&1
      echo "== glue2b rc=$? ($(($(date +%s) - t0)) s)"; cat "$OUT/glue2b.json" 2>/dev/null || tail -20 "$OUT/glue2b.log" ;;
    glue9b)  # the shipped Gemma-2-9b target shape (jobs/configs/gemma2-9b.fit.yaml)
      timeout 260 python3 bench/fit_ray_throughput.py --device cuda --workers 1 --threads 8 --ray-cpus 12 \
        --d-model 3584 --n-latents 114688 --k 100 --batch 2048 --features 4096 --tokens 163840 \
        --json "$OUT/glue9b.json" >"$OUT/glue9b.log" 2>&1
      echo "== glue9b rc=$? ($(($(date +%s) - t0)) s)"; cat "$OUT/glue9b.json" 2>/dev/null || tail -20 "$OUT/glue9b.log" ;;
    fit)  # the in-process fits on cuda (read-ahead thread with pinned batches) against CPU / Ray
      timeout 150 python3 -m pytest -q -ra -m gpu -p no:cacheprovider tests/test_gpu.py -k "fit_on_cuda or nccl" \
        >"$OUT/fit.log" 2>&1
      echo "== fit rc=$? ($(($(date +%s) - t0)) s)"; tail -3 "$OUT/fit.log" ;;
    prefetch9b)  # in-process read-ahead vs none at the Gemma-2-9b target shape
      timeout 200 python3 bench/fit_prefetch.py --device cuda --threads 8 --repeat 1 --d-model 3584 \
        --n-latents 114688 --k 100 --batch 2048 --features 4096 --tokens 163840 \
        --json "$OUT/prefetch9b.json" >"$OUT/prefetch9b.log" 2>&1
      echo "== prefetch9b rc=$? ($(($(date +%s) - t0)) s)"; tail -14 "$OUT/prefetch9b.log" ;;
    harvest9b)  # one harvest actor, three random Gemma-2-9b-shaped models: inline vs 4 background writers
      timeout 300 python3 bench/harvest_shard.py --arch gemma2-9b --models 3 --layer 20 --device cuda \
        --prompts 64 --doc-tokens 1024 --batch-prompts 16 --shards 5 --write-threads 0,4 \
        --json "$OUT/harvest9b.json" >"$OUT/harvest9b.log" 2>&1
      echo "== harvest9b rc=$? ($(($(date +%s) - t0)) s)"; grep '^{"write_threads' "$OUT/harvest9b.log" ;;
    layers9b)  # GPU memory of a harvest actor that keeps layers 0-20 of three Gemma-2-9b models, then all 42
      for f in "" --all-layers; do
        timeout 170 python3 bench/harvest_shard.py --arch gemma2-9b --models 3 --layer 20 --device cuda \
          --prompts 64 --doc-tokens 1024 --batch-prompts 16 --shards 2 --write-threads 4 $f \
          --json "$OUT/layers9b${f}.json" >"$OUT/layers9b${f}.log" 2>&1
        echo "== layers9b $f rc=$? ($(($(date +%s) - t0)) s)"
        grep -E '^\{"write_threads|"(layers_kept|weights_gb|build_s)"' "$OUT/layers9b${f}.log"
      done ;;
    prefetch2b)  # and at a Gemma-2-2b-like width
      timeout 180 python3 bench/fit_prefetch.py --device cuda --threads 8 --repeat 1 --d-model 2304 \
        --n-latents 32768 --k 64 --batch 4096 --features 2048 --tokens 262144 \
        --json "$OUT/prefetch2b.json" >"$OUT/prefetch2b.log" 2>&1
      echo "== prefetch2b rc=$? ($(($(date +%s) - t0)) s)"; tail -14 "$OUT/prefetch2b.log" ;;
  esac
done
