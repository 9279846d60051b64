#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): CUDA correctness, GPU benchmarks, a
# one-epoch bf16 timing of capsnet_mnist, and a batch of em_mnist one-epoch probes run side by
# side. Every step has its own time limit and log, so one failure costs only its own step.
#
#   mkdir -p .gpudata && cp -r ../shared/data/mnist .gpudata/   # ignored by git, carried
#   device run: bash benchmarks/gpu_check.sh   (carry .gpudata; writes under $OUT)
#
# The machine runs its own python3 (PyTorch with CUDA); capsnet is used from src/.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT" /tmp/gc
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 CAPSNET_DATA=$PWD/.gpudata
LOG=/tmp/gc/logs; mkdir -p $LOG
EM_SECONDS=${EM_SECONDS:-330}
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a $LOG/steps.txt; }

stamp "machine"
{ nvidia-smi; python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; nproc; } > $LOG/env.txt 2>&1

# em_mnist probes: 1 epoch of configs/mnist_em.py:epoch1_it3_small each (session 7's base: 3 iterations,
# em_mnist's own sizes; the recipe's lr has changed since), validated every 430 steps.
probe() {  # name, then --set overrides
  local name=$1; shift
  timeout $EM_SECONDS python3 -m capsnet train --config configs/mnist_em.py:epoch1_it3_small --device cuda --no-progress \
    --out /tmp/gc/em/$name --set eval_every=430 --set figures=False "$@" > $LOG/em_$name.txt 2>&1 &
}
stamp "em probes start"
probe base
probe base_s1 --set seed=1
probe it2 --set model_kwargs.iterations=2
probe it2_s1 --set model_kwargs.iterations=2 --set seed=1
probe b16 --set model_kwargs.primary_types=16
probe b16c32 --set model_kwargs.primary_types=16 --set model_kwargs.caps1_types=32 --set model_kwargs.caps2_types=32
probe w32 --set model_kwargs.conv_channels=32 --set model_kwargs.primary_types=32 --set model_kwargs.caps1_types=32 --set model_kwargs.caps2_types=32
probe lr2 --set lr=0.002
probe shift0 --set dataset_kwargs.shift=0
probe m02 --set objective_kwargs.steps=1000000
probe bs64 --set batch_size=64 --set lr=0.002 --set eval_every=215
probe it2b16c32 --set model_kwargs.iterations=2 --set model_kwargs.primary_types=16 --set model_kwargs.caps1_types=32 --set model_kwargs.caps2_types=32
probe pad1 --set model_kwargs.conv_padding=1
probe it2lr2 --set model_kwargs.iterations=2 --set lr=0.002
probe lam1 --set model_kwargs.final_lambda=1.0
probe b16_s1 --set model_kwargs.primary_types=16 --set seed=1

stamp "pytest tests/test_cuda.py tests/test_amp.py (beside the probes)"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_amp.py > $LOG/pytest_cuda.txt 2>&1
stamp "pytest rc=$?"
wait
stamp "em probes done"

stamp "benchmarks (GPU alone)"
timeout 150 python3 benchmarks/run.py --device cuda --models capsnet_mnist,em_small,efficient_capsnet_mnist --batches 128 \
  --out-dir /tmp/gc/bench --no-doc > $LOG/bench.txt 2>&1
stamp "bench rc=$?"

for bs in 128 512; do
  stamp "capsnet_mnist one epoch, bf16 autocast, batch $bs"
  timeout 60 python3 -m capsnet train --config configs/mnist.py:epoch1 --device cuda --no-progress --out /tmp/gc/dr_bf16_$bs \
    --set amp=bf16 --set batch_size=$bs --set eval_every=None --set figures=False --set checkpoint_every=100000 \
    > $LOG/dr_bf16_$bs.txt 2>&1
  stamp "rc=$?"
done

cp /tmp/gc/bench/*.json $OUT/ 2>/dev/null
tar czf $OUT/gpu_check.tgz --exclude="*.pt" --exclude=tensorboard -C /tmp/gc logs em dr_bf16_128 dr_bf16_512 2>/dev/null
cp $LOG/steps.txt $OUT/
stamp "done"
