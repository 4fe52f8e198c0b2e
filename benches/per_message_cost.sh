#!/usr/bin/env bash
# CPU time and system calls per message, dirq against sqlq (the harness's Rust queue on
# SQLite), on a fresh journaled ext4 loop filesystem: the profile behind the "dirq or a
# SQLite queue?" section of docs/performance.md.
#
#   benches/per_message_cost.sh        # root; needs perf, strace, and ../shared/peers
#                                      # run once (it builds sqlq in /tmp)
#
# For each of dirq and sqlq, enqueue then dequeue N messages without fsync and with a
# batch of 64 under fsync; one run under `perf stat -e task-clock` (rate and CPU per
# message), one under `strace -c -f` (system calls per message).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20000}
cargo build --release --quiet --example peerbench
dirq=${CARGO_TARGET_DIR:-target}/release/examples/peerbench
sqlq=/tmp/peers-sqlq-target/release/sqlq
[ -x "$sqlq" ] || { echo "no $sqlq: run ../shared/peers/run-peers.sh once first" >&2; exit 1; }
mnt=$(mktemp -d /tmp/dirq-cost.XXXXXX)
img=$mnt.img
truncate -s 8G "$img"
mkfs.ext4 -q -F "$img"
loop=$(losetup --direct-io=on -f --show "$img")
cleanup() { umount "$mnt" 2>/dev/null || true; losetup -d "$loop" 2>/dev/null || true; rm -rf "$img" "$mnt"; }
trap cleanup EXIT
mount -o noatime "$loop" "$mnt"

per() { python3 -c "print(round($1 / $N, 1))"; }
for name in dirq sqlq; do
  bin=$dirq; [ "$name" = sqlq ] && bin=$sqlq
  for mode in "durable=0" "durable=1 batch=64"; do
    q=$mnt/$name-${mode// /_}; traced=$q.traced
    for op in enqueue dequeue; do
      args=(q="$q" $mode); [ "$op" = enqueue ] && args+=(n="$N")
      sync
      json=$(perf stat -x, -e task-clock -o "$mnt/stat" "$bin" "$op" "${args[@]}" | tail -1)
      rate=$(python3 -c "import json,sys; print(round(json.loads(sys.argv[1])['rate']))" "$json")
      cpu_ms=$(grep task-clock "$mnt/stat" | cut -d, -f1)
      # The same operation on a queue of its own, under strace.
      rm -rf "$traced"
      [ "$op" = dequeue ] && "$bin" enqueue q="$traced" n="$N" $mode >/dev/null
      targs=(q="$traced" $mode); [ "$op" = enqueue ] && targs+=(n="$N")
      strace -f -c -o "$mnt/calls" "$bin" "$op" "${targs[@]}" >/dev/null
      calls=$(awk '/total/ {print $4}' "$mnt/calls")
      echo "$name $op $mode: $rate msg/s, CPU $(per "$cpu_ms * 1000") µs/msg, $(per "$calls") system calls/msg"
    done
  done
done
