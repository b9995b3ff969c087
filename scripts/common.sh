# Sourced by the project's scripts: where caches live and how to reach tools.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# `-h` or `--help` among a script's arguments: print the comment block at the
# top of the script (what it does, how to call it) and exit 0, before
# anything is installed, built, started or written. (Sourced without
# arguments, "$@" here is the script's own.)
print_usage() {
  awk 'NR == 1 && /^#!/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}
for _arg in "$@"; do
  case "$_arg" in -h | --help) print_usage "$0"; exit 0 ;; esac
done
unset _arg

# Caches outside the clone: cargo target dir, the model, a Python venv with
# grpcurl. Root defaults to /var/cache/nanoinfer, others to ~/.cache/nanoinfer.
if [ -z "${NANOINFER_CACHE_DIR:-}" ]; then
  if [ "$(id -u)" = 0 ]; then
    NANOINFER_CACHE_DIR=/var/cache/nanoinfer
  else
    NANOINFER_CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/nanoinfer"
  fi
fi
export NANOINFER_CACHE_DIR
mkdir -p "$NANOINFER_CACHE_DIR"

# ggml's instruction set (docs/operations.md, "CPU build"). .cargo/config.toml compiles
# ggml for x86-64-v3 (AVX2, FMA, F16C, BMI2), which runs on any x86-64 CPU of
# the last decade. NANOINFER_CPU=auto (the default) adds AVX-512 when the CPU
# these scripts run on has it (AVX-512 F/CD/VL/DQ/BW, plus VBMI, VNNI and
# BF16 where present): measured here, 25-37% faster prompt processing and
# 2-4% faster decode. AMX and GGML_NATIVE are never enabled (ggml's AMX path
# crashes on some hosts). NANOINFER_CPU=portable keeps x86-64-v3, for
# binaries that will run on other machines (images); NANOINFER_CPU=avx512
# forces AVX-512. Each choice builds into its own target dir.
cpu_has() { grep -qw "$1" /proc/cpuinfo 2>/dev/null; }
NANOINFER_CPU="${NANOINFER_CPU:-auto}"
case "$NANOINFER_CPU" in
  auto)
    NANOINFER_ISA=x86-64-v3
    if [ "$(uname -m)" = x86_64 ] && cpu_has avx512f && cpu_has avx512cd && cpu_has avx512vl \
      && cpu_has avx512dq && cpu_has avx512bw; then
      NANOINFER_ISA=avx512
    fi ;;
  avx512) NANOINFER_ISA=avx512 ;;
  portable) NANOINFER_ISA=x86-64-v3 ;;
  *) echo "NANOINFER_CPU must be auto, portable or avx512 (got '$NANOINFER_CPU')" >&2; exit 2 ;;
esac
if [ "$NANOINFER_ISA" = avx512 ]; then
  export GGML_AVX512=ON
  if [ "$NANOINFER_CPU" = avx512 ] || cpu_has avx512vbmi; then export GGML_AVX512_VBMI=ON; fi
  if [ "$NANOINFER_CPU" = avx512 ] || cpu_has avx512_vnni; then export GGML_AVX512_VNNI=ON; fi
  if [ "$NANOINFER_CPU" = avx512 ] || cpu_has avx512_bf16; then export GGML_AVX512_BF16=ON; fi
fi
export NANOINFER_CPU NANOINFER_ISA
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$NANOINFER_CACHE_DIR/target-$NANOINFER_ISA}"
BIN_DIR="$CARGO_TARGET_DIR/release"
VENV="$NANOINFER_CACHE_DIR/venv"
export PATH="$VENV/bin:$HOME/.cargo/bin:$PATH"

# Run a command as root (sudo when we are not root).
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
