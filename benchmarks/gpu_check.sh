#!/usr/bin/env bash
# One prepared run for a lent GPU: the CUDA tests, the stats tests, then the ActivationStats
# benchmark on a training step and on a forward. Prints everything; writes JSON under $OUT.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
python -m pytest -q -p no:cacheprovider -p no:modelhooks -o addopts="" tests/test_cuda.py tests/test_stats.py tests/test_summary.py -x 2>&1 | tail -15
python benchmarks/bench_stats.py --device cuda --step --batch 32 --repeats 10 --profile --json "$OUT/stats_step_cuda.json"
python benchmarks/bench_stats.py --device cuda --batch 32 --repeats 10 --json "$OUT/stats_forward_cuda.json"

