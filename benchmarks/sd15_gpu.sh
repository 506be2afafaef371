#!/usr/bin/env bash
# SD1.5-size checks that need a GPU, on random weights of SD1.5's architecture (speed and memory do not
# depend on the weights): NASA's cost in fp16 and bf16, and PG-SB training steps in bf16 with peak GPU memory.
#
#   bash benchmarks/sd15_gpu.sh OUT_DIR   # writes nasa_cost_sd15_*.md, snoopi_sd15_*.log, gpu_memory_*.csv, summary.txt
set -euo pipefail
out=${1:?usage: bash benchmarks/sd15_gpu.sh OUT_DIR}
mkdir -p "$out"
sd15=(--unet-channels 320 640 1280 1280 --cross-attention-dim 768 --text-layers 12 --vae-channels 128 256 512 512
      --resolution 512)
python3 benchmarks/bench_nasa_cost.py "${sd15[@]}" --dtype bfloat16 --out "$out/nasa_cost_sd15_bfloat16.md"
for batch in 1 4 16; do
  python3 benchmarks/bench_nasa_cost.py "${sd15[@]}" --dtype float16 --batch-size "$batch" \
    --out "$out/nasa_cost_sd15_float16_batch$batch.md"
done

teacher=$(mktemp -d)/sd15-random
python3 benchmarks/make_random_sd15.py "$teacher"
# SNOOPI's SD1.5 settings (docs/snoopi.md) at batch 16 per GPU for 20 steps, with a full and a LoRA student. Peak
# GPU memory is what nvidia-smi sees (CUDA context and allocator cache included).
common=(training/train_snoopi.py --pretrained_model_name_or_path "$teacher" --mixed_precision bf16
        --train_batch_size 16 --max_train_steps 20 --learning_rate 1e-6 --fake_learning_rate 1e-3
        --fake_lora_rank 64 --fake_lora_alpha 128 --gradient_checkpointing --checkpointing_steps 20
        --validation_steps 1000 --num_validation_images 2)
train() {
  local name=$1
  shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$out/gpu_memory_$name.csv" &
  local smi=$!
  python3 -m accelerate.commands.launch --num_processes 1 --mixed_precision bf16 "${common[@]}" "$@" \
    --output_dir "$(mktemp -d)/$name" > "$out/snoopi_sd15_$name.log" 2>&1
  kill "$smi"
  echo "$name student: peak GPU memory $(sort -n "$out/gpu_memory_$name.csv" | tail -1) MiB" | tee -a "$out/summary.txt"
}
train full
train lora --use_lora
