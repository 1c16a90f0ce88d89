#!/usr/bin/env bash
# tests/garage/cluster.sh -- a 3-node Garage cluster (replication factor 3)
# on loopback, for the object-store tests (issue 28).
#
#   tests/garage/cluster.sh start DIR   # nodes in DIR/n1..n3; prints the
#                                       # S3 endpoint, bucket and key as
#                                       # shell assignments (DIR/env too)
#   tests/garage/cluster.sh stop DIR    # stops the nodes (data kept)
#   tests/garage/cluster.sh kill DIR N  # kill -9 node N (1-3)
#   tests/garage/cluster.sh revive DIR N
#   tests/garage/cluster.sh bin         # prints the garage binary (builds it once)
#
# The garage binary is found as $GARAGE, else on PATH, else in the cache
# /var/cache/novabackup-ci/tools/garage/bin/garage, else built there once
# with `cargo install garage --locked` (about 7-20 minutes on 2 cores; the
# build folder is removed afterwards).
# Ports: node N serves S3 on 127.0.0.1:39N0 and RPC on 39N1 (BASE_PORT
# changes the 39 prefix's base, for clusters side by side). S3_ADDR makes
# the S3 API listen on another address (a network namespace's veth end:
# run the script under `ip netns exec`); RPC stays on the loopback.
set -euo pipefail
CACHE=/var/cache/novabackup-ci/tools/garage
cmd=${1:?usage: cluster.sh start|stop|kill|revive DIR [N] | bin}
[ "$cmd" = bin ] && DIR=/nonexistent || DIR=${2:?a folder for the cluster}
BASE=${BASE_PORT:-3900}

garage_bin() {
  if [ -n "${GARAGE:-}" ]; then echo "$GARAGE"; return; fi
  if command -v garage > /dev/null; then command -v garage; return; fi
  if [ ! -x "$CACHE/bin/garage" ]; then
    echo "cluster.sh: building garage into $CACHE (once)" >&2
    CARGO_TARGET_DIR=${TMPDIR:-/tmp}/garage-build \
      cargo install garage --locked --root "$CACHE" >&2
    rm -rf "${TMPDIR:-/tmp}/garage-build"
  fi
  echo "$CACHE/bin/garage"
}
G=$(garage_bin)
[ "$cmd" = bin ] && { echo "$G"; exit 0; }
port() { echo $((BASE + ($1 - 1) * 10 + $2)); }   # node, offset
g() { local n=$1; shift; "$G" -c "$DIR/n$n/garage.toml" "$@"; }

start_node() {
  local n=$1
  # Not through g(): $! must be garage's own pid, for stop and kill.
  "$G" -c "$DIR/n$n/garage.toml" server > "$DIR/n$n/log" 2>&1 &
  echo $! > "$DIR/n$n/pid"
  for _ in $(seq 100); do
    g "$n" status > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "cluster.sh: node $n did not start; its log: $DIR/n$n/log" >&2
  tail -20 "$DIR/n$n/log" >&2
  return 1
}

case $cmd in
  start)
    mkdir -p "$DIR"
    chmod 700 "$DIR"
    secret=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    for n in 1 2 3; do
      mkdir -p "$DIR/n$n/meta" "$DIR/n$n/data"
      cat > "$DIR/n$n/garage.toml" <<EOF
metadata_dir = "$DIR/n$n/meta"
data_dir = "$DIR/n$n/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$(port "$n" 1)"
rpc_public_addr = "127.0.0.1:$(port "$n" 1)"
rpc_secret = "$secret"

[s3_api]
s3_region = "garage"
api_bind_addr = "${S3_ADDR:-127.0.0.1}:$(port "$n" 0)"
root_domain = ".s3.garage.localhost"
EOF
      chmod 600 "$DIR/n$n/garage.toml"
      start_node "$n"
    done
    for n in 2 3; do
      id=$(g "$n" node id -q)
      g 1 node connect "$id" > /dev/null
    done
    for n in 1 2 3; do
      id=$(g "$n" node id -q)
      g 1 layout assign -z dc1 -c 1G "${id%%@*}" > /dev/null
    done
    g 1 layout apply --version 1 > /dev/null
    g 1 bucket create nova > /dev/null
    out=$(g 1 key create nova-key)
    key=$(echo "$out" | awk '/Key ID/ {print $NF}')
    sec=$(echo "$out" | awk '/Secret key/ {print $NF}')
    g 1 bucket allow --read --write --owner nova --key nova-key > /dev/null
    cat > "$DIR/env" <<EOF
S3_ENDPOINT=http://${S3_ADDR:-127.0.0.1}:$(port 1 0)
S3_ENDPOINTS="http://${S3_ADDR:-127.0.0.1}:$(port 1 0) http://${S3_ADDR:-127.0.0.1}:$(port 2 0) http://${S3_ADDR:-127.0.0.1}:$(port 3 0)"
S3_REGION=garage
S3_BUCKET=nova
AWS_ACCESS_KEY_ID=$key
AWS_SECRET_ACCESS_KEY=$sec
EOF
    chmod 600 "$DIR/env"
    cat "$DIR/env"
    ;;
  stop)
    for n in 1 2 3; do
      [ -f "$DIR/n$n/pid" ] && kill "$(cat "$DIR/n$n/pid")" 2> /dev/null || true
    done
    for n in 1 2 3; do
      [ -f "$DIR/n$n/pid" ] || continue
      for _ in $(seq 50); do
        kill -0 "$(cat "$DIR/n$n/pid")" 2> /dev/null || break
        sleep 0.1
      done
    done
    ;;
  kill)
    kill -9 "$(cat "$DIR/n${3:?node}/pid")"
    ;;
  revive)
    start_node "${3:?node}"
    ;;
  *) echo "cluster.sh: unknown command $cmd" >&2; exit 2 ;;
esac
