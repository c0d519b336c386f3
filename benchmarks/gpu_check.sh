#!/usr/bin/env bash
# The GPU checks in one run: the CUDA tests, the stats tests, the example suites through the
# plugin on CUDA (snapshots made on the CPU must match), then the ActivationStats benchmark on a
# training step (with a profile) and on a forward, the statistics on ResNet-50 and ViT-B/16
# training steps at batch 32 and 64 (plain, default, default reduced in each hook, mean/std,
# GradientStats; fused=True too on ViT-B/16 at batch 32, as on ResNet-50 at 32), and model_memory against torch.cuda.max_memory_allocated() of real steps.
# Prints everything; writes JSON under $OUT.
#
# Needs torch with CUDA and pytest; syrupy, hypothesis and pytest-xdist are installed from
# wheels in .device-wheels/ when that folder exists (for a machine without a package index:
# `pip download -d .device-wheels syrupy hypothesis pytest-xdist` on one that has one).
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
if [ -d .device-wheels ]; then
  python -m pip install -q --no-index --find-links .device-wheels syrupy hypothesis pytest-xdist 2>&1 | tail -2
fi
plugin="-p pytest_modelhooks.plugin"
python -c "import importlib.metadata as m; raise SystemExit(not any(e.name == 'modelhooks' for e in m.entry_points(group='pytest11')))" && plugin=""
python -m pytest -q -p no:cacheprovider -p no:modelhooks -p pytester -o addopts="" tests/test_cuda.py tests/stats/test_stats.py tests/stats/test_held.py tests/summary/test_summary.py -x 2>&1 | tail -15
python -m pytest -q -p no:cacheprovider $plugin -o addopts="" examples --modelhooks-device=cuda -rs 2>&1 | tail -15
python benchmarks/bench_stats.py --device cuda --step --batch 32 --repeats 10 --profile --json "$OUT/stats_step_cuda.json"
python benchmarks/bench_stats.py --device cuda --batch 32 --repeats 10 --json "$OUT/stats_forward_cuda.json"
python benchmarks/bench_stats.py --device cuda --step --batch 64 --repeats 10 --core --json "$OUT/stats_step_resnet_64.json"
python benchmarks/bench_stats.py --device cuda --step --model vit --batch 32 --repeats 10 --core --with-fused \
  --json "$OUT/stats_step_vit_32.json"
python benchmarks/bench_stats.py --device cuda --step --model vit --batch 64 --repeats 10 --core \
  --json "$OUT/stats_step_vit_64.json"
python benchmarks/bench_memory.py --device cuda --skip-7b --json "$OUT/memory_cuda.json"
