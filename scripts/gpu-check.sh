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
# (default "parity simclr dino") the cases to run.
# It writes there, and prints:
#   parity.jsonl      `check-device --case parity`: SimCLR (ResNet-18) and DINO (ViT) losses of
#                     3 steps on the GPU against the CPU's, same weights and batches (≤ 1e-3)
#   simclr.jsonl      SimCLR ResNet-18 (full width, CIFAR stem), batch 256, 32 px: img/s
#   dino.jsonl        DINO ViT-S/16, 2 × 224 px + 8 × 96 px crops, batch 64: img/s
#   memory.txt        the GPU memory in use at its peak during each case (nvidia-smi every
#                     100 ms, minus what was in use before; burn's memory pool included)
#   summary.md        all of it as a table, with the GPU and driver
# Every run's log goes to <case>.log. Exit status: non-zero if parity fails or a case errs.
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

# run CASE STEPS: one check-device case with the GPU memory sampled beside it.
status=0
run() {
  local case="$1" steps="$2" base sampler start
  base="$(used)"; base="${base:-0}"
  ( while sleep 0.1; do used; done ) > "$out/$case.mem" 2>/dev/null &
  sampler=$!
  start=$(date +%s)
  if ! "$bin" check-device --device "$device" --case "$case" --steps "$steps" \
      > "$out/$case.jsonl" 2> "$out/$case.log"; then
    status=1
    echo "$case FAILED: $(tail -3 "$out/$case.log")"
  fi
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  [ -s "$out/$case.jsonl" ] || echo "{\"case\":\"$case\",\"ok\":false,\"error\":\"see $case.log\"}" > "$out/$case.jsonl"
  local peak
  peak="$(sort -n "$out/$case.mem" | tail -1)"
  echo "$case: peak GPU memory $(( ${peak:-0} - base )) MiB above the $base MiB in use before; $(( $(date +%s) - start )) s" \
    | tee -a "$out/memory.txt"
  cat "$out/$case.jsonl"
}

cases="${CASES:-parity simclr dino}"
for case in $cases; do
  case "$case" in
    parity) run parity 3 ;;
    simclr) run simclr "$steps_simclr" ;;
    dino) run dino "$steps_dino" ;;
    *) echo "unknown case $case (parity, simclr, dino)" >&2; status=2 ;;
  esac
done

{
  echo
  echo "| case | result | peak GPU memory |"
  echo "|---|---|---|"
  for case in $cases; do
    [ -e "$out/$case.jsonl" ] || continue
    mem="$(grep "^$case:" "$out/memory.txt" | tail -1 | sed 's/.*peak GPU memory \([0-9-]*\) MiB.*/\1 MiB/')"
    while read -r line; do
      [ -n "$line" ] && echo "| $case | \`$line\` | $mem |"
    done < "$out/$case.jsonl"
  done
} | tee -a "$out/summary.md"
exit $status
