# Sourced by the project's scripts: where caches live and how to reach tools.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

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
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$NANOINFER_CACHE_DIR/target}"
BIN_DIR="$CARGO_TARGET_DIR/release"
VENV="$NANOINFER_CACHE_DIR/venv"
export PATH="$VENV/bin:$HOME/.cargo/bin:$PATH"

# Run a command as root (sudo when we are not root).
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
