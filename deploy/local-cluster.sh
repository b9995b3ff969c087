#!/usr/bin/env bash
# A local nanoinfer cluster on loopback: etcd, two workers, one coordinator.
#
#   deploy/local-cluster.sh start    # start everything, wait until healthy
#   deploy/local-cluster.sh status   # pids, ports, coordinator health
#   deploy/local-cluster.sh stop     # SIGTERM in order: coordinator, workers, etcd
#   deploy/local-cluster.sh start --secure   # the same with TLS everywhere (or NANOINFER_SECURE=1)
#
# Secure mode: scripts/gen-certs writes a CA and certificates into
# $NANOINFER_RUN_DIR/certs; etcd serves TLS only, requires client
# certificates and has auth on with the roles of deploy/etcd-auth.sh (each
# worker its own user, nanoinfer-worker-<id>, which may write only its key); workers
# and coordinator use mutual TLS (--cluster-*); the coordinator's public port
# is TLS (--tls-cert) and needs an API key (--api-keys-file, one key
# generated). Everything a client needs is written to
# $NANOINFER_RUN_DIR/secure.env: `. <that file>` and then ./test.sh, the CLI
# and the bench use TLS and the key (NANOINFER_CA, NANOINFER_API_KEY).
#
# Ports (env overrides): coordinator 50052 (NANOINFER_COORDINATOR_PORT) with
# metrics on 9052 (NANOINFER_COORDINATOR_METRICS_PORT) and the OpenAI-compatible
# HTTP API on 8080 (NANOINFER_COORDINATOR_HTTP_PORT), workers 50061 and 50062
# (NANOINFER_WORKER_PORTS, one worker per port) with metrics on 9061 and 9062
# (NANOINFER_WORKER_METRICS_PORTS), etcd 2379/2380
# (NANOINFER_ETCD_PORT / NANOINFER_ETCD_PEER_PORT). Logs and pids live in
# $NANOINFER_RUN_DIR (default: <cache dir>/cluster). The two workers share the
# machine's cores: each gets an equal share (at least 1 thread) so they do not
# fight; NANOINFER_WORKER_THREADS overrides it. With OTEL_EXPORTER_OTLP_ENDPOINT
# set (e.g. http://127.0.0.1:4317, see deploy/jaeger.sh) every process exports
# its spans there. NANOINFER_MODEL (a GGUF path) replaces the default model
# (scripts/fetch-model). Needs the binaries and the model: run scripts/setup first.
set -euo pipefail
. "$(dirname "$0")/../scripts/common.sh"

RUN_DIR="${NANOINFER_RUN_DIR:-$NANOINFER_CACHE_DIR/cluster}"
COORD_PORT="${NANOINFER_COORDINATOR_PORT:-50052}"
COORD_METRICS_PORT="${NANOINFER_COORDINATOR_METRICS_PORT:-9052}"
COORD_HTTP_PORT="${NANOINFER_COORDINATOR_HTTP_PORT:-8080}"
read -r -a WORKER_PORTS <<<"${NANOINFER_WORKER_PORTS:-50061 50062}"
read -r -a WORKER_METRICS_PORTS <<<"${NANOINFER_WORKER_METRICS_PORTS:-9061 9062 9063 9064 9065 9066 9067 9068}"
ETCD_PORT="${NANOINFER_ETCD_PORT:-2379}"
ETCD_PEER_PORT="${NANOINFER_ETCD_PEER_PORT:-2380}"
WORKERS=${#WORKER_PORTS[@]}
CERTS="$RUN_DIR/certs"
SECURE=0
if [ "${NANOINFER_SECURE:-0}" = 1 ] || [ "${2:-}" = "--secure" ] || [ -f "$RUN_DIR/secure.env" ]; then
  SECURE=1
fi
if [ "$SECURE" = 1 ]; then
  ETCD_URL="https://127.0.0.1:$ETCD_PORT"
  COORD_URL="127.0.0.1:$COORD_PORT"
  etcd_client_flags() { # certificate name, etcd user and password file without nanoinfer-/etcd-: sets the array `secure`
    secure=(--etcd-ca "$CERTS/ca.pem" --etcd-cert "$CERTS/$1.pem" --etcd-key "$CERTS/$1.key"
      --etcd-username "nanoinfer-$2" --etcd-password-file "$CERTS/etcd-$2.password")
  }
  cli() { "$BIN_DIR/nanoinfer" --addr "$COORD_URL" --ca "$CERTS/ca.pem" "$@"; }
  etcdctl_() {
    ETCDCTL_API=3 etcdctl --endpoints "$ETCD_URL" --cacert "$CERTS/ca.pem" \
      --cert "$CERTS/coordinator.pem" --key "$CERTS/coordinator.key" "$@"
  }
else
  ETCD_URL="http://127.0.0.1:$ETCD_PORT"
  COORD_URL="http://127.0.0.1:$COORD_PORT"
  etcd_client_flags() { secure=(); }
  cli() { "$BIN_DIR/nanoinfer" --addr "$COORD_URL" "$@"; }
  etcdctl_() { ETCDCTL_API=3 etcdctl --endpoints "$ETCD_URL" "$@"; }
fi
if [ "${#WORKER_METRICS_PORTS[@]}" -lt "$WORKERS" ]; then
  echo "NANOINFER_WORKER_METRICS_PORTS needs one port per worker ($WORKERS)" >&2
  exit 2
fi

pidfile() { echo "$RUN_DIR/$1.pid"; }

alive() {
  local f; f=$(pidfile "$1")
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

# What this run started: on a failure it is stopped again, so a failed start
# leaves nothing behind.
STARTED=()

start_bg() { # name, command...
  local name=$1; shift
  "$@" >"$RUN_DIR/$name.log" 2>&1 &
  echo $! >"$(pidfile "$name")"
  STARTED+=("$name")
}

# Stops what this run started (coordinator first), after a failed start.
abandon() {
  local i
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_one "${STARTED[$i]}"; done
  [ "${#STARTED[@]}" = 0 ] || echo "stopped what this run had started: ${STARTED[*]}" >&2
  exit 1
}

# Fails at once if a process this run started has exited: its log's last
# lines say why (a taken port, a bad flag, a missing model).
check_started() {
  local name
  for name in "${STARTED[@]}"; do
    if ! alive "$name"; then
      echo "$name exited during start-up; the end of $RUN_DIR/$name.log:" >&2
      tail -n 5 "$RUN_DIR/$name.log" | sed 's/^/  /' >&2
      abandon
    fi
  done
}

wait_for() { # description, seconds, command...
  local what=$1 secs=$2; shift 2
  local i
  for ((i = 0; i < secs * 10; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    check_started
    sleep 0.1
  done
  echo "timed out after ${secs}s waiting for $what; logs in $RUN_DIR" >&2
  abandon
}

# A TCP port on 127.0.0.1 something already listens on.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Fails before starting anything if a port a process to be started needs is
# taken, naming the port, the variable that moves it and, where `ss` can
# tell, who holds it.
check_ports() { # "name port VARIABLE" ...
  local entry name port var busy=0
  for entry in "$@"; do
    read -r name port var <<<"$entry"
    if port_taken "$port"; then
      local who=""
      if command -v ss >/dev/null; then
        who=$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:(("[^"]*",pid=[0-9]*' | head -n1 | sed 's/users:(("//; s/",pid=/, pid /')
      fi
      echo "port $port ($name) is already in use${who:+ by $who}; free it or set $var" >&2
      busy=1
    fi
  done
  [ "$busy" = 0 ] || exit 1
}

threads_per_worker() {
  if [ -n "${NANOINFER_WORKER_THREADS:-}" ]; then echo "$NANOINFER_WORKER_THREADS"; return; fi
  local cores; cores=$(nproc)
  local t=$((cores / WORKERS))
  [ "$t" -ge 1 ] || t=1
  echo "$t"
}

start() {
  mkdir -p "$RUN_DIR"
  # NANOINFER_MODEL (a GGUF path) overrides the default model.
  local model="${NANOINFER_MODEL:-}"
  # The default model's name for clients (`model` in both APIs); another
  # GGUF keeps the name it carries unless NANOINFER_MODEL_NAME is set.
  local model_name=()
  if [ -z "$model" ]; then
    model=$("$ROOT/scripts/fetch-model" | tail -n1)
    model_name=(--model-name "${NANOINFER_MODEL_NAME:-smollm2-135m-instruct}")
  fi
  for b in nanoinfer-coordinator nanoinfer-worker nanoinfer; do
    [ -x "$BIN_DIR/$b" ] || { echo "$BIN_DIR/$b is missing: run scripts/setup" >&2; exit 1; }
  done

  local ids=() i
  for ((i = 1; i <= WORKERS; i++)); do ids+=("local-worker$i"); done
  local needed=()
  alive etcd || needed+=("etcd $ETCD_PORT NANOINFER_ETCD_PORT" "etcd-peer $ETCD_PEER_PORT NANOINFER_ETCD_PEER_PORT")
  for ((i = 1; i <= WORKERS; i++)); do
    alive "worker$i" || needed+=("worker$i ${WORKER_PORTS[$((i - 1))]} NANOINFER_WORKER_PORTS"
      "worker$i-metrics ${WORKER_METRICS_PORTS[$((i - 1))]} NANOINFER_WORKER_METRICS_PORTS")
  done
  alive coordinator || needed+=("coordinator $COORD_PORT NANOINFER_COORDINATOR_PORT"
    "coordinator-metrics $COORD_METRICS_PORT NANOINFER_COORDINATOR_METRICS_PORT"
    "openai-http $COORD_HTTP_PORT NANOINFER_COORDINATOR_HTTP_PORT")
  check_ports "${needed[@]}"
  local etcd_tls=()
  if [ "$SECURE" = 1 ]; then
    log "secure mode: certificates in $CERTS"
    "$ROOT/scripts/gen-certs" "$CERTS" "${ids[@]}" >/dev/null
    etcd_tls=(--cert-file "$CERTS/etcd.pem" --key-file "$CERTS/etcd.key"
      --trusted-ca-file "$CERTS/ca.pem" --client-cert-auth)
  fi

  if alive etcd; then
    log "etcd already running"
  else
    log "starting etcd on $ETCD_URL"
    rm -rf "$RUN_DIR/etcd-data"
    start_bg etcd etcd --name nanoinfer-local --data-dir "$RUN_DIR/etcd-data" \
      --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
      --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-cluster "nanoinfer-local=http://127.0.0.1:$ETCD_PEER_PORT" "${etcd_tls[@]}"
    wait_for etcd 20 etcdctl_ endpoint health
  fi
  if [ "$SECURE" = 1 ]; then
    # One etcd user per worker id, allowed to write only its own key; run
    # on a running etcd too, it adds the users of workers it lacks.
    ETCDCTL_ENDPOINTS="$ETCD_URL" ETCDCTL_CACERT="$CERTS/ca.pem" \
      ETCDCTL_CERT="$CERTS/coordinator.pem" ETCDCTL_KEY="$CERTS/coordinator.key" \
      "$ROOT/deploy/etcd-auth.sh" "$CERTS" "${ids[@]}"
  fi

  local threads; threads=$(threads_per_worker)
  for ((i = 1; i <= WORKERS; i++)); do
    if alive "worker$i"; then log "worker$i already running"; continue; fi
    local port=${WORKER_PORTS[$((i - 1))]}
    local metrics_port=${WORKER_METRICS_PORTS[$((i - 1))]}
    log "starting worker$i on 127.0.0.1:$port ($threads threads)"
    local secure=()
    if [ "$SECURE" = 1 ]; then
      etcd_client_flags "worker-local-worker$i" "worker-local-worker$i"
      secure+=(--cluster-ca "$CERTS/ca.pem" --cluster-cert "$CERTS/worker-local-worker$i.pem"
        --cluster-key "$CERTS/worker-local-worker$i.key")
    fi
    start_bg "worker$i" "$BIN_DIR/nanoinfer-worker" --model "$model" \
      --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics_port" \
      --etcd-endpoints "$ETCD_URL" --id "local-worker$i" \
      --threads "$threads" "${model_name[@]}" "${secure[@]}"
  done

  if alive coordinator; then
    log "coordinator already running"
  else
    local secure=()
    if [ "$SECURE" = 1 ]; then
      [ -s "$CERTS/api-keys" ] || (umask 077; echo "ni-$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')" >"$CERTS/api-keys")
      etcd_client_flags coordinator coordinator
      secure+=(--cluster-ca "$CERTS/ca.pem" --cluster-cert "$CERTS/coordinator.pem"
        --cluster-key "$CERTS/coordinator.key" --tls-cert "$CERTS/server.pem"
        --tls-key "$CERTS/server.key" --api-keys-file "$CERTS/api-keys")
      cat >"$RUN_DIR/secure.env" <<ENV
# . this file, then ./test.sh, nanoinfer and nanoinfer-bench use TLS and the API key.
export NANOINFER_ADDR=127.0.0.1:$COORD_PORT
export NANOINFER_CA=$CERTS/ca.pem
export NANOINFER_API_KEY=$(head -n1 "$CERTS/api-keys")
ENV
      chmod 600 "$RUN_DIR/secure.env"
    fi
    log "starting coordinator on 127.0.0.1:$COORD_PORT"
    start_bg coordinator "$BIN_DIR/nanoinfer-coordinator" \
      --listen "127.0.0.1:$COORD_PORT" --metrics-listen "127.0.0.1:$COORD_METRICS_PORT" \
      --http-listen "127.0.0.1:$COORD_HTTP_PORT" --etcd-endpoints "$ETCD_URL" "${secure[@]}"
  fi
  log "waiting for $WORKERS workers to register"
  wait_for "$WORKERS live workers" 60 all_workers_live
  if [ "$SECURE" = 1 ]; then
    log "cluster is up (secure): coordinator https://127.0.0.1:$COORD_PORT, OpenAI API https://127.0.0.1:$COORD_HTTP_PORT/v1 (logs in $RUN_DIR)"
    log "client settings: . $RUN_DIR/secure.env   (then ./test.sh infer, nanoinfer infer ...)"
  else
    log "cluster is up: coordinator http://127.0.0.1:$COORD_PORT, OpenAI API http://127.0.0.1:$COORD_HTTP_PORT/v1 (logs in $RUN_DIR)"
  fi
  log "metrics: http://127.0.0.1:$COORD_METRICS_PORT/metrics (coordinator), http://127.0.0.1:${WORKER_METRICS_PORTS[0]}/metrics (worker1)"
  if [ -n "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ]; then
    log "spans go to $OTEL_EXPORTER_OTLP_ENDPOINT (OTLP/gRPC)"
  fi
}

all_workers_live() {
  cli health | grep -q "live workers: $WORKERS"
}

stop_one() {
  local name=$1 f; f=$(pidfile "$name")
  [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$name did not stop within 30s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}

stop() {
  log "stopping the local cluster"
  stop_one coordinator
  local i
  for ((i = 1; i <= WORKERS; i++)); do stop_one "worker$i"; done
  stop_one etcd
  rm -f "$RUN_DIR/secure.env"
}

status() {
  local name
  local names=(etcd) i
  for ((i = 1; i <= WORKERS; i++)); do names+=("worker$i"); done
  for name in "${names[@]}" coordinator; do
    if alive "$name"; then echo "$name: running (pid $(cat "$(pidfile "$name")"))"; else echo "$name: stopped"; fi
  done
  cli health || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start [--secure]|stop|status" >&2; exit 2 ;;
esac
