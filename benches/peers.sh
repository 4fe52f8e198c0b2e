#!/usr/bin/env bash
# dirq beside its peers, in one run, and the performance targets checked against
# the floor measured in the same session:
#
# 1. the harness in ../shared/peers (raw-syscall floor, mentat.dirq, dirq through
#    examples/peerbench with batch=1 and batch=64; --all adds python-dirq,
#    persist-queue and litequeue), with its own tables;
# 2. on a fresh journaled ext4 loop filesystem like the harness's: a 3-hop forwarding
#    pipeline of Pipers (examples/hops, one process per hop) interleaved with the
#    floor's move pipeline; the demo pipeline (examples/pipeline); wake-up latency and
#    idle cost (examples/wakeup) on a new queue and on one whose incoming/ once held
#    1,000,000 messages;
# 3. a table of the targets with ratios and verdicts (benches/peers_report.py).
#
#   benches/peers.sh            # --only-dirq harness run (about 4 minutes) + the rest (about 4)
#   benches/peers.sh --quick    # harness smoke test (under a minute) + the rest
#   benches/peers.sh --all      # every peer (about 9 minutes) + the rest
#
# Needs root for the loop filesystems (like the harness). Writes under /tmp only; the
# harness's raw results stay in /tmp/peers-results/, this script's in /tmp/dirq-peers/.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD
peers=../shared/peers
out=/tmp/dirq-peers
mkdir -p "$out"

harness_args=(--only-dirq)
for arg in "$@"; do
  case "$arg" in
    --all) harness_args=() ;;
    *) harness_args+=("$arg") ;;
  esac
done

log() { printf '== %s\n' "$*" >&2; }

log "building the examples (release)"
cargo build --release --quiet --example peerbench --example pipeline --example wakeup --example hops

log "peers harness: ${harness_args[*]:-all peers}"
"$peers/run-peers.sh" --dirq-bin "$here/target/release/examples/peerbench" "${harness_args[@]}"
cp /tmp/peers-results/results.jsonl "$out/peers.jsonl"

log "dirq end to end, on a fresh journaled ext4 loop filesystem like the harness's"
img=$out/fs.img
mnt=$out/mnt
cleanup() {
  mountpoint -q "$mnt" && umount "$mnt"
  [ -n "${loop:-}" ] && losetup -d "$loop" 2>/dev/null
  rm -f "$img"
}
trap cleanup EXIT
rm -f "$img"
truncate -s 24G "$img"
mkfs.ext4 -q -F -E lazy_itable_init=1 "$img"
mkdir -p "$mnt"
loop=$(losetup --direct-io=on -f --show "$img")
mount -o noatime "$loop" "$mnt"

limit=/tmp/peers-limit-target/release/limit
rm -f "$out/pipeline.jsonl" "$out/hops.jsonl" "$out/floor-move.jsonl"

log "3-hop forwarding pipeline (examples/hops, one process per hop) beside the floor's move"
for durability in none full; do
  if [ "$durability" = none ]; then n=20000 durable=0; else n=2000 durable=1; fi
  for run in 1 2 3; do
    sync
    target/release/examples/hops --dir "$mnt/hops" --messages "$n" --processes \
      --durability "$durability" 2>/dev/null | tail -n 1 >>"$out/hops.jsonl"
    "$limit" fill q="$mnt/floor-a" n="$n" >/dev/null
    sync
    "$limit" pipeline src="$mnt/floor-a" dst="$mnt/floor-b" durable="$durable" |
      tail -n 1 >>"$out/floor-move.jsonl"
    rm -rf "$mnt/floor-a" "$mnt/floor-b"
  done
done

log "demo pipeline (parse, enrich, sink; 2 processes x 2 workers per stage)"
for durability in none full; do
  for run in 1 2 3; do
    sync
    target/release/examples/pipeline --messages 10000 --processes 2 --workers 2 \
      --durability "$durability" --dir "$mnt/pipeline-$durability-$run" 2>/dev/null |
      tail -n 1 >>"$out/pipeline.jsonl"
    rm -rf "$mnt/pipeline-$durability-$run"
  done
done

log "wake-up latency and idle cost, on a new queue"
target/release/examples/wakeup --dir "$mnt" --samples 1000 --idle-secs 10 2>/dev/null |
  tail -n 1 >"$out/wakeup.json"

log "idle cost on a queue whose incoming/ once held 1,000,000 messages (ext4 never shrinks it)"
mkdir -p "$mnt/bloated"
"$limit" fill q="$mnt/bloated/wakeup-q" n=1000000 >/dev/null
find "$mnt/bloated/wakeup-q/incoming" -type f -delete
sync
du -sh "$mnt/bloated/wakeup-q/incoming" >&2
target/release/examples/wakeup --dir "$mnt/bloated" --samples 200 --idle-secs 10 2>/dev/null |
  tail -n 1 >"$out/wakeup-bloated.json"

python3 benches/peers_report.py "$out"
