//! Power cuts under a group-commit pipeline: a producer and three Pipers (forward,
//! emit, fan-out forward) in one process on a loop-mounted ext4, xfs or btrfs image,
//! frozen as one of them enters a chosen system call, then the filesystem cut off as
//! in `power_cut.rs`. After remounting, every acknowledged message must be upstream or
//! durably downstream, and what a crash may repeat is only the last batches a stage had
//! not synced yet.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use dirq::piper::{BreakerPolicy, Emit, Outcome as Next, Piper, StageResult};
use dirq::{DirectoryQueue, Durability, Message};

use crate::inventory::{self, payload, Inventory};
use crate::power_cut::{file_sync, freeze_and_cut, restore, FILE_SYNC};
use crate::support::{self, Figures, Mount, Outcome, Rng};
use crate::Case;

pub const CASE: Case = Case {
    name: "power cut under a group-commit pipeline",
    injects: "the filesystem cut off (as in `power cut`) at a random fsync, renameat2, unlinkat, \
              write or message-file sync of a producer feeding three Pipers in batched group \
              commit (commit_batch 8, commit_delay 20 ms, 3 workers each): q0 -forward-> q1 \
              -emit-> q2 -forward with fan-out-> q3 + q3b, on ext4, xfs and btrfs",
    invariant: "every acknowledged message is upstream or durably downstream: never lost, never \
                0-byte or partial, never twice in one queue; a fan-out is in both outputs or its \
                input is still upstream; at most 2 x commit_batch + workers of the messages a \
                stage processed are back in its input, and one also downstream (to be processed \
                again) is among the last that many it processed",
    run,
};

/// Messages the producer enqueues per run.
const MESSAGES: u64 = 160;
/// The producer's payloads, and the transformed ones stage 2 emits (the same sequence
/// number, another size: `inventory::parse` knows both for intact).
const SIZE: usize = 2000;
const EMITTED_SIZE: usize = 2600;
/// Payloads per batch enqueue of the producer (see `enqueue_call_end`).
const BURST: u64 = 16;
/// The Pipers' group commit and workers. Under strace every system call of every
/// thread stops for the tracer, which makes the pipeline several times slower: a batch
/// open for 20 ms then fills to about `BATCH` outcomes (5 to 8 in a finished run), as
/// one open for 2 to 5 ms does untraced.
const BATCH: usize = 8;
const DELAY: Duration = Duration::from_millis(20);
const WORKERS: usize = 3;

/// How many messages a stage processed (printed a `P` line for) may still be in its
/// input after a power cut, and so how deep among the last ones it processed a message
/// found both in its input and downstream (a duplicate, processed again) may be.
///
/// A stage's input message leaves for good only once the barrier synced the batch that
/// holds its outcome (`src/piper/commit.rs`). At the moment of the cut, the outcomes
/// whose batch was not synced yet are at most: the batch the committer took and is
/// syncing (`BATCH`), the next one, which fills meanwhile (`hand` lets it fill up to
/// `BATCH`, then makes workers wait for room), and one per worker between printing its
/// `P` line and handing its outcome over (`WORKERS`, including workers waiting for
/// room). Every message printed before those was in a batch that was synced, unless a
/// worker that printed its `P` line was overtaken, before it handed its outcome over,
/// by whole batches of the others' messages; the count of processed messages still in
/// the input does not depend on that order and is checked too.
const BOUND: usize = 2 * BATCH + WORKERS;

/// The queues of the pipeline, and the stage level of each (q3 and q3b are both the
/// last stage's outputs).
const QUEUES: [&str; 5] = ["q0", "q1", "q2", "q3", "q3b"];
const LEVEL: [usize; 5] = [0, 1, 2, 3, 3];

/// The filesystems cut, with how many trials each.
const FILESYSTEMS: [(&str, u32); 3] = [("ext4", 10), ("xfs", 10), ("btrfs", 8)];

/// Where to freeze: a system call and the range of its occurrences to pick from.
/// strace counts occurrences per thread, so the first thread to reach the count
/// freezes the process. Per message (160), the busiest threads make: the producer one
/// `renameat2`, one message-file sync, one `fsync` and two `write`s (the file, its E
/// line); stage 3's committer one `renameat2` (into q3) and about 1.5 `fsync`s; stage
/// 2's committer one `unlinkat` (the emitted message's original). The ranges end a
/// little after those totals, so that most runs freeze mid-workload and a few finish
/// first (which checks that a finished pipeline left everything durable).
const FREEZE_AT: &[(&str, u64, u64)] = &[
    ("fsync", 2, 260),
    ("renameat2", 2, 170),
    ("unlinkat", 1, 170),
    ("write", 2, 340),
    (FILE_SYNC, 1, 170),
];

fn run(figures: &mut Figures) -> Outcome {
    if let Err(reason) =
        support::need_root_and(&["strace", "xfs_io", "mkfs.ext4", "mkfs.xfs", "mkfs.btrfs"])
    {
        return Outcome::Skipped(reason);
    }
    let mut rng = Rng::new(CASE.name);
    let mut totals = Totals::default();
    for (kind, trials) in FILESYSTEMS {
        if !support::kernel_has(kind) {
            return Outcome::Skipped(format!("the kernel cannot mount {kind}"));
        }
        let mount = Mount::image(kind, 512);
        let mut duplicates = 0;
        for trial in 0..trials {
            let (call, low, high) = FREEZE_AT[rng.below(FREEZE_AT.len() as u64) as usize];
            let call = if call == FILE_SYNC {
                file_sync(kind)
            } else {
                call
            };
            let occurrence = rng.between(low, high);
            let context = format!("{kind} trial {trial}: cut at {call} #{occurrence}");
            let stats = cut(&mount, &format!("t{trial}"), call, occurrence, &context);
            println!(
                "{context}: {} acknowledged, processed by stage {:?}, undone {:?}, \
                 duplicates {:?}{}{}",
                stats.acknowledged,
                stats.processed,
                stats.undone,
                stats.duplicates,
                stats
                    .deepest
                    .map(|d| format!(", deepest {d} of {BOUND}"))
                    .unwrap_or_default(),
                match stats.batches {
                    None => String::new(),
                    Some(b) => format!(" (finished before the cut; synced batches {b:?})"),
                }
            );
            duplicates += stats.duplicates.iter().sum::<u64>();
            totals.add(&stats);
        }
        totals.per_fs.push(format!("{kind} {duplicates}"));
    }
    figures.set("power cuts", totals.cuts);
    figures.set("frozen mid-workload", totals.frozen);
    figures.set("acknowledged", totals.acknowledged);
    figures.set("messages checked", totals.checked);
    figures.set(
        "duplicates re-processed",
        format!(
            "{} ({}; by stage {})",
            totals.duplicates.iter().sum::<u64>(),
            totals.per_fs.join(", "),
            totals.duplicates.map(|d| d.to_string()).join("/")
        ),
    );
    figures.set(
        "deepest duplicate",
        format!("{} of {BOUND}", totals.deepest.unwrap_or(0)),
    );
    figures.set(
        "most outcomes undone in a stage",
        format!("{} of {BOUND}", totals.undone),
    );
    if totals.batches > 0 {
        figures.set(
            "outcomes per synced batch",
            format!("{:.1}", totals.outcomes as f64 / totals.batches as f64),
        );
    }
    figures.set("lost", 0);
    Outcome::Passed
}

#[derive(Default)]
struct Totals {
    cuts: u64,
    frozen: u64,
    acknowledged: u64,
    checked: u64,
    duplicates: [u64; 3],
    deepest: Option<usize>,
    undone: usize,
    per_fs: Vec<String>,
    /// Outcomes and synced batches of the runs that finished.
    outcomes: u64,
    batches: u64,
}

impl Totals {
    fn add(&mut self, stats: &CutStats) {
        self.cuts += 1;
        self.acknowledged += stats.acknowledged;
        self.checked += stats.checked;
        for (total, d) in self.duplicates.iter_mut().zip(stats.duplicates) {
            *total += d;
        }
        self.deepest = self.deepest.max(stats.deepest);
        self.undone = self.undone.max(stats.undone.into_iter().max().unwrap_or(0));
        match stats.batches {
            None => self.frozen += 1,
            Some(batches) => {
                self.outcomes += 3 * MESSAGES;
                self.batches += batches.iter().sum::<u64>();
            }
        }
    }
}

struct CutStats {
    acknowledged: u64,
    checked: u64,
    /// Messages each stage had processed (P lines).
    processed: [usize; 3],
    /// Messages found both in a stage's input and downstream, by stage.
    duplicates: [u64; 3],
    /// The deepest a duplicate was among its stage's last processed messages (0: the
    /// last one).
    deepest: Option<usize>,
    /// Messages each stage processed that are still in its input.
    undone: [usize; 3],
    /// The batches each Piper synced, when the workload finished before the cut.
    batches: Option<[u64; 3]>,
}

/// One run: start the workload in `mount/<name>`, freeze it at `call` #`occurrence`,
/// cut the power, remount and check.
fn cut(mount: &Mount, name: &str, call: &str, occurrence: u64, context: &str) -> CutStats {
    let dir = mount.path().join(name);
    let (lines, frozen) = freeze_and_cut(
        mount,
        &dir,
        call,
        occurrence,
        context,
        &["gcpipe", support::path_str(&dir), &MESSAGES.to_string()],
    );
    let stats = check(&dir, &lines, frozen, context);
    restore(mount);
    stats
}

/// Recovers the remounted queues and checks them against the acknowledgements and the
/// order in which each stage processed its messages.
fn check(dir: &Path, lines: &[String], frozen: bool, context: &str) -> CutStats {
    let queues: Vec<PathBuf> = QUEUES.iter().map(|q| dir.join(q)).collect();
    // As the pipeline would on restart: open (completing a layout whose creation was
    // cut short) and recover.
    for q in &queues {
        DirectoryQueue::builder(q)
            .tmp_max_age(Duration::ZERO)
            .open()
            .and_then(|q| q.recover())
            .unwrap_or_else(|e| panic!("{context}: recover {} after the cut: {e}", q.display()));
    }
    let mut acknowledged = BTreeSet::new();
    let mut processed: [Vec<u64>; 3] = Default::default();
    let mut batches = [0; 3];
    for line in lines {
        let parsed = line
            .split_once(' ')
            .and_then(|(op, n)| Some((op, n.parse::<u64>().ok()?)));
        match parsed {
            Some(("E", seq)) => {
                acknowledged.insert(seq);
            }
            Some(("P1", seq)) => processed[0].push(seq),
            Some(("P2", seq)) => processed[1].push(seq),
            Some(("P3", seq)) => processed[2].push(seq),
            Some(("S1", n)) => batches[0] = n,
            Some(("S2", n)) => batches[1] = n,
            Some(("S3", n)) => batches[2] = n,
            _ => panic!("{context}: unexpected line {line:?}"),
        }
    }
    // Where each payload is: the queues holding it. Within one queue it must be intact
    // and under one name only; nothing may be left in any state but incoming/.
    let mut places: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, queue) in queues.iter().enumerate() {
        let inventory = Inventory::take(&[queue]);
        let context = format!("{context}: {}", QUEUES[i]);
        inventory.assert_intact(&context);
        inventory.assert_empty(&["tmp", "pending", "deferred", "hold", "errors"], &context);
        let size = if LEVEL[i] < 2 { SIZE } else { EMITTED_SIZE };
        for found in &inventory.found {
            assert_eq!(
                found.size, size as u64,
                "{context}: not the payload this queue should hold: {found:?}"
            );
            places
                .entry(*found.seq.as_ref().expect("intact"))
                .or_default()
                .push(i);
        }
    }
    // At most one enqueue call was in flight: the one after the last acknowledged
    // payload (or the batch that holds it, if the E lines stopped part-way through
    // a batch's). Its payloads may be anywhere or nowhere; later ones were never sent.
    let next_enqueue = acknowledged.last().map_or(0, |s| s + 1);
    let sent = enqueue_call_end(next_enqueue).min(MESSAGES);
    let unexpected: Vec<_> = places.range(sent..).collect();
    assert!(
        unexpected.is_empty(),
        "{context}: payloads never sent: {unexpected:?}"
    );
    let mut duplicates = [0; 3];
    let mut deepest = None;
    for seq in 0..sent {
        let held = places.get(&seq).map_or(&[][..], Vec::as_slice);
        let names: Vec<&str> = held.iter().map(|&i| QUEUES[i]).collect();
        if held.is_empty() {
            assert!(
                !acknowledged.contains(&seq),
                "{context}: acknowledged payload {seq} is lost"
            );
            continue;
        }
        if !frozen {
            assert_eq!(
                names,
                ["q3", "q3b"],
                "{context}: payload {seq} after the pipeline finished"
            );
        }
        // The fan-out: the copy into q3b is synced before the input is renamed into
        // q3, so q3 never holds a message without q3b; and q3b without q3 means the
        // input is still in q2.
        let has = |q: &str| names.contains(&q);
        assert!(
            !has("q3") || has("q3b"),
            "{context}: payload {seq} is in {names:?}: forwarded into q3 without its copy"
        );
        assert!(
            has("q3") || !has("q3b") || has("q2"),
            "{context}: payload {seq} is in {names:?}: half a fan-out, its input gone"
        );
        let levels: BTreeSet<usize> = held.iter().map(|&i| LEVEL[i]).collect();
        let Some(&upstream) = levels.first() else {
            continue;
        };
        if levels.len() == 1 {
            continue;
        }
        // Downstream already, but still in the input of stage `upstream + 1`: that
        // stage's removal of it was not synced, so it will be processed again. It must
        // be one of the last messages that stage processed (see BOUND).
        duplicates[upstream] += 1;
        let order = &processed[upstream];
        let position = order.iter().rposition(|&s| s == seq).unwrap_or_else(|| {
            panic!(
                "{context}: payload {seq} is in {names:?}, but stage {} never processed it",
                upstream + 1
            )
        });
        let depth = order.len() - 1 - position;
        assert!(
            depth < BOUND,
            "{context}: payload {seq} is in {names:?}: stage {} processed it {depth} messages \
             before its last, more than the {BOUND} a crash may repeat",
            upstream + 1
        );
        deepest = deepest.max(Some(depth));
    }
    // Whatever a stage processed and is still in its input was in a batch not yet
    // synced (see BOUND), whether or not its results downstream survived.
    let mut undone = [0; 3];
    for (stage, order) in processed.iter().enumerate() {
        let seqs: BTreeSet<u64> = order.iter().copied().collect();
        let left: Vec<u64> = seqs
            .into_iter()
            .filter(|seq| places.get(seq).is_some_and(|p| p.contains(&stage)))
            .collect();
        assert!(
            left.len() <= BOUND,
            "{context}: stage {} processed {left:?} and they are still in its input: \
             more than the {BOUND} outcomes a crash may undo",
            stage + 1
        );
        undone[stage] = left.len();
    }
    CutStats {
        acknowledged: acknowledged.len() as u64,
        checked: sent,
        processed: processed.each_ref().map(Vec::len),
        duplicates,
        deepest,
        undone,
        batches: (!frozen).then_some(batches),
    }
}

/// The workload: `gcpipe DIR MESSAGES`. A producer enqueues MESSAGES payloads into q0
/// (single and batch enqueues, see `enqueue_call_end`), printing `E seq` as each is
/// acknowledged, while three Pipers run q0 -> q1 (forward),
/// q1 -> q2 (emit a transformed payload) and q2 -> q3 + q3b (forward with fan-out),
/// their workers printing `P<stage> seq` before they return each outcome. Once the last
/// stage has forwarded everything, the Pipers stop, each printing `S<stage> batches`.
pub fn child(args: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let [dir, messages] = args else {
        return Err(format!("gcpipe DIR MESSAGES, not {args:?}").into());
    };
    let messages: u64 = messages.parse()?;
    let queues = QUEUES
        .iter()
        .map(|name| {
            DirectoryQueue::builder(Path::new(dir).join(name))
                .durability(Durability::Full)
                .open()
        })
        .collect::<dirq::Result<Vec<_>>>()?;
    let pipers = [
        piper(1, &queues[0], &[("q1", &queues[1])], |_| Next::Forward)?,
        piper(2, &queues[1], &[("q2", &queues[2])], |seq| {
            Next::Emit(vec![Emit::new(payload(seq, EMITTED_SIZE))])
        })?,
        piper(
            3,
            &queues[2],
            &[("q3", &queues[3]), ("q3b", &queues[4])],
            |_| Next::Forward,
        )?,
    ];
    let handles: Vec<_> = pipers.iter().map(Piper::handle).collect();
    let threads: Vec<_> = pipers
        .into_iter()
        .map(|p| std::thread::spawn(move || p.run()))
        .collect();
    let mut seq = 0;
    while seq < messages {
        let end = enqueue_call_end(seq).min(messages);
        if end == seq + 1 {
            queues[0].enqueue(payload(seq, SIZE))?;
        } else {
            queues[0].enqueue_batch((seq..end).map(|s| payload(s, SIZE)))?;
        }
        for acknowledged in seq..end {
            println!("E {acknowledged}");
        }
        seq = end;
    }
    support::wait_until(Duration::from_secs(120), "the pipeline to drain", || {
        handles[2].stats().forwarded == messages
    });
    for handle in &handles {
        handle.shutdown();
    }
    for (stage, thread) in threads.into_iter().enumerate() {
        let stats = thread.join().map_err(|_| "a Piper panicked")??;
        println!("S{} {}", stage + 1, stats.synced_batches);
    }
    Ok(())
}

/// The end of the producer's enqueue call that sends payload `seq`. The producer
/// alternates `BURST` single enqueues and one batch enqueue of `BURST` payloads: the
/// bursts fill the Pipers' batches (single enqueues alone, each with its own fsync,
/// come too slowly for a batch to hold more than one or two outcomes).
fn enqueue_call_end(seq: u64) -> u64 {
    let offset = seq % (2 * BURST);
    if offset < BURST {
        seq + 1
    } else {
        seq - offset + 2 * BURST
    }
}

/// Stage `stage` of the workload's pipeline, in batched group commit.
fn piper(
    stage: usize,
    input: &DirectoryQueue,
    outputs: &[(&str, &DirectoryQueue)],
    outcome: fn(u64) -> Next,
) -> dirq::Result<Piper> {
    let mut builder = Piper::builder(format!("stage{stage}"));
    builder
        .input(input)
        .workers(WORKERS)
        .commit_batch(BATCH)
        .commit_delay(DELAY)
        .breaker(&BreakerPolicy::disabled())
        .out_limit(1 << 30);
    for (name, queue) in outputs {
        builder.output(*name, queue);
    }
    builder.stage(move |message: &Message| -> StageResult {
        let seq = inventory::parse(&message.bytes()?)?;
        println!("P{stage} {seq}");
        Ok(outcome(seq))
    });
    builder.build()
}
