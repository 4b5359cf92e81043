#!/usr/bin/env bash
# The GPU check in ONE call (< 8 minutes on an H200): kernel tests on the GPU, greedy parity with HF
# transformers on tiny random Llamas, then decode (batch 1/16/64/256) and prefill timings of a
# Llama-3-8B-shaped model with random weights in bf16 and FP8 against HF generate, with the copy
# bandwidth and bf16 GEMM rate measured first. Writes check.json, check.md, check.log and
# kernel_tests.log under $OUT.
#
#   device machine:   bash benchmarks/gpu/check.sh          (OUT is set there; python3 from the image)
#   this CPU machine: OUT=/tmp/gpu-check bash benchmarks/gpu/check.sh   (dry run: no GPU figures)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=python3
# This repo's virtual environment where there is one (the CPU machine); the device image has none.
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
command -v "$PY" >/dev/null || PY=python
# 450 s hard stop; check.py itself starts no new section after 420 s and saves after each one.
timeout -k 10 450 "$PY" benchmarks/gpu/check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/check.log"
