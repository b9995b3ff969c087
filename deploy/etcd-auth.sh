#!/usr/bin/env bash
# Turns on etcd's authentication with the two roles nanoinfer needs:
#
#   nanoinfer-worker       readwrite on the prefix /nanoinfer/workers/ (register, renew, revoke)
#   nanoinfer-coordinator  read on the prefix /nanoinfer/workers/ (list and watch)
#
# and one user per role, plus root (which etcd requires before `auth enable`).
#
#   deploy/etcd-auth.sh DIR
#
# Passwords are generated and written to DIR/etcd-{root,worker,coordinator}.password
# (mode 600; files that exist are reused). Pass the role's file to each
# process: --etcd-username nanoinfer-worker --etcd-password-file DIR/etcd-worker.password
# (coordinators: nanoinfer-coordinator and etcd-coordinator.password).
#
# etcdctl is pointed at etcd the usual way: ETCDCTL_ENDPOINTS, and for TLS
# ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY. Run it once, on a fresh etcd;
# on an etcd where auth is already on it says so and changes nothing.
set -euo pipefail

[ $# -eq 1 ] || { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
DIR=$1
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

if etcdctl auth status 2>/dev/null | grep -q "Authentication Status: true" \
  || ! etcdctl user list >/dev/null 2>&1; then
  echo "etcd authentication is already on; nothing changed" >&2
  exit 0
fi

prefix=/nanoinfer/workers/
etcdctl user add root --new-user-password="$(password etcd-root.password)" >/dev/null
etcdctl user grant-role root root >/dev/null
etcdctl role add nanoinfer-worker >/dev/null
etcdctl role grant-permission nanoinfer-worker --prefix=true readwrite "$prefix" >/dev/null
etcdctl role add nanoinfer-coordinator >/dev/null
etcdctl role grant-permission nanoinfer-coordinator --prefix=true read "$prefix" >/dev/null
etcdctl user add nanoinfer-worker --new-user-password="$(password etcd-worker.password)" >/dev/null
etcdctl user grant-role nanoinfer-worker nanoinfer-worker >/dev/null
etcdctl user add nanoinfer-coordinator --new-user-password="$(password etcd-coordinator.password)" >/dev/null
etcdctl user grant-role nanoinfer-coordinator nanoinfer-coordinator >/dev/null
etcdctl auth enable >/dev/null
echo "etcd auth on: users nanoinfer-worker (readwrite $prefix), nanoinfer-coordinator (read $prefix); passwords in $DIR" >&2
