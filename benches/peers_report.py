"""The tables benches/peers.sh prints after the harness's own: the performance targets, each
measured in this session, as ratios of medians against the floor run beside it.

    python3 benches/peers_report.py /tmp/dirq-peers

A part that was not run (benches/peers.sh --hops-only runs only the 3-hop pipeline and its
floor) has no file, and its rows are left out.
"""
import json
import os
import statistics
import sys

out = sys.argv[1]


def lines(name):
    path = f"{out}/{name}"
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def one(name):
    path = f"{out}/{name}"
    return json.load(open(path)) if os.path.exists(path) else None


peers = lines("peers.jsonl")
pipeline = lines("pipeline.jsonl")
hops = lines("hops.jsonl")
floor_move = lines("floor-move.jsonl")
wakeup = one("wakeup.json")
bloated = one("wakeup-bloated.json")


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def rate(peer, op, n=10000, durable=False, key="rate", size=None):
    """Median of `key` over the harness's runs of one cell. `peer` matches exactly,
    or as a substring when it starts with '~' (the Python peers' names vary)."""
    def same_peer(name):
        name = name or ""
        return peer[1:] in name if peer.startswith("~") else name == peer
    return median([r.get(key) for r in peers
                   if same_peer(r.get("peer")) and r.get("op") == op
                   and (size is not None or r.get("n") == n) and r.get("durable") == durable
                   and (size is None or r.get("size") == size)
                   and r.get("status", "ok") == "ok"])


rows = []


def row(what, measured, ratio, goal, met, reference=""):
    verdict = "met" if met else "**missed**"
    ratio = f"x{ratio:.2f}" if isinstance(ratio, float) else ratio
    rows.append(f"| {what} | {measured} | {ratio} | {goal} | {verdict} | {reference} |")


def target(what, ours, base, goal, base_label="floor", reference=""):
    ratio = ours / base
    row(what, f"{ours:.0f}/s vs {base_label} {base:.0f}/s", ratio, f"≥ x{goal:g}",
        ratio == ratio and ratio >= goal, reference)


if peers:
    for n in (10000, 100000):
        tag = f"N={n // 1000}k"
        target(f"enqueue, none, {tag}", rate("dirq", "enqueue", n), rate("limit", "enqueue", n), 1.0,
               reference="litequeue x1.07")
        target(f"claim+commit, none, {tag}", rate("dirq", "dequeue", n), rate("limit", "dequeue", n), 0.95,
               reference="Mentat x0.76")
        target(f"forward A→B, none, {tag}", rate("dirq", "pipeline", n), rate("limit", "pipeline", n), 0.95,
               "floor move", "Mentat x0.66")
        target(f"2 consumers, none, {tag}", rate("dirq", "dequeue2", n), rate("limit", "dequeue2", n), 0.9,
               "floor 2 threads")
    two = [r for r in peers if r.get("peer") == "dirq" and r.get("op") == "dequeue2" and not r.get("durable")]
    wasted, done = sum(r.get("collisions", 0) for r in two), sum(r.get("done", 0) for r in two)
    share = 100 * wasted / max(done, 1)
    row("2 consumers: wasted claims", f"{wasted} of {done} claims", f"{share:.2f} %", "< 2 %", share < 2,
        "Mentat about 1 per message")
    for op, label in (("enqueue", "enqueue"), ("dequeue", "claim+commit"), ("pipeline", "forward"),
                      ("dequeue2", "2 consumers")):
        target(f"{label}, full durability, per message", rate("dirq", op, durable=True),
               rate("limit", op, durable=True), 0.95)
    batch = rate("dirq-b64", "enqueue", durable=True)
    target("enqueue, group commit of 64, vs the floor's durable enqueue", batch,
           rate("limit", "enqueue", durable=True), 10)
    lite = rate("~lite", "enqueue", durable=True)
    target("enqueue, group commit of 64, vs litequeue's durable enqueue", batch, lite, 3, "litequeue",
           "needs benches/peers.sh --all" if lite != lite else "")
    target("forward with batched commits (64), vs per-message durable forward",
           rate("dirq-b64", "pipeline", durable=True), rate("dirq", "pipeline", durable=True), 5,
           "dirq batch=1")
    fresh = rate("dirq", "dequeue", 10000, key="steady_rate")
    for size in (100000, 1000000):
        tag = f"{size // 1000}k"
        floor_ratio = (rate("limit", "bigq", key="steady_rate", size=size)
                       / rate("limit", "dequeue", 10000, key="steady_rate"))
        target(f"claim from a queue of {tag}, steady rate, vs a 10k queue",
               rate("dirq", "bigq", key="steady_rate", size=size), fresh, 0.9, "10k queue",
               f"floor x{floor_ratio:.2f}")
        first = rate("dirq", "bigq", key="first_ms", size=size)
        scan = rate("limit", "bigq", key="first_scan_ms", size=size)
        row(f"first claim from a queue of {tag}", f"{first:.0f} ms vs the floor's scan {scan:.0f} ms",
            scan / first, "≥ x1 (scan / ours)", first <= scan * 1.1, "within 10 % counts as no slower")
for label, w in (("new queue", wakeup), ("incoming/ that once held 1M", bloated)):
    if w is None:
        continue
    row(f"idle wake-up, {label}: p50 / p99", f"{w['p50_us']} µs / {w['p99_us']} µs ({w['samples']} samples)",
        "", "≤ 1 ms / ≤ 5 ms", w["p50_us"] <= 1000 and w["p99_us"] <= 5000, "Mentat polls every 3 s")
    row(f"idle worker CPU, {label}", f"{w['idle_cpu_percent']:.2f} % of a core over {w['idle_secs']:.0f} s",
        "", "< 1 %", w["idle_cpu_percent"] < 1)


def workers(peer, threads, durable, key="rate"):
    return median([r.get(key) for r in peers if r.get("peer") == peer and r.get("op") == "workers"
                   and r.get("threads") == threads and r.get("durable") == durable
                   and r.get("status", "ok") == "ok"])


def fairness(peer, threads, durable):
    """The smallest and largest share of one worker, over every run."""
    shares = [w / max(sum(r["per_worker"]), 1) for r in peers
              if r.get("peer") == peer and r.get("op") == "workers" and r.get("threads") == threads
              and r.get("durable") == durable and r.get("per_worker")
              for w in r["per_worker"]]
    return (min(shares), max(shares)) if shares else (float("nan"), float("nan"))


sqlq_rows = []
if any(r.get("peer") == "sqlq" for r in peers):
    def versus(what, ours, theirs, goal, base_label="sqlq"):
        ratio = ours / theirs
        verdict = "met" if ratio == ratio and ratio >= goal else "**missed**"
        sqlq_rows.append(f"| {what} | {ours:.0f}/s vs {base_label} {theirs:.0f}/s | x{ratio:.2f} "
                         f"| ≥ x{goal:g} | {verdict} |")
    ops = (("enqueue", "enqueue"), ("dequeue", "claim+commit"), ("pipeline", "forward A→B"),
           ("dequeue2", "2 consumers"))
    for op, label in ops[:2]:
        versus(f"{label}, no fsync, one process (the moonshot)", rate("dirq", op), rate("sqlq", op), 1.0)
    for op, label in ops:
        versus(f"{label}, a sync per message", rate("dirq", op, durable=True),
               rate("sqlq", op, durable=True), 1.2)
    for op, label in ops:
        versus(f"{label}, group commit of 64", rate("dirq-b64", op, durable=True),
               rate("sqlq-b64", op, durable=True), 1.0, "sqlq batch=64")
    for threads, durable, peer, base, goal in ((16, False, "dirq", "sqlq", 1.5),
                                               (4, True, "dirq", "sqlq", 3),
                                               (16, True, "dirq", "sqlq", 3),
                                               (16, True, "dirq-b64", "sqlq-b64", 1.5)):
        fsync = "per-message fsync" if durable else "no fsync"
        if peer == "dirq-b64":
            fsync = "batch 64"
        versus(f"workers T={threads}, {fsync}", workers(peer, threads, durable),
               workers(base, threads, durable), goal, base.replace("-b64", " batch=64"))
    for threads in (1, 4, 16):
        for durable in (False, True):
            for peer in ("dirq",) + (("dirq-b64",) if durable else ()):
                ours, floor = workers(peer, threads, durable), workers("limit", threads, durable)
                low, high = fairness(peer, threads, durable)
                fair = threads == 1 or (low >= 0.8 / threads and high <= 1.2 / threads)
                ratio = ours / floor
                verdict = "met" if ratio >= 0.9 and fair else "**missed**"
                sqlq_rows.append(
                    f"| workers T={threads}, {'fsync on' if durable else 'no fsync'}, {peer} vs the floor, "
                    f"fair split | {ours:.0f}/s vs floor {floor:.0f}/s, shares {100 * low:.1f}–{100 * high:.1f} % "
                    f"| x{ratio:.2f} | ≥ x0.9, each share within 20 % of 1/T | {verdict} |")


def hop_mode(h):
    """none, per-message (a sync after every message) or group (group commit)."""
    if h["durability"] == "none":
        return "none"
    return "per-message" if h.get("commit_batch") == 1 else "group"


throughput = [h for h in hops if h.get("offered_rate") is None]
paced = [h for h in hops if h.get("offered_rate") is not None]


def hop_rate(mode):
    return median([h["rate"] for h in throughput if hop_mode(h) == mode])


if throughput:
    per_message = hop_rate("per-message")
    for mode, durable, label in (("none", False, "none"),
                                 ("per-message", True, "a sync per message (commit batch 1)")):
        through = hop_rate(mode)
        floor = median([f["rate"] for f in floor_move if f["durable"] == durable])
        row(f"3-hop forwarding Piper pipeline, {label}, vs floor{' durable' if durable else ''} move / 3",
            f"{through:.0f} msg/s vs {floor:.0f}/3 = {floor / 3:.0f}", through / (floor / 3), "≥ x0.9",
            through >= 0.9 * floor / 3, "one process per hop, 1 worker each")
    target("3-hop forwarding Piper pipeline, group commit (64, 2 ms), vs a sync per message",
           hop_rate("group"), per_message, 10, "commit batch 1",
           f"no fsync at all: x{hop_rate('none') / per_message:.2f}")

print("\n### Performance targets (this session; medians, ratios against the floor run beside them)\n")
print("| target | measured | ratio | goal | verdict | reference |")
print("|---|---|---|---|---|---|")
print("\n".join(rows))
if sqlq_rows:
    print("\n### dirq against sqlq, the Rust queue on SQLite (WAL) a Rust developer would use instead\n")
    print("| target | measured | ratio | goal | verdict |")
    print("|---|---|---|---|---|")
    print("\n".join(sqlq_rows))
if hops:
    print("\n### 3-hop forwarding pipeline, by mode (one process per hop, 1 worker each; medians)\n")
    rates = sorted({h["offered_rate"] for h in paced})
    paced_label = " and ".join(f"{r:g}" for r in rates) or "-"
    print(f"| mode | throughput | vs a sync per message | outcomes per synced batch "
          f"| latency p50 / p99 at {paced_label} msg/s |")
    print("|---|---|---|---|---|")
    for mode, label in (("none", "no fsync"), ("per-message", "a sync per message (commit batch 1)"),
                        ("group", "group commit (defaults: 64, 2 ms)")):
        runs = [h for h in throughput if hop_mode(h) == mode]
        rate_ = hop_rate(mode)
        ratio = rate_ / hop_rate("per-message")
        # Each hop's synced batches when it had forwarded the N-th message.
        batches = median([h["messages"] * len(h["synced_batches"]) / sum(h["synced_batches"])
                          for h in runs if sum(h.get("synced_batches") or [0])])
        sized = "-" if batches != batches else f"{batches:.1f}"
        lat = [h for h in paced if hop_mode(h) == mode]
        latency = (f"{median([h['p50_ms'] for h in lat]):.2f} ms / "
                   f"{median([h['p99_ms'] for h in lat]):.2f} ms ({len(lat)} runs)") if lat else "-"
        print(f"| {label} | {rate_:.0f} msg/s ({len(runs)} runs, N={runs[0]['messages'] if runs else '-'}) "
              f"| x{ratio:.2f} | {sized} | {latency} |")
if pipeline:
    print("\n### Demo pipeline (parse JSON, enrich, sink; 2 processes x 2 workers per stage)\n")
    for durability in ("none", "full"):
        runs = [p["rate"] for p in pipeline if p["durability"] == durability]
        print(f"- durability {durability}: median {median(runs):.0f} events/s over {len(runs)} runs")
