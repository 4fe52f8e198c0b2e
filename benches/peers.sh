#!/usr/bin/env bash
# dirq beside its peers, in one run: the harness in ../shared/peers (raw-syscall floor,
# mentat.dirq, dirq through examples/peerbench; add --all for every peer), then dirq's
# own end-to-end figures measured right after on the same kind of filesystem: the
# three-stage Piper pipeline (examples/pipeline) and the wake-up latency and idle cost
# of a Piper (examples/wakeup). Prints the harness's tables and a summary table with
# ratios to the floor.
#
#   benches/peers.sh            # --only-dirq harness run (about 4 minutes) + pipeline + wake-up
#   benches/peers.sh --quick    # harness smoke test (under a minute)
#   benches/peers.sh --all      # every peer (about 9 minutes)
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
cargo build --release --quiet --example peerbench --example pipeline --example wakeup

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

for durability in none full; do
  for run in 1 2 3; do
    sync
    target/release/examples/pipeline --messages 10000 --processes 2 --workers 2 \
      --durability "$durability" --dir "$mnt/pipeline-$durability-$run" 2>/dev/null |
      tail -n 1 >>"$out/pipeline.jsonl"
    rm -rf "$mnt/pipeline-$durability-$run"
  done
done
target/release/examples/wakeup --dir "$mnt" --samples 1000 --idle-secs 10 2>/dev/null |
  tail -n 1 >"$out/wakeup.json"

python3 - "$out" <<'EOF'
import json, statistics, sys
out = sys.argv[1]
peers = [json.loads(l) for l in open(f"{out}/peers.jsonl")]
pipeline = [json.loads(l) for l in open(f"{out}/pipeline.jsonl")]
wakeup = json.load(open(f"{out}/wakeup.json"))

def median(values):
    return statistics.median(values) if values else float("nan")

def peer_rate(peer, op, n, durable, mode=None):
    rates = [r["rate"] for r in peers if r.get("peer") == peer and r.get("op") == op
             and r.get("n") == n and r.get("durable") == durable and r.get("status", "ok") == "ok"
             and (mode is None or r.get("mode") == mode)]
    return median(rates)

print("\n### dirq end to end (same session as the tables above)\n")
print("| measure | dirq | floor | dirq / floor |")
print("|---|---|---|---|")
for durable, label in ((False, "none"), (True, "full")):
    runs = [p["rate"] for p in pipeline if p["durability"] == label]
    floor_move = peer_rate("limit", "pipeline", 10000, durable, "move")
    floor = floor_move / 3
    rate = median(runs)
    print(f"| 3-stage pipeline (2 processes x 2 workers per stage), durability {label}, events/s "
          f"| {rate:.0f} | {floor:.0f} (floor's move pipeline {floor_move:.0f}/s / 3 hops) | x{rate / floor:.2f} |")
print(f"| idle worker wake-up, enqueue acknowledged -> stage starts | p50 {wakeup['p50_us']} µs, "
      f"p99 {wakeup['p99_us']} µs, max {wakeup['max_us']} µs ({wakeup['samples']} samples) | | |")
print(f"| idle Piper on an empty queue, CPU | {wakeup['idle_cpu_percent']:.2f} % of a core "
      f"over {wakeup['idle_secs']:.0f} s | | |")
EOF
