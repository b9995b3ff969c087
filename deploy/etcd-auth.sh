#!/usr/bin/env bash
# Turns on etcd's authentication with the roles nanoinfer needs:
#
#   nanoinfer-worker-<id>  readwrite on exactly the key /nanoinfer/workers/<id>
#                          (one role per worker: it registers, renews, repairs
#                          and revokes its own record and can write no other)
#   nanoinfer-coordinator  read on the prefix /nanoinfer/workers/ (list and watch)
#
# and one user of the same name per role, plus root (which etcd requires
# before `auth enable`).
#
#   deploy/etcd-auth.sh DIR [WORKER_ID ...]   # default ids: local-worker1 local-worker2
#   deploy/etcd-auth.sh --help                # this text; touches nothing
#
# Worker ids are DNS labels (letters, digits, inner '-', at most 63), the
# rule the worker's --id and the coordinator apply.
# Passwords are generated and written to DIR/etcd-root.password,
# DIR/etcd-coordinator.password and DIR/etcd-worker-<id>.password (mode 600;
# files that exist are reused). Pass each process its own:
#   worker:      --id <id> --etcd-username nanoinfer-worker-<id>
#                --etcd-password-file DIR/etcd-worker-<id>.password
#   coordinator: --etcd-username nanoinfer-coordinator
#                --etcd-password-file DIR/etcd-coordinator.password
# (With etcd's --client-cert-auth, a client certificate whose CN is the user
# name authenticates as that user without a password.)
#
# etcdctl is pointed at etcd the usual way: ETCDCTL_ENDPOINTS, and for TLS
# ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY. On a fresh etcd it creates
# everything and turns auth on. On an etcd where auth is already on it logs
# in as root with DIR/etcd-root.password and adds the users and roles that
# are missing (run it again with a new worker's id when you add one); without
# that file it says so and changes nothing.
set -euo pipefail

usage() { sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  "" | -*) usage >&2; exit 2 ;;
esac
DIR=$1; shift
ids=("$@")
[ ${#ids[@]} -gt 0 ] || ids=(local-worker1 local-worker2)
for id in "${ids[@]}"; do
  if ! [[ "$id" =~ ^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$ ]]; then
    printf 'worker id %q is not a DNS label (letters, digits, inner '\''-'\'', at most 63)\n' "$id" >&2
    exit 2
  fi
done
command -v etcdctl >/dev/null || { echo "etcdctl not found: apt-get install etcd-client" >&2; exit 1; }
export ETCDCTL_API=3
mkdir -p "$DIR"

password() { # file: the password in it, made on first use
  local f="$DIR/$1"
  if [ ! -s "$f" ]; then
    (umask 077; od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$f")
  fi
  cat "$f"
}

prefix=/nanoinfer/workers/
enable=1
if etcdctl auth status 2>/dev/null | grep -q "Authentication Status: true" \
  || ! etcdctl user list >/dev/null 2>&1; then
  if [ ! -s "$DIR/etcd-root.password" ]; then
    echo "etcd authentication is already on and $DIR/etcd-root.password is missing; nothing changed" >&2
    exit 0
  fi
  # Credentials by environment, not on the command line.
  export ETCDCTL_USER=root ETCDCTL_PASSWORD
  ETCDCTL_PASSWORD=$(cat "$DIR/etcd-root.password")
  etcdctl user get root >/dev/null || { echo "cannot log in to etcd as root with $DIR/etcd-root.password" >&2; exit 1; }
  enable=0
fi

user() { # name, password file: the user, made if missing (password on stdin)
  etcdctl user get "$1" >/dev/null 2>&1 && return 0
  password "$2" | etcdctl user add "$1" --interactive=false >/dev/null
}
role() { # name: the role, made if missing
  etcdctl role get "$1" >/dev/null 2>&1 || etcdctl role add "$1" >/dev/null
}

user root etcd-root.password
etcdctl user grant-role root root >/dev/null
role nanoinfer-coordinator
etcdctl role grant-permission nanoinfer-coordinator --prefix=true read "$prefix" >/dev/null
user nanoinfer-coordinator etcd-coordinator.password
etcdctl user grant-role nanoinfer-coordinator nanoinfer-coordinator >/dev/null
for id in "${ids[@]}"; do
  name="nanoinfer-worker-$id"
  role "$name"
  # No --prefix: the one key, not /nanoinfer/workers/<id>* (w1 must not
  # write w10's record).
  etcdctl role grant-permission "$name" readwrite "$prefix$id" >/dev/null
  user "$name" "etcd-worker-$id.password"
  etcdctl user grant-role "$name" "$name" >/dev/null
done
if etcdctl user get nanoinfer-worker >/dev/null 2>&1; then
  echo "warning: the shared user nanoinfer-worker (readwrite on all of $prefix) from an older" \
    "version of this script still exists; move workers to their own users, then" \
    "etcdctl user delete nanoinfer-worker && etcdctl role delete nanoinfer-worker" >&2
fi
[ "$enable" = 0 ] || etcdctl auth enable >/dev/null
echo "etcd auth on$([ "$enable" = 1 ] || echo ' (already)'): nanoinfer-coordinator (read $prefix), and nanoinfer-worker-<id> (readwrite $prefix<id>) for ${ids[*]}; passwords in $DIR" >&2
