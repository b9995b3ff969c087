#!/usr/bin/env bash
# Smoke tests of a running coordinator with grpcurl, through server
# reflection (no .proto files needed).
#
#   ./test.sh health                     # {"status": "OK", "liveWorkers": 2}
#   ./test.sh infer                      # streams a completion (default prompt, 32 tokens)
#   ./test.sh infer "Custom prompt" 20   # custom prompt and max_tokens
#   ./test.sh list | describe            # what the server exposes
#   ./test.sh trace ["prompt"] [max]     # a request with its own W3C traceparent;
#                                        # prints where to find the trace in Jaeger
#
# Address: NANOINFER_ADDR (default 127.0.0.1:$NANOINFER_COORDINATOR_PORT,
# itself 50052 by default). TLS: NANOINFER_CA (the CA file; a secure local
# cluster writes it into secure.env), with NANOINFER_CLIENT_CERT and
# NANOINFER_CLIENT_KEY for a coordinator run with --tls-client-ca. grpcurl
# comes from the venv scripts/setup creates, or from PATH.
set -euo pipefail
. "$(dirname "$0")/scripts/common.sh"

ADDR="${NANOINFER_ADDR:-127.0.0.1:${NANOINFER_COORDINATOR_PORT:-50052}}"
ADDR="${ADDR#http://}"
ADDR="${ADDR#https://}"
if ! command -v grpcurl >/dev/null; then
  echo "grpcurl not found: run scripts/setup" >&2
  exit 1
fi

# NANOINFER_API_KEY, when set, goes as `authorization: Bearer <key>` (for a
# coordinator started with --api-keys-file).
auth=()
if [ -n "${NANOINFER_API_KEY:-}" ]; then auth=(-H "authorization: Bearer $NANOINFER_API_KEY"); fi
# grpcurl's transport flags: TLS with NANOINFER_CA, plaintext otherwise.
tls=(-plaintext)
if [ -n "${NANOINFER_CA:-}" ]; then
  tls=(-cacert "$NANOINFER_CA")
  if [ -n "${NANOINFER_CLIENT_CERT:-}" ]; then tls+=(-cert "$NANOINFER_CLIENT_CERT" -key "${NANOINFER_CLIENT_KEY:?NANOINFER_CLIENT_KEY goes with NANOINFER_CLIENT_CERT}"); fi
fi

json_string() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }

case "${1:-}" in
  health)
    grpcurl "${tls[@]}" "$ADDR" nanoinfer.InferService/Health
    ;;
  infer)
    prompt="${2:-Explain what a coordinator does in an LLM serving cluster.}"
    max_tokens="${3:-32}"
    [[ "$max_tokens" =~ ^[0-9]+$ ]] || { echo "max_tokens must be a non-negative integer" >&2; exit 2; }
    grpcurl "${tls[@]}" "${auth[@]}" -d "{\"prompt\": $(json_string "$prompt"), \"max_tokens\": $max_tokens}" \
      "$ADDR" nanoinfer.InferService/Infer
    ;;
  trace)
    prompt="${2:-Explain distributed tracing in one sentence.}"
    max_tokens="${3:-16}"
    [[ "$max_tokens" =~ ^[0-9]+$ ]] || { echo "max_tokens must be a non-negative integer" >&2; exit 2; }
    trace_id=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    span_id=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    grpcurl "${tls[@]}" "${auth[@]}" -H "traceparent: 00-$trace_id-$span_id-01" \
      -d "{\"prompt\": $(json_string "$prompt"), \"max_tokens\": $max_tokens, \"request_id\": \"trace-$trace_id\"}" \
      "$ADDR" nanoinfer.InferService/Infer
    echo "trace id: $trace_id (request_id trace-$trace_id)" >&2
    echo "Jaeger:   ${JAEGER_UI:-http://127.0.0.1:16686}/trace/$trace_id" >&2
    echo "(spans are exported when the cluster runs with OTEL_EXPORTER_OTLP_ENDPOINT set; see docs/deploy.md, Tracing)" >&2
    ;;
  list)
    grpcurl "${tls[@]}" "$ADDR" list
    ;;
  describe)
    grpcurl "${tls[@]}" "$ADDR" describe "${2:-nanoinfer.InferService}"
    ;;
  *)
    echo "usage: $0 health | infer [prompt] [max_tokens] | trace [prompt] [max_tokens] | list | describe [symbol]" >&2
    exit 2
    ;;
esac
