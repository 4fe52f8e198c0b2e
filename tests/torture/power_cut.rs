//! Power cuts: a workload on a loop-mounted ext4, xfs or btrfs image is frozen as it
//! enters a chosen system call (strace injects SIGSTOP), and the filesystem is cut off
//! there: shut down without flushing its log (ext4, xfs), or copied block for block
//! while mounted (btrfs). After remounting, every acknowledged operation must be there.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirq::{DirectoryQueue, Durability};

use crate::inventory::{self, payload, Inventory};
use crate::support::{self, Figures, Mount, Outcome, Proc, Rng};
use crate::Case;

/// Regression: creating a queue did not sync the new directories, so that on btrfs a
/// power cut soon after could take back a state directory (`errors/`) of a queue that
/// had already acknowledged messages.
pub const NEW_QUEUE_CASE: Case = Case {
    name: "new queue survives a power cut",
    injects: "a power cut right after a new queue (in new parent directories) acknowledged \
              its first message, on ext4, xfs and btrfs",
    invariant: "the queue's whole layout and the message are there after remounting",
    run: new_queue_survives,
};

fn new_queue_survives(figures: &mut Figures) -> Outcome {
    if let Err(reason) = support::need_root_and(&["xfs_io", "mkfs.ext4", "mkfs.xfs", "mkfs.btrfs"])
    {
        return Outcome::Skipped(reason);
    }
    for (kind, _) in FILESYSTEMS {
        if !support::kernel_has(kind) {
            return Outcome::Skipped(format!("the kernel cannot mount {kind}"));
        }
        let mount = Mount::image(kind, 512);
        let root = mount.path().join("new/nested/q");
        let out = support::output(&mut support::role(&[
            "produce",
            support::path_str(&root),
            "7",
            "1",
            "300",
            "0",
        ]));
        assert!(out.status.success(), "{kind}: produce failed: {out:?}");
        power_off(&mount);
        power_on(&mount);
        let queue = DirectoryQueue::builder(&root)
            .create(false)
            .open()
            .unwrap_or_else(|e| panic!("{kind}: the new queue did not survive the cut: {e}"));
        let inventory = Inventory::take(&[queue.root()]);
        let places: Vec<_> = inventory.places(7).iter().map(|f| f.state).collect();
        assert_eq!(
            places,
            ["incoming"],
            "{kind}: the acknowledged message after the cut"
        );
        figures.add("filesystems", 1);
    }
    Outcome::Passed
}

pub const CASE: Case = Case {
    name: "power cut",
    injects: "the filesystem cut off at a random system call of an enqueue/forward/commit \
              workload (strace SIGSTOP, then `xfs_io -x -c shutdown` on ext4 and xfs, an image \
              copy taken while mounted on btrfs), remounted",
    invariant: "every acknowledged enqueue, forward and commit is durable; no 0-byte or partial \
                message; no message in two places; only the one operation in flight is undecided",
    run,
};

/// The workload's operations per run (enqueues; half as many forwards, a quarter as
/// many commits).
const OPERATIONS: u64 = 120;
const SIZE: usize = 6000;
/// The filesystems cut, with how many trials each.
const FILESYSTEMS: [(&str, u32); 3] = [("ext4", 25), ("xfs", 25), ("btrfs", 15)];

/// Where to freeze: a system call and the range of its occurrences to pick from.
const FREEZE_AT: &[(&str, u64, u64)] = &[
    ("fsync", 2, 400),
    ("renameat2", 2, 250),
    ("unlinkat", 1, 30),
    ("write", 2, 300),
    ("openat", 20, 300),
    // The message file's own sync: `sync_file_range` where the journal commit makes it
    // durable (ext4, xfs), `fdatasync` elsewhere (see `file_sync`).
    (FILE_SYNC, 1, 120),
];

pub(crate) const FILE_SYNC: &str = "file sync";

/// The system call that syncs a message file on `kind`.
pub(crate) fn file_sync(kind: &str) -> &'static str {
    match kind {
        "ext4" | "xfs" => "sync_file_range",
        _ => "fdatasync",
    }
}

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
                "{context}: {} acknowledged ops, {} messages checked{}",
                stats.acknowledged,
                stats.checked,
                if stats.frozen {
                    ""
                } else {
                    " (finished before the cut)"
                }
            );
            totals.add(&stats);
        }
    }
    figures.set("power cuts", totals.cuts);
    figures.set("frozen mid-workload", totals.frozen);
    figures.set("acknowledged ops", totals.acknowledged);
    figures.set("messages checked", totals.checked);
    figures.set("lost", 0);
    figures.set("duplicated", 0);
    Outcome::Passed
}

#[derive(Default)]
struct Totals {
    cuts: u64,
    frozen: u64,
    acknowledged: u64,
    checked: u64,
}

impl Totals {
    fn add(&mut self, stats: &CutStats) {
        self.cuts += 1;
        self.frozen += u64::from(stats.frozen);
        self.acknowledged += stats.acknowledged;
        self.checked += stats.checked;
    }
}

struct CutStats {
    frozen: bool,
    acknowledged: u64,
    checked: u64,
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
        &["powercut", support::path_str(&dir), &OPERATIONS.to_string()],
    );
    let checked = check(&dir, &lines, context);
    restore(mount);
    CutStats {
        frozen,
        acknowledged: lines.len() as u64,
        checked,
    }
}

/// Runs the workload `role` (a role of this executable, all its threads traced) in
/// the new directory `dir` of `mount`, freezes it as it enters `call` for the
/// `occurrence`-th time (strace injects SIGSTOP; every thread stops), cuts the power
/// there, and mounts what the cut left. Returns the lines the workload printed
/// (its acknowledgements) and whether it was frozen (false: it finished first). The
/// caller checks the directory, then calls [`restore`].
pub(crate) fn freeze_and_cut(
    mount: &Mount,
    dir: &Path,
    call: &str,
    occurrence: u64,
    context: &str,
    role: &[&str],
) -> (Vec<String>, bool) {
    std::fs::create_dir(dir).expect("create the run's directory");
    // The run's directory is the test's own: make it durable, as the queues make
    // theirs.
    std::fs::File::open(mount.path())
        .and_then(|d| d.sync_all())
        .expect("sync the mount's root");
    // `-f`: the workload's threads are traced too, and the injected SIGSTOP stops
    // them all (a group stop). strace reports each thread's stop on its standard
    // error, with the workload's own; only `call` is traced.
    let mut tracer = Proc::spawn(
        support::role_under_strace(&[
            "-f",
            "-e",
            &format!("trace={call}"),
            "-e",
            "signal=STOP",
            "-e",
            &format!("inject={call}:signal=STOP:when={occurrence}"),
        ])
        .args(role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped()),
    );
    let lines = collect_lines(tracer.0.stdout.take().expect("workload stdout"));
    let reports = collect_lines(tracer.0.stderr.take().expect("strace stderr"));
    let mut finished = None;
    let mut workload = None;
    support::wait_until(
        Duration::from_secs(120),
        "the workload to freeze or finish",
        || {
            if let Some(status) = tracer.0.try_wait().expect("poll strace") {
                finished = Some(status);
                return true;
            }
            // Read again each time: strace's first child may be its own test of the
            // kernel's ptrace, not the workload.
            workload = spawned(tracer.id());
            workload.is_some_and(|pid| all_stopped(pid, &reports.0.lock().expect("reports")))
        },
    );
    let frozen = finished.is_none();
    power_off(mount);
    if let (true, Some(pid)) = (frozen, workload) {
        support::send(pid, rustix::process::Signal::KILL);
    }
    support::kill(&mut tracer.0);
    let lines = lines.finish();
    let reports = reports.finish();
    if let Some(status) = finished {
        assert!(
            status.success(),
            "{context}: the workload failed ({status}): {}",
            reports.join("\n")
        );
    }
    power_on(mount);
    (lines, frozen)
}

/// Cuts the power of `mount` with whatever writes to it frozen: shuts ext4 and xfs
/// down without flushing their logs, or copies a btrfs image as the disk holds it.
pub(crate) fn power_off(mount: &Mount) {
    match mount.kind {
        "btrfs" => {
            support::sh(
                "cp",
                &[
                    "--sparse=always",
                    support::path_str(mount.image_path()),
                    support::path_str(&mount.beside("cut.img")),
                ],
            );
        }
        _ => {
            support::sh(
                "xfs_io",
                &["-x", "-c", "shutdown", support::path_str(mount.path())],
            );
        }
    }
}

/// Mounts what the power cut left: the shut-down filesystem (its log replayed) or the
/// btrfs copy. Processes that used the mount must be dead.
pub(crate) fn power_on(mount: &Mount) {
    mount.unmount();
    match mount.kind {
        "btrfs" => mount.mount_image(&mount.beside("cut.img")),
        _ => mount.mount_image(mount.image_path()),
    }
}

/// Goes back to the image that was not cut (btrfs), for the next trial.
pub(crate) fn restore(mount: &Mount) {
    if mount.kind == "btrfs" {
        mount.unmount();
        std::fs::remove_file(mount.beside("cut.img")).expect("remove the image copy");
        mount.mount_image(mount.image_path());
    }
}

/// Recovers the remounted queues and checks them against the acknowledgements.
/// Returns how many payloads were checked.
fn check(dir: &Path, lines: &[String], context: &str) -> u64 {
    let (a, b) = (dir.join("a"), dir.join("b"));
    // As the workload would on restart: open (completing a layout whose creation was
    // cut short) and recover.
    for q in [&a, &b] {
        DirectoryQueue::builder(q)
            .tmp_max_age(Duration::ZERO)
            .open()
            .and_then(|q| q.recover())
            .unwrap_or_else(|e| panic!("{context}: recover after the cut: {e}"));
    }
    let mut acked: [BTreeSet<u64>; 3] = Default::default();
    for line in lines {
        let (op, seq) = line.split_once(' ').expect("an acknowledgement line");
        let seq: u64 = seq.parse().expect("a sequence number");
        let set = match op {
            "E" => 0,
            "F" => 1,
            "C" => 2,
            _ => panic!("{context}: unexpected line {line:?}"),
        };
        acked[set].insert(seq);
    }
    let [enqueued, forwarded, committed] = &acked;
    let inventory = Inventory::take(&[&a, &b]);
    inventory.assert_intact(context);
    inventory.assert_empty(&["pending", "tmp"], context);
    // At most one operation was in flight when the power went: the next enqueue, the
    // forward of the oldest message not yet forwarded, or the commit of the oldest
    // forwarded one not yet committed.
    let next_enqueue = enqueued.last().map_or(0, |s| s + 1);
    let forward_candidate = enqueued.difference(forwarded).next().copied();
    let commit_candidate = forwarded.difference(committed).next().copied();
    for seq in 0..=next_enqueue {
        let places: Vec<String> = inventory
            .places(seq)
            .iter()
            .map(|f| {
                let q = if f.queue == a { "a" } else { "b" };
                format!("{q}/{}", f.state)
            })
            .collect();
        let places: Vec<&str> = places.iter().map(String::as_str).collect();
        let allowed: &[&[&str]] = if committed.contains(&seq) {
            &[&[]]
        } else if forwarded.contains(&seq) {
            if Some(seq) == commit_candidate {
                &[&["b/incoming"], &[]]
            } else {
                &[&["b/incoming"]]
            }
        } else if enqueued.contains(&seq) {
            if Some(seq) == forward_candidate {
                &[&["a/incoming"], &["b/incoming"]]
            } else {
                &[&["a/incoming"]]
            }
        } else {
            &[&[], &["a/incoming"]]
        };
        assert!(
            allowed.contains(&places.as_slice()),
            "{context}: payload {seq} is in {places:?}, allowed {allowed:?} \
             (acknowledged: enqueued {}, forwarded {}, committed {})",
            enqueued.contains(&seq),
            forwarded.contains(&seq),
            committed.contains(&seq),
        );
    }
    let unexpected: Vec<_> = inventory
        .found
        .iter()
        .filter(|f| f.seq.as_ref().is_ok_and(|s| *s > next_enqueue))
        .collect();
    assert!(
        unexpected.is_empty(),
        "{context}: payloads never sent: {unexpected:#?}"
    );
    next_enqueue + 1
}

/// The workload: `powercut DIR OPERATIONS`. Prints `E seq`, `F seq` and
/// `C seq` as each enqueue, forward and commit is acknowledged.
pub fn child(args: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let [dir, operations] = args else {
        return Err(format!("powercut DIR OPERATIONS, not {args:?}").into());
    };
    let operations: u64 = operations.parse()?;
    let open = |name: &str| {
        DirectoryQueue::builder(PathBuf::from(dir).join(name))
            .durability(Durability::Full)
            .open()
    };
    let (a, b) = (open("a")?, open("b")?);
    let seq_of = |m: &dirq::Message| -> Result<u64, Box<dyn std::error::Error>> {
        Ok(inventory::parse(&m.bytes()?)?)
    };
    for seq in 0..operations {
        a.enqueue(payload(seq, SIZE))?;
        println!("E {seq}");
        if seq % 2 == 1 {
            let m = a.try_claim()?.ok_or("a is empty")?;
            let claimed = seq_of(&m)?;
            m.forward(&b)?;
            println!("F {claimed}");
        }
        if seq % 4 == 3 {
            let m = b.try_claim()?.ok_or("b is empty")?;
            let claimed = seq_of(&m)?;
            m.commit()?;
            println!("C {claimed}");
        }
    }
    Ok(())
}

/// Lines read from a child's pipe by a thread, as they come.
pub(crate) struct Lines(
    pub(crate) Arc<Mutex<Vec<String>>>,
    std::thread::JoinHandle<()>,
);

impl Lines {
    /// Waits for the end of the pipe and returns every line.
    pub(crate) fn finish(self) -> Vec<String> {
        self.1.join().expect("a pipe reader");
        let lines = self.0.lock().expect("lines").clone();
        lines
    }
}

pub(crate) fn collect_lines(pipe: impl std::io::Read + Send + 'static) -> Lines {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            sink.lock().expect("lines").push(line);
        }
    });
    Lines(lines, reader)
}

/// The process strace runs now, if any.
fn spawned(tracer: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{tracer}/task/{tracer}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether every thread of `pid` is in the group stop: strace reported it stopped by
/// SIGSTOP, and it is in a tracing stop. (A thread is also briefly in a tracing stop
/// at each system call strace looks at, so the state alone says nothing.) strace
/// names the thread (`[pid N]`) only while it traces more than one: a report without
/// a name is the main thread's, before the Pipers' threads started.
fn all_stopped(pid: u32, reports: &[String]) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let stopped: BTreeSet<u32> = reports
        .iter()
        .filter(|l| l.contains("--- stopped by SIGSTOP ---"))
        .filter_map(|l| match l.strip_prefix("[pid") {
            Some(rest) => rest.split(']').next()?.trim().parse().ok(),
            None => Some(pid),
        })
        .collect();
    let mut any = false;
    for task in tasks {
        let Some(tid) = task
            .ok()
            .and_then(|t| t.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        else {
            return false;
        };
        any = true;
        let traced_stop = matches!(support::process_state(tid), Some('t' | 'T'));
        if !traced_stop || !stopped.contains(&tid) {
            return false;
        }
    }
    any
}
