//! Group commit in Pipers: which directories one batch syncs, and in which order.
//!
//! Counted with strace: the child test below runs one Piper per outcome, each over one
//! batch, and the tests read which directories it fsynced between its markers. The
//! count depends on the filesystem (docs/protocol.md §4.2 and §6.7):
//! - where one fsync commits the whole journal (ext4 with a journal, xfs; tmpfs is
//!   treated the same, and the syncs still happen there as system calls), a batch makes
//!   one change of its own and syncs that directory: one fsync per step;
//! - elsewhere (here an ext4 without a journal, as btrfs), each directory the batch
//!   touched is synced once.
//!
//! Either way the results (emitted messages, fan-out copies) are synced before their
//! input leaves `pending/`. Both need root (to mount).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dirq::piper::{Emit, Outcome, Piper, StageResult};
use dirq::{DirectoryQueue, Durability, Message};

use crate::util::{skip, strace_works, wait_until, Tmpfs};

/// Outcomes per batch: every scenario handles exactly one batch.
const BATCH: usize = 8;

/// The scenarios, in the order the child runs them.
const SCENARIOS: [&str; 5] = ["forward", "emit", "fan-out", "commit", "fail"];

/// Where [`group_commit_child`] finds its queues.
const CHILD_DIR: &str = "DIRQ_TEST_GROUP_COMMIT_DIR";

/// Markers in the child's trace: failed `stat`s of `<MARKER>/<step>/<scenario>`.
const MARKER: &str = "/dirq-test-group-commit";

#[test]
fn on_a_journal_wide_filesystem_a_batch_is_one_fsync_per_step() {
    let name = "on_a_journal_wide_filesystem_a_batch_is_one_fsync_per_step";
    if let Err(why) = strace_works() {
        return skip(name, &why);
    }
    let Some(fs) = Tmpfs::mount("size=64m") else {
        return skip(name, "needs root to mount a tmpfs");
    };
    let trace = trace_child(fs.path());
    let state = |queue: &str, state: &str| state_path(fs.path(), queue, state);
    for scenario in SCENARIOS {
        let mut expected = match scenario {
            "emit" => vec![state("emit-out", "incoming")],
            "fan-out" => vec![state("fan-out-copy", "incoming")],
            _ => vec![],
        };
        // The input's pending/ is the directory touched and synced.
        expected.push(state(&format!("{scenario}-in"), "pending"));
        assert_eq!(
            synced(&trace, scenario),
            expected,
            "{scenario}: one batch of {BATCH} outcomes: the results first, then one commit"
        );
    }
}

#[test]
fn without_a_journal_a_batch_syncs_each_touched_directory_once_outputs_first() {
    let name = "without_a_journal_a_batch_syncs_each_touched_directory_once_outputs_first";
    if let Err(why) = strace_works() {
        return skip(name, &why);
    }
    let Some(fs) = Ext4WithoutJournal::mount() else {
        return skip(name, "needs root, mkfs.ext4 and a loop device");
    };
    let trace = trace_child(fs.path());
    let state = |queue: &str, state: &str| state_path(fs.path(), queue, state);
    let sorted = |mut dirs: Vec<String>| {
        dirs.sort();
        dirs
    };
    for scenario in SCENARIOS {
        let input = format!("{scenario}-in");
        let pending = state(&input, "pending");
        let mut expected = vec![state(&input, "incoming"), pending.clone()];
        // Directories holding results, which must be synced before the inputs leave.
        let results: Vec<String> = match scenario {
            "forward" => {
                // One rename carries the message: nothing to wait for.
                expected.push(state(&format!("{scenario}-out"), "incoming"));
                vec![]
            }
            "emit" => vec![state(&format!("{scenario}-out"), "incoming")],
            "fan-out" => {
                expected.push(state(&format!("{scenario}-out"), "incoming"));
                vec![state(&format!("{scenario}-copy"), "incoming")]
            }
            "fail" => {
                expected.push(state(&input, "errors"));
                vec![]
            }
            _ => vec![],
        };
        expected.extend(results.iter().cloned());
        let dirs = synced(&trace, scenario);
        if scenario == "fail" {
            // Without a journal to order them, each failure's sidecar is made durable
            // before its message appears in errors/: one more sync of errors/ per
            // message, before the batch's.
            let errors = state(&input, "errors");
            let before = dirs.iter().filter(|d| **d == errors).count();
            assert_eq!(
                before,
                BATCH + 1,
                "fail: errors/ synced per sidecar and once per batch: {dirs:#?}"
            );
            let once: Vec<String> = dirs
                .iter()
                .enumerate()
                .filter(|(i, d)| **d != errors || dirs[i + 1..].iter().all(|e| *e != errors))
                .map(|(_, d)| d.clone())
                .collect();
            assert_eq!(sorted(once), sorted(expected), "fail");
            continue;
        }
        assert_eq!(
            sorted(dirs.clone()),
            sorted(expected),
            "{scenario}: one batch of {BATCH} outcomes syncs each directory it touched once"
        );
        for result in &results {
            let synced_at = dirs.iter().position(|d| d == result).unwrap();
            let input_at = dirs.iter().position(|d| *d == pending).unwrap();
            assert!(
                synced_at < input_at,
                "{scenario}: the results ({result}) must be durable before the inputs \
                 leave {pending}; synced in this order: {dirs:#?}"
            );
        }
    }
}

/// Runs [`group_commit_child`] under strace with its queues in `dir`; the trace.
fn trace_child(dir: &Path) -> String {
    let log = dir.join("strace.log");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-y", "-e", "trace=fsync,%%stat", "-o"])
        .arg(&log)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "group_commit::group_commit_child"])
        .args(["--test-threads", "1", "--nocapture"])
        .env(CHILD_DIR, dir)
        .output()
        .unwrap();
    crate::util::assert_succeeded(&out, "the traced child");
    let trace = std::fs::read_to_string(&log).unwrap();
    assert!(trace.contains(MARKER), "no markers in the trace:\n{trace}");
    trace
}

/// The directories fsynced during one scenario's batch, in order.
fn synced(trace: &str, scenario: &str) -> Vec<String> {
    let begin = format!("\"{MARKER}/begin/{scenario}\"");
    let end = format!("\"{MARKER}/end/{scenario}\"");
    assert!(
        trace.contains(&end),
        "{scenario}: no end marker in the trace:\n{trace}"
    );
    trace
        .lines()
        .skip_while(|l| !l.contains(&begin))
        .skip(1)
        .take_while(|l| !l.contains(&end))
        .filter_map(|l| {
            let fd = l.split_once("fsync(")?.1;
            let path = fd.split_once('<')?.1.split_once('>')?.0;
            Some(path.to_owned())
        })
        .collect()
}

/// `<dir>/<queue>/<state>` as strace -y shows it: the kernel's path, no symlinks.
fn state_path(dir: &Path, queue: &str, state: &str) -> String {
    let root = std::fs::canonicalize(dir).unwrap();
    format!("{}/{queue}/{state}", root.display())
}

/// An ext4 without a journal on a loop device, mounted for the duration of a test.
struct Ext4WithoutJournal {
    dir: tempfile::TempDir,
    mounted: PathBuf,
}

impl Ext4WithoutJournal {
    fn mount() -> Option<Ext4WithoutJournal> {
        if !crate::util::is_root() {
            return None;
        }
        let dir = crate::util::tempdir();
        let image = dir.path().join("ext4.img");
        let mounted = dir.path().join("mnt");
        std::fs::create_dir(&mounted).ok()?;
        let ok = |command: &mut Command| command.status().is_ok_and(|s| s.success());
        let made = ok(Command::new("truncate").arg("-s").arg("64M").arg(&image))
            && ok(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-O", "^has_journal"])
                .arg(&image))
            && ok(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&mounted));
        made.then_some(Ext4WithoutJournal { dir, mounted })
    }

    fn path(&self) -> &Path {
        &self.mounted
    }
}

impl Drop for Ext4WithoutJournal {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mounted).status();
        let _ = &self.dir;
    }
}

/// The work that the test above traces, in the tmpfs it names. Run on its own (as in
/// every `cargo test`), it does the same in a directory of its own and checks what each
/// Piper did.
#[test]
fn group_commit_child() {
    let own = crate::util::tempdir();
    let dir: PathBuf = std::env::var_os(CHILD_DIR).map_or_else(|| own.path().into(), PathBuf::from);
    for scenario in SCENARIOS {
        run_scenario(&dir, scenario);
    }
}

fn run_scenario(dir: &Path, scenario: &'static str) {
    // Full and Batch mean the same in a Piper: group commit.
    let durability = if scenario == "commit" {
        Durability::Batch
    } else {
        Durability::Full
    };
    let open = |name: &str| {
        DirectoryQueue::builder(dir.join(format!("{scenario}-{name}")))
            .durability(durability)
            .open()
            .unwrap()
    };
    let (input, output, copy) = (open("in"), open("out"), open("copy"));
    // The producer syncs nothing, so that the trace shows the Piper's syncs alone.
    let producer = DirectoryQueue::builder(input.root())
        .durability(Durability::None)
        .open()
        .unwrap();
    let mut builder = Piper::builder(scenario);
    builder
        .input(&input)
        .output("out", &output)
        .commit_batch(BATCH)
        // Only a full batch closes: one batch per scenario, whatever the machine's pace.
        .commit_delay(Duration::from_secs(3600))
        .stage(move |message: &Message| -> StageResult {
            Ok(match scenario {
                "forward" | "fan-out" => Outcome::Forward,
                "emit" => Outcome::Emit(vec![Emit::new(message.bytes()?)]),
                "commit" => Outcome::Commit,
                _ => Outcome::Fail("failed on purpose".to_owned()),
            })
        });
    if scenario == "fan-out" {
        builder.output("copy", &copy);
    }
    let piper = builder.build().unwrap();
    let handle = piper.handle();
    let runner = std::thread::spawn(move || piper.run());
    // Started once it advertises itself: its start-up work is done.
    wait_until(Duration::from_secs(30), "the Piper to start", || {
        dirq::admin::pipers(&input).is_ok_and(|p| !p.is_empty())
    });
    marker("begin", scenario);
    for i in 0..BATCH {
        producer.enqueue(format!("message {i}")).unwrap();
    }
    wait_until(Duration::from_secs(60), "one synced batch", || {
        handle.stats().synced_batches == 1
    });
    marker("end", scenario);
    handle.shutdown();
    let stats = runner.join().unwrap().unwrap();
    assert_eq!(stats.synced_batches, 1, "{scenario}: {stats:?}");
    let counts = |q: &DirectoryQueue| q.counts().unwrap();
    let expected_out = match scenario {
        "forward" | "fan-out" | "emit" => BATCH,
        _ => 0,
    };
    assert_eq!(counts(&output).incoming, expected_out, "{scenario}");
    let expected_copies = if scenario == "fan-out" { BATCH } else { 0 };
    assert_eq!(counts(&copy).incoming, expected_copies, "{scenario}");
    let expected_errors = if scenario == "fail" { BATCH } else { 0 };
    assert_eq!(counts(&input).errors, expected_errors, "{scenario}");
    assert_eq!(
        counts(&input).pending + counts(&input).incoming,
        0,
        "{scenario}"
    );
}

fn marker(step: &str, scenario: &str) {
    let _ = std::fs::symlink_metadata(format!("{MARKER}/{step}/{scenario}"));
}

/// A batch that never fills is synced once its delay has passed.
#[test]
fn a_batch_that_does_not_fill_is_synced_after_the_delay() {
    let dir = crate::util::tempdir();
    let input = DirectoryQueue::open(dir.path().join("in")).unwrap();
    let output = DirectoryQueue::open(dir.path().join("out")).unwrap();
    let piper = Piper::builder("lonely")
        .input(&input)
        .output("out", &output)
        .commit_batch(1000)
        .commit_delay(Duration::from_millis(20))
        .stage(|_: &Message| -> StageResult { Ok(Outcome::Forward) })
        .build()
        .unwrap();
    let handle = piper.handle();
    let runner = std::thread::spawn(move || piper.run());
    let id = input.enqueue(b"alone").unwrap();
    wait_until(Duration::from_secs(60), "the lone message's batch", || {
        handle.stats().synced_batches == 1
    });
    let ids: Vec<_> = output
        .ids(dirq::State::Incoming)
        .unwrap()
        .collect::<dirq::Result<_>>()
        .unwrap();
    assert_eq!(ids, [id]);
    handle.shutdown();
    let stats = runner.join().unwrap().unwrap();
    assert_eq!((stats.forwarded, stats.synced_batches), (1, 1));
}

#[test]
fn a_commit_batch_out_of_range_is_refused() {
    let dir = crate::util::tempdir();
    let input = DirectoryQueue::open(dir.path().join("in")).unwrap();
    for outcomes in [0, dirq::piper::PiperBuilder::MAX_COMMIT_BATCH + 1] {
        let error = Piper::builder("bad")
            .input(&input)
            .commit_batch(outcomes)
            .stage(|_: &Message| -> StageResult { Ok(Outcome::Commit) })
            .build()
            .unwrap_err();
        assert!(
            matches!(&error, dirq::Error::Config { field, .. } if *field == "commit_batch"),
            "{outcomes}: {error}"
        );
    }
}

/// Without anything to sync (`Durability::None`), there is no barrier.
#[test]
fn durability_none_has_no_barrier() {
    let dir = crate::util::tempdir();
    let open = |name: &str| {
        DirectoryQueue::builder(dir.path().join(name))
            .durability(Durability::None)
            .open()
            .unwrap()
    };
    let (input, output) = (open("in"), open("out"));
    let piper = Piper::builder("fast")
        .input(&input)
        .output("out", &output)
        .stage(|m: &Message| -> StageResult { Ok(Outcome::Emit(vec![Emit::new(m.bytes()?)])) })
        .build()
        .unwrap();
    let handle = piper.handle();
    let runner = std::thread::spawn(move || piper.run());
    input.enqueue(b"one").unwrap();
    wait_until(Duration::from_secs(60), "the emitted message", || {
        output.counts().is_ok_and(|c| c.incoming == 1)
    });
    wait_until(Duration::from_secs(60), "the original's commit", || {
        handle.stats().committed == 1
    });
    handle.shutdown();
    let stats = runner.join().unwrap().unwrap();
    assert_eq!(stats.synced_batches, 0);
}
