#!/usr/bin/env bash
# Jaeger all-in-one beside the local cluster, to see nanoinfer's traces:
# OTLP/gRPC on 127.0.0.1:4317, the UI on http://127.0.0.1:16686.
#
#   deploy/jaeger.sh start     # needs a running Docker (or Podman) engine
#   OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 deploy/local-cluster.sh start
#   ./test.sh trace            # prints the trace id and its Jaeger URL
#   deploy/jaeger.sh stop
#
# Both nanoinfer processes read OTEL_EXPORTER_OTLP_ENDPOINT (or take
# --otlp-endpoint), so the local cluster needs nothing else. Without a
# container engine, any OTLP/gRPC collector on port 4317 works the same way.
set -euo pipefail
case "${1:-}" in
  -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
esac

NAME=nanoinfer-jaeger
IMAGE="${JAEGER_IMAGE:-jaegertracing/all-in-one:latest}"
engine=""
for e in docker podman; do
  if command -v "$e" >/dev/null && "$e" info >/dev/null 2>&1; then engine=$e; break; fi
done

case "${1:-}" in
  start)
    [ -n "$engine" ] || { echo "no running Docker or Podman engine found; start one, or run any OTLP/gRPC collector on 127.0.0.1:4317" >&2; exit 1; }
    "$engine" rm -f "$NAME" >/dev/null 2>&1 || true
    "$engine" run -d --name "$NAME" -e COLLECTOR_OTLP_ENABLED=true \
      -p 127.0.0.1:4317:4317 -p 127.0.0.1:16686:16686 "$IMAGE" >/dev/null
    echo "Jaeger: OTLP on 127.0.0.1:4317, UI on http://127.0.0.1:16686"
    echo "now: OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 deploy/local-cluster.sh start"
    ;;
  stop)
    [ -n "$engine" ] && "$engine" rm -f "$NAME" >/dev/null 2>&1 || true
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
