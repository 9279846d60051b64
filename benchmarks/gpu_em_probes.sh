#!/usr/bin/env bash
# em_mnist one-epoch probes side by side on a lent GPU (the `device` tool), one thread each:
# configs/mnist_em.py:epoch1_it3_small (session 7's base: 3 iterations, em_mnist's own sizes; the
# recipe's lr has changed since) with the overrides below, validated every 430 steps. Carry .gpudata
# (see gpu_check.sh). Writes $OUT/em_probes.tgz (metrics.csv / metrics.json of every probe).
set -u
OUT=${OUT:-/tmp/gpu_em}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 CAPSNET_DATA=$PWD/.gpudata
SECONDS_EACH=${SECONDS_EACH:-290}
mkdir -p /tmp/ge/logs
probe() {  # name, then --set overrides
  local name=$1; shift
  timeout $SECONDS_EACH python3 -m capsnet train --config configs/mnist_em.py:epoch1_it3_small --device cuda --threads 1 --no-progress \
    --out /tmp/ge/$name --set eval_every=430 --set figures=False "$@" > /tmp/ge/logs/$name.txt 2>&1 &
}
IT2="--set model_kwargs.iterations=2"
WIDE="--set model_kwargs.primary_types=16 --set model_kwargs.caps1_types=32 --set model_kwargs.caps2_types=32"
LAM1="--set model_kwargs.final_lambda=1.0"
M02="--set objective_kwargs.steps=1000000"
probe base
probe it2 $IT2
probe it2_s1 $IT2 --set seed=1
probe it2_lam1 $IT2 $LAM1
probe it2_m02 $IT2 $M02
probe it2_wide $IT2 $WIDE
probe it2_lr2 $IT2 --set lr=0.002
probe it2_shift0 $IT2 --set dataset_kwargs.shift=0
probe it2_combo $IT2 $LAM1 $M02 $WIDE
probe it3_lam1_m02 $LAM1 $M02
probe it3_wide $WIDE
probe it2_m05 $IT2 --set objective_kwargs.end=0.5
wait
nvidia-smi --query-gpu=name,memory.used --format=csv > /tmp/ge/logs/smi.txt 2>&1
tar czf $OUT/em_probes.tgz --exclude="*.pt" --exclude=tensorboard --exclude=figures -C /tmp/ge .
echo done
