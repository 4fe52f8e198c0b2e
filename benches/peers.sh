#!/usr/bin/env bash
# dirq beside its peers, in one run, and the performance targets checked against
# the floor measured in the same session:
#
# 1. the harness in ../shared/peers with every peer (raw-syscall floor, mentat.dirq,
#    dirq through examples/peerbench with batch=1 and batch=64, sqlq, the Rust queue on
#    SQLite a Rust developer would use instead, with batch=1 and batch=64, and
#    python-dirq, persist-queue and litequeue), with its own tables and its workers
#    phase (T workers spending 1 ms per message);
# 2. on a fresh journaled ext4 loop filesystem like the harness's: a 3-hop forwarding
#    pipeline of Pipers (examples/hops, one process per hop) without fsync, with a
#    sync after every message (--commit-batch 1) and with group commit (the Pipers'
#    defaults), interleaved with the floor's move pipeline, for throughput, then paced
#    for end-to-end latency; the demo pipeline (examples/pipeline); wake-up latency and
#    idle cost (examples/wakeup) on a new queue and on one whose incoming/ once held
#    1,000,000 messages;
# 3. a table of the targets with ratios and verdicts (benches/peers_report.py).
#
#   benches/peers.sh              # every peer (about 18 minutes) + the rest (about 5)
#   benches/peers.sh --only-dirq  # floor, mentat.dirq and dirq only, no sqlq (about 4) + the rest
#   benches/peers.sh --quick      # harness smoke test (under a minute) + the rest
#   benches/peers.sh --fs tmpfs   # the harness on a tmpfs (Mentat's advice for spools)
#   benches/peers.sh --hops-only  # only the 3-hop pipeline and its floor (about 2 minutes)
# Arguments other than --hops-only go to ../shared/peers/run-peers.sh.
#
# Needs root for the loop filesystems (like the harness). Writes under /tmp only; the
# harness's raw results stay in /tmp/peers-results/, this script's in /tmp/dirq-peers/
# (/tmp/dirq-peers-hops/ for --hops-only, so that its report never mixes in an older
# session's figures). Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
peers=../shared/peers
examples=${CARGO_TARGET_DIR:-target}/release/examples
out=/tmp/dirq-peers
hops_only=false

harness_args=()
for arg in "$@"; do
  case "$arg" in
    --all) ;; # the default; kept for older command lines
    --hops-only) hops_only=true out=/tmp/dirq-peers-hops ;;
    *) harness_args+=("$arg") ;;
  esac
done
mkdir -p "$out"

log() { printf '== %s\n' "$*" >&2; }

log "building the examples (release)"
cargo build --release --quiet --example peerbench --example pipeline --example wakeup --example hops

if ! $hops_only; then
  log "peers harness: ${harness_args[*]:-all peers}"
  "$peers/run-peers.sh" --dirq-bin "$(realpath "$examples/peerbench")" "${harness_args[@]}"
  cp /tmp/peers-results/results.jsonl "$out/peers.jsonl"
fi

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

# The hops' modes: no fsync; a sync after every message; group commit with the
# Pipers' defaults (batches of up to 64 outcomes, 2 ms).
hop_modes=("--durability none" "--durability full --commit-batch 1" "--durability full")
# Throughput: N messages pre-filled; the per-message run takes about 5 s (1,900 msg/s).
n=10000
log "3-hop forwarding pipeline (examples/hops, one process per hop), N=$n, beside the floor's move"
for run in 1 2 3; do
  for mode in "${hop_modes[@]}"; do
    sync
    # shellcheck disable=SC2086 # $mode is a list of arguments
    "$examples/hops" --dir "$mnt/hops" --messages "$n" --processes $mode 2>/dev/null |
      tail -n 1 >>"$out/hops.jsonl"
  done
  for durable in 0 1; do
    "$limit" fill q="$mnt/floor-a" n="$n" >/dev/null
    sync
    "$limit" pipeline src="$mnt/floor-a" dst="$mnt/floor-b" durable="$durable" |
      tail -n 1 >>"$out/floor-move.jsonl"
    rm -rf "$mnt/floor-a" "$mnt/floor-b"
  done
done

# Latency: a producer paces enqueues at a rate every mode sustains (a quarter of the
# per-message throughput), so that what is measured is the pipeline, not a backlog.
rate=500
log "3-hop pipeline latency, paced at $rate msg/s"
for run in 1 2 3; do
  for mode in "${hop_modes[@]}"; do
    sync
    # shellcheck disable=SC2086
    "$examples/hops" --dir "$mnt/hops" --messages $((rate * 5)) --rate "$rate" --processes $mode \
      2>/dev/null | tail -n 1 >>"$out/hops.jsonl"
  done
done

if $hops_only; then
  python3 benches/peers_report.py "$out"
  exit
fi

log "demo pipeline (parse, enrich, sink; 2 processes x 2 workers per stage)"
for durability in none full; do
  for run in 1 2 3; do
    sync
    "$examples/pipeline" --messages 10000 --processes 2 --workers 2 \
      --durability "$durability" --dir "$mnt/pipeline-$durability-$run" 2>/dev/null |
      tail -n 1 >>"$out/pipeline.jsonl"
    rm -rf "$mnt/pipeline-$durability-$run"
  done
done

log "wake-up latency and idle cost, on a new queue"
"$examples/wakeup" --dir "$mnt" --samples 1000 --idle-secs 10 2>/dev/null |
  tail -n 1 >"$out/wakeup.json"

log "idle cost on a queue whose incoming/ once held 1,000,000 messages (ext4 never shrinks it)"
mkdir -p "$mnt/bloated"
"$limit" fill q="$mnt/bloated/wakeup-q" n=1000000 >/dev/null
find "$mnt/bloated/wakeup-q/incoming" -type f -delete
sync
du -sh "$mnt/bloated/wakeup-q/incoming" >&2
"$examples/wakeup" --dir "$mnt/bloated" --samples 200 --idle-secs 10 2>/dev/null |
  tail -n 1 >"$out/wakeup-bloated.json"

python3 benches/peers_report.py "$out"
