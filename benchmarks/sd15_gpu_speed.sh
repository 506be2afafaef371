#!/usr/bin/env bash
# Issue 15's GPU checks, for a session lent a GPU (none of this runs in the tests). On random weights of SD1.5's
# architecture (benchmarks/make_random_sd15.py; speed does not depend on the weights):
#   1. the speed table (bench_speed.py) at 256 and 512, batch 1, 4 and 16, in fp16 and in bf16: wall time,
#      bare forwards, overhead ratio, images/s, ratio to a 25-step CFG sampler, peak memory; full VAE vs a
#      TAESD-size AutoencoderTiny, NASA;
#   2. eager vs torch.compile (default, max-autotune) vs CUDA graphs (mode="reduce-overhead") for the one-step
#      512 call at batch 1 (latency-bound) and 16, fp16; goal: compiled batch 1 >= 2x faster than eager;
#   3. the FLOPs of a one-step 512 image counted from the model (torch FlopCounterMode) and the fraction of the
#      GPU's dense peak the eager call reaches (PEAK_TFLOPS: the datasheet's dense fp16/bf16 figure, default
#      989 for H100/H200 SXM); InstaFlow reports 0.09 s per 512 image on an A100, for comparison;
#   4. every training script under training/configs/{ddp,fsdp,deepspeed_zero2}.yaml for two micro steps with a
#      checkpoint, a resume and the export, at world size 1 (SD1.5-size teacher), with peak memory.
#
#   bash benchmarks/sd15_gpu_speed.sh OUT_DIR   # about 15-25 minutes on one H100/H200; each step writes as it goes
set -euo pipefail
out=${1:?usage: bash benchmarks/sd15_gpu_speed.sh OUT_DIR}
peak=${PEAK_TFLOPS:-989}
mkdir -p "$out"
py=${PYTHON:-python3}
for dtype in float16 bfloat16; do
  for size in sd15-512 sd15-256; do
    $py benchmarks/bench_speed.py --sizes "$size" --batch-sizes 1 4 16 --dtype "$dtype" --min-repeats 10 \
      --max-repeats 30 --out "$out/speed_${size}_${dtype}.md" --plot "$out/speed_${size}_${dtype}.png" || true
  done
done
for batch in 1 16; do
  $py benchmarks/bench_speed.py --batch-sizes --options --options-model sd15-512 --options-batch "$batch" \
    --options-tiny --dtype float16 --options-repeats 20 --warmup 3 \
    --option-list eager "torch.compile" "torch.compile max-autotune" "torch.compile reduce-overhead" channels_last "fused QKV" \
    --flops --peak-tflops "$peak" --out "$out/compile_sd15_512_batch$batch.md" || true
done
if command -v accelerate > /dev/null; then
  teacher=$(mktemp -d)/sd15-random
  $py benchmarks/make_random_sd15.py "$teacher"
  $py -m pip install -q deepspeed || echo "deepspeed did not install" >> "$out/summary.txt"
  $py training/configs/try_configs.py --teacher "$teacher" --num_processes 1 \
    --scripts train_tiny_decoder.py train_rectified_flow.py train_snoopi.py train_oms.py \
    --out "$out/training_configs_gpu.md" || true
fi
ls -l "$out"
