//! Producers and forwarding workers killed with SIGKILL at random moments: after
//! recovery, every acknowledged message is in the next queue exactly once.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use dirq::State;

use crate::util::{assert_succeeded, dirq, names_in, run_ok, tempdir};

const KILLS: usize = 60;
const FILES_PER_PRODUCER: usize = 40;

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Producer,
    Worker,
}

struct Running {
    role: Role,
    child: Child,
    /// For producers: the input files, in the order their ids are printed.
    files: Vec<PathBuf>,
}

#[test]
fn sigkill_storm_loses_and_duplicates_nothing() {
    let dir = tempdir();
    let (a, b, inputs) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("inputs"),
    );
    std::fs::create_dir(&inputs).unwrap();
    run_ok(&["init", a.to_str().unwrap(), b.to_str().unwrap()]);

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = seed;
    let mut random = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };

    let mut next_file = 0;
    let mut new_files = |count: usize| -> Vec<PathBuf> {
        (0..count)
            .map(|_| {
                let path = inputs.join(format!("input-{next_file:06}"));
                std::fs::write(&path, format!("payload {next_file}")).unwrap();
                next_file += 1;
                path
            })
            .collect()
    };
    let spawn = |role: Role, files: Vec<PathBuf>| -> Running {
        let mut command = dirq();
        match role {
            Role::Producer => command.arg("push").arg(&a).args(&files),
            Role::Worker => command
                .args(["take", "-n", "1000000", "--wait", "0.2", "--to"])
                .arg(&b)
                .arg(&a),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Running { role, child, files }
    };

    // id -> expected content, for every id a producer printed (acknowledged).
    let mut acknowledged: HashMap<String, String> = HashMap::new();
    let mut collect = |running: Running, killed: bool| {
        let out = running.child.wait_with_output().unwrap();
        if !killed {
            assert_succeeded(&out, "dirq push or take");
        }
        if running.role == Role::Producer {
            let text = String::from_utf8(out.stdout).unwrap();
            // Only complete lines were acknowledged.
            let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
            for (line, file) in complete.lines().zip(&running.files) {
                acknowledged.insert(line.to_owned(), std::fs::read_to_string(file).unwrap());
            }
        }
    };

    let mut running: Vec<Running> = vec![
        spawn(Role::Producer, new_files(FILES_PER_PRODUCER)),
        spawn(Role::Producer, new_files(FILES_PER_PRODUCER)),
        spawn(Role::Worker, Vec::new()),
        spawn(Role::Worker, Vec::new()),
    ];
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut kills = 0;
    while kills < KILLS {
        assert!(Instant::now() < deadline, "storm did not finish in time");
        // A random moment to strike (not a synchronisation: any moment is valid).
        std::thread::sleep(Duration::from_millis(10 + random(90)));
        // Replace processes that finished on their own.
        for slot in running.iter_mut() {
            if slot.child.try_wait().unwrap().is_some() {
                let role = slot.role;
                let files = if role == Role::Producer {
                    new_files(FILES_PER_PRODUCER)
                } else {
                    Vec::new()
                };
                let done = std::mem::replace(slot, spawn(role, files));
                collect(done, false);
            }
        }
        let victim = random(running.len() as u64) as usize;
        let role = running[victim].role;
        let files = if role == Role::Producer {
            new_files(FILES_PER_PRODUCER)
        } else {
            Vec::new()
        };
        let mut killed = std::mem::replace(&mut running[victim], spawn(role, files));
        if killed.child.kill().is_ok() {
            kills += 1;
        }
        collect(killed, true);
    }
    for mut r in running {
        let _ = r.child.kill();
        collect(r, true);
    }

    run_ok(&["recover", a.to_str().unwrap()]);
    run_ok(&[
        "take",
        "-n",
        "1000000",
        "--to",
        b.to_str().unwrap(),
        a.to_str().unwrap(),
    ]);

    let b_incoming = b.join(State::Incoming.as_str());
    let in_b: HashSet<String> = names_in(&b_incoming).into_iter().collect();
    assert!(
        names_in(&a.join("pending")).is_empty(),
        "A's pending/ must be empty"
    );
    assert!(names_in(&a.join("incoming")).is_empty(), "A was drained");
    let mut missing = Vec::new();
    for (id, content) in &acknowledged {
        if in_b.contains(id) {
            assert_eq!(
                &std::fs::read_to_string(b_incoming.join(id)).unwrap(),
                content,
                "{id}"
            );
        } else {
            missing.push(id);
        }
    }
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    // Nothing partial or foreign: every message in B is a complete payload.
    for id in &in_b {
        let body = std::fs::read_to_string(b_incoming.join(id)).unwrap();
        assert!(body.starts_with("payload "), "{id}: {body:?}");
    }
    eprintln!(
        "{kills} kills; {} acknowledged, {} in B (unacknowledged ones that made it: {})",
        acknowledged.len(),
        in_b.len(),
        in_b.len() - acknowledged.len()
    );
    assert!(
        acknowledged.len() > 100,
        "the storm acknowledged too little to prove anything"
    );
    assert_no_two_names(&a, &b);
}

/// No message is in both queues (a forward is a single rename).
fn assert_no_two_names(a: &Path, b: &Path) {
    let in_a: HashSet<String> = ["incoming", "pending", "errors"]
        .iter()
        .flat_map(|s| names_in(&a.join(s)))
        .collect();
    let in_b: HashSet<String> = names_in(&b.join("incoming")).into_iter().collect();
    assert!(in_a.is_disjoint(&in_b));
}
