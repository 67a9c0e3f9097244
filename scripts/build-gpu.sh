#!/usr/bin/env bash
# Builds selfsup's GPU binaries without internet access beyond the package registries:
#   scripts/build-gpu.sh cuda    NVIDIA GPUs (needs only the driver's libcuda at run time)
#   scripts/build-gpu.sh wgpu    Vulkan GPUs (needs libvulkan and the GPU's Vulkan driver)
#   scripts/build-gpu.sh         both
# Each binary is copied to target/gpu/selfsup-<feature>, and stripped and compressed beside it
# (selfsup-<feature>.xz, about 35 MB for CUDA) to travel to a GPU machine, where
# scripts/gpu-check.sh takes either. With internet, a plain
# `cargo build --release --features cuda` does the same: burn's build script then downloads its
# LLVM bundle itself. Offline, this script seeds that bundle from PyPI's LLVM 23.1 static
# libraries (mlc-llvm-static and its extra targets, which add NVPTX), where the build script
# looks for it, so it skips the download.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/selfsup-target}"

# Where tracel-llvm-bundler 23.1.0-4 (a build dependency of cubecl-cuda) looks for LLVM, and the
# file that tells it the bundle is installed (see its src/config.rs).
data="${XDG_DATA_HOME:-$HOME/.local/share}/tracel"
bundle="$data/tracel-llvm-23.1.0-4"

seed_llvm() {
  if [ -e "$bundle/.tracel-llvm-installed" ]; then
    return
  fi
  local wheels unpacked
  wheels="$(mktemp -d)"
  unpacked="$data/mlc-llvm-static-23.1.1"
  python3 -m pip download --quiet --no-deps -d "$wheels" \
    mlc-llvm-static==23.1.1.post0 mlc-llvm-static-extra-targets==23.1.1.post0
  mkdir -p "$unpacked"
  for wheel in "$wheels"/*.whl; do
    python3 -m zipfile -e "$wheel" "$unpacked"
  done
  chmod +x "$unpacked/mlc_llvm_static/static/bin/"*
  mkdir -p "$data"
  ln -sfn "$unpacked/mlc_llvm_static/static" "$bundle"
  touch "$bundle/.tracel-llvm-installed"
  rm -rf "$wheels"
}

build() {
  local feature="$1" start
  start=$(date +%s)
  cargo build --release --features "$feature"
  mkdir -p target/gpu
  cp "$CARGO_TARGET_DIR/release/selfsup" "target/gpu/selfsup-$feature"
  strip -o "target/gpu/selfsup-$feature.stripped" "target/gpu/selfsup-$feature"
  xz -T0 -f "target/gpu/selfsup-$feature.stripped"
  mv "target/gpu/selfsup-$feature.stripped.xz" "target/gpu/selfsup-$feature.xz"
  echo "target/gpu/selfsup-$feature: $(du -h "target/gpu/selfsup-$feature" | cut -f1)" \
    "($(du -h "target/gpu/selfsup-$feature.xz" | cut -f1) stripped and compressed)," \
    "built in $(( $(date +%s) - start )) s"
}

case "${1:-all}" in
  cuda) seed_llvm; build cuda ;;
  wgpu) build wgpu ;;
  all) seed_llvm; build cuda; build wgpu ;;
  *) echo "usage: $0 [cuda|wgpu|all]" >&2; exit 2 ;;
esac
