#!/usr/bin/env bash
# The Python packages bench/gpu_check.sh needs on the lent GPU machines (their image has torch,
# transformers, pyarrow, ... but not Ray, pydantic or structlog; nothing can be fetched there), as
# wheels in .whl/ for the device tool's `carry` (64 MiB per call). Ray's own wheel (79 MB) is over
# that limit: its Java jars, RLlib, Ray LLM and the dashboard's static build are left out (42 MB).
#
#     bash bench/gpu_wheels.sh      # then carry [".whl"] (.whl/ is git-ignored)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl "ray==$(ver ray)" "pydantic==$(ver pydantic)" \
  "pydantic_core==$(ver pydantic_core)" annotated-types "typing-inspection==$(ver typing-inspection)" \
  "structlog==$(ver structlog)" "tensorboardX==$(ver tensorboardX)" "jsonschema==$(ver jsonschema)" \
  jsonschema-specifications referencing rpds-py
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
whl=$(ls .whl/ray-*.whl)
(cd "$tmp" && unzip -q "$OLDPWD/$whl" && rm -rf ray/jars ray/rllib ray/llm ray/dashboard/client/build \
  && find . -name "*.js.map" -delete && rm "$OLDPWD/$whl" && zip -q -9 -r "$OLDPWD/$whl" .)
du -sh .whl
