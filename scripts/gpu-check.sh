#!/usr/bin/env bash
# The GPU check, for an NVIDIA machine with a driver but no Rust toolchain: the binary built by
# scripts/build-gpu.sh travels there, as it is or as the stripped target/gpu/selfsup-cuda.xz
# that build-gpu.sh writes beside it (35 MB, under what a device call carries).
#
#   scripts/gpu-check.sh [BINARY] [OUTDIR]
#
# BINARY defaults to target/gpu/selfsup-cuda (or its .xz); OUTDIR to $OUT, else gpu-check/.
# Environment: DEVICE (default cuda; cuda:N, vulkan, or cpu to try the script itself),
# STEPS_SIMCLR (default 20) and STEPS_DINO (default 8) batches in each timed epoch, CASES
# (default "parity simclr dino profile") the cases to run, PRECISIONS (default "f32 bf16") the
# `train.precision` of each throughput case (f16 too; PyTorch's reference runs f32 and bf16),
# CASE_TIMEOUT (seconds; default none) a limit on each run, so that a lease's last minutes still
# give the cases before.
# It writes there, and prints:
#   parity.jsonl      `check-device --case parity`: SimCLR (ResNet-18) and DINO (ViT) losses of
#                     3 steps on the GPU against the CPU's, same weights and batches (within
#                     1e-3, or 10× the CPU's own drift from TF32-rounded weights: src/device_check.rs)
#   simclr.jsonl      SimCLR ResNet-18 (full width, CIFAR stem), batch 256, 32 px: img/s and the
#                     timed epoch's mean loss (simclr-bf16.jsonl: the same in bf16)
#   dino.jsonl        DINO ViT-S/16, 2 × 224 px + 8 × 96 px crops, batch 64 (dino-bf16.jsonl)
#   <case>-torch.jsonl  the same recipe in PyTorch (benches/reference/gpu_check_torch.py), on
#                     the same device in the same run, where python3 has torch, timm and
#                     torchvision (TORCH=0 skips it); <case>-bf16-torch.jsonl under
#                     torch.autocast(bfloat16)
#   profile-<case>-<precision>/cubecl-profile.log  CubeCL's own per-kernel profile
#                     (`[profiling.logger]` of a cubecl.toml, level "basic") of 2 + 2 steps of
#                     SimCLR and of DINO in each precision: one table of kernels, launches, time
#                     and share per step (after each sync); the last table is one whole training
#                     step. CUDA and Vulkan only (the CPU backend has no CubeCL: skipped there).
#   memory.txt        the GPU memory in use at its peak during each case (nvidia-smi every
#                     100 ms, minus what was in use before; burn's memory pool included)
#   summary.md        all of it as a table, with the GPU and driver
# Every run's log goes to <name>.log (simclr.log, simclr-bf16.log, simclr-bf16-torch.log, ...). Exit status: non-zero if parity fails or a case errs.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$(realpath -m "${1:-$root/target/gpu/selfsup-cuda}")"
out="$(realpath -m "${2:-${OUT:-$root/gpu-check}}")"
mkdir -p "$out"
: > "$out/memory.txt"
if [ ! -e "$bin" ] && [ -e "$bin.xz" ]; then bin="$bin.xz"; fi
case "$bin" in
  *.xz)
    xz -dc "$bin" > "$out/selfsup" || { echo "cannot unpack $bin" >&2; exit 2; }
    chmod +x "$out/selfsup" && bin="$out/selfsup" ;;
esac
[ -x "$bin" ] || { echo "no binary at $bin (build it with scripts/build-gpu.sh cuda)" >&2; exit 2; }
device="${DEVICE:-cuda}"
steps_simclr="${STEPS_SIMCLR:-20}"
steps_dino="${STEPS_DINO:-8}"

gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
echo "GPU: $gpu" | tee "$out/summary.md"
echo "binary: $bin ($("$bin" --version))" | tee -a "$out/summary.md"

# MiB in use on the GPU that DEVICE names (cuda:N → GPU N), or nothing.
gpu_index="${device#*:}"; [ "$gpu_index" = "$device" ] && gpu_index=0
used() {
  local v
  v="$(nvidia-smi -i "$gpu_index" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1)"
  case "$v" in ''|*[!0-9]*) ;; *) echo "$v" ;; esac
}

# measure NAME COMMAND...: runs COMMAND with its stdout in NAME.jsonl, its stderr in NAME.log, and
# the GPU memory sampled beside it.
status=0
names=()
measure() {
  local name="$1" base sampler start peak
  shift
  names+=("$name")
  base="$(used)"; base="${base:-0}"
  ( while sleep 0.1; do used; done ) > "$out/$name.mem" 2>/dev/null &
  sampler=$!
  start=$(date +%s)
  if ! timeout -k 10 "${CASE_TIMEOUT:-0}" "$@" > "$out/$name.jsonl" 2> "$out/$name.log"; then
    status=1
    echo "$name FAILED: $(tail -3 "$out/$name.log")"
  fi
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  [ -s "$out/$name.jsonl" ] || echo "{\"case\":\"$name\",\"ok\":false,\"error\":\"see $name.log\"}" > "$out/$name.jsonl"
  peak="$(sort -n "$out/$name.mem" | tail -1)"
  echo "$name: peak GPU memory $(( ${peak:-0} - base )) MiB above the $base MiB in use before; $(( $(date +%s) - start )) s" \
    | tee -a "$out/memory.txt"
  cat "$out/$name.jsonl"
}

# The PyTorch reference runs where python3 has torch, timm and torchvision, on CUDA or the CPU
# (PyTorch has no Vulkan device), unless TORCH=0.
torch_ok=""
case "$device" in
  cuda*|cpu) [ "${TORCH:-1}" = 1 ] && python3 -c 'import torch, timm, torchvision' 2>/dev/null \
    && torch_ok=yes ;;
esac

# run CASE STEPS [PRECISION]: one check-device case (named CASE, or CASE-PRECISION below f32),
# then (for a throughput case in f32 or bf16) the PyTorch reference of
# benches/reference/gpu_check_torch.py as NAME-torch.
run() {
  local case="$1" steps="$2" precision="${3:-f32}" name="$1"
  [ "$precision" = f32 ] || name="$case-$precision"
  measure "$name" "$bin" check-device --device "$device" --case "$case" --steps "$steps" \
    --precision "$precision"
  if [ "$case" != parity ] && [ -n "$torch_ok" ] && [ "$precision" != f16 ]; then
    measure "$name-torch" env DEVICE="$device" AMP="$precision" PYTHONUNBUFFERED=1 \
      python3 "$root/benches/reference/gpu_check_torch.py" "$case" "$steps"
  fi
}

# profile CASE PRECISION: CubeCL's per-kernel timing of a short run of CASE, from a folder whose
# cubecl.toml turns it on (CubeCL reads the file from the working directory).
profile() {
  local case="$1" precision="$2" dir="$out/profile-$1-$2"
  mkdir -p "$dir"
  printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\nappend = false\n' \
    "$dir/cubecl-profile.log" > "$dir/cubecl.toml"
  pushd "$dir" > /dev/null || return
  measure "profile-$case-$precision" "$bin" check-device --device "$device" --case "$case" \
    --steps 2 --precision "$precision"
  popd > /dev/null || return
}

cases="${CASES:-parity simclr dino profile}"
for case in $cases; do
  case "$case" in
    parity) run parity 3 ;;
    profile)
      [ "$device" = cpu ] && { echo "profile: CubeCL's profiler needs cuda or vulkan, skipped"; continue; }
      for c in simclr dino; do for p in ${PRECISIONS:-f32 bf16}; do profile "$c" "$p"; done; done ;;
    simclr) for p in ${PRECISIONS:-f32 bf16}; do run simclr "$steps_simclr" "$p"; done ;;
    dino) for p in ${PRECISIONS:-f32 bf16}; do run dino "$steps_dino" "$p"; done ;;
    *) echo "unknown case $case (parity, profile, simclr, dino)" >&2; status=2 ;;
  esac
done

{
  echo
  echo "| case | result | peak GPU memory |"
  echo "|---|---|---|"
  for name in ${names[@]+"${names[@]}"}; do
    mem="$(grep "^$name:" "$out/memory.txt" | tail -1 | sed 's/.*peak GPU memory \([0-9-]*\) MiB.*/\1 MiB/')"
    while read -r line; do
      [ -n "$line" ] && echo "| $name | \`$line\` | $mem |"
    done < "$out/$name.jsonl"
  done
} | tee -a "$out/summary.md"
exit $status
