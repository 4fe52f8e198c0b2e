//! The torture suite: crashes, power cuts, injected faults, full disks and hostile
//! directories, each checked against the guarantees of `docs/protocol.md`.
//!
//! ```text
//! cargo test --release --test torture              # every case
//! cargo test --release --test torture -- power     # cases whose name contains "power"
//! ```
//!
//! The suite is its own runner (`harness = false`): cases run one after another, since
//! most of them mount filesystems or kill processes, and it prints the table of
//! `docs/reliability.md` with the figures of this run. The same executable plays the
//! child processes (`--role ...`, see `roles.rs`). Cases that need root, `strace` or a
//! filesystem driver say why they skip; under `CI=true` a skip is a failure.

mod concurrent_recovery;
mod crash_points;
mod faults;
mod full_disk;
mod group_commit;
mod hostile;
mod inventory;
mod kill_storm;
mod model;
mod permissions;
mod poison;
mod power_cut;
mod read_only;
mod roles;
mod scale;
mod stale_owners;
mod support;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use support::{Figures, Outcome};

/// One torture case: what it injects, the invariant it checks, and how to run it.
struct Case {
    name: &'static str,
    injects: &'static str,
    invariant: &'static str,
    run: fn(&mut Figures) -> Outcome,
}

const CASES: &[Case] = &[
    kill_storm::CASE,
    kill_storm::ASYNC_CASE,
    crash_points::CASE,
    power_cut::CASE,
    power_cut::NEW_QUEUE_CASE,
    group_commit::CASE,
    faults::CASE,
    faults::BACKOFF_CASE,
    full_disk::CASE,
    read_only::CASE,
    permissions::CASE,
    poison::CASE,
    hostile::CASE,
    hostile::LONG_NAME_CASE,
    stale_owners::CASE,
    concurrent_recovery::CASE,
    scale::CASE,
    model::CASE,
];

struct Ran {
    case: &'static Case,
    result: Result<Outcome, String>,
    figures: Figures,
    seconds: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--role") {
        std::process::exit(roles::main(&args[1..]));
    }
    // libtest flags cargo may pass (`--nocapture`, `--test-threads=1`, ...) are not
    // filters.
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected: Vec<&Case> = CASES
        .iter()
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.name.contains(f.as_str())))
        .collect();
    println!("torture: {} of {} cases", selected.len(), CASES.len());

    let mut ran = Vec::new();
    for case in selected {
        println!("\n=== {}: {}", case.name, case.injects);
        let start = Instant::now();
        let mut figures = Figures::default();
        let result = catch_unwind(AssertUnwindSafe(|| (case.run)(&mut figures)))
            .map_err(|panic| support::panic_text(panic.as_ref()));
        let seconds = start.elapsed().as_secs_f64();
        let verdict = match &result {
            Ok(Outcome::Passed) => "passed".to_owned(),
            Ok(Outcome::Skipped(reason)) => format!("SKIPPED: {reason}"),
            Err(e) => format!("FAILED: {e}"),
        };
        println!("--- {} {verdict} in {seconds:.1} s; {figures}", case.name);
        ran.push(Ran {
            case,
            result,
            figures,
            seconds,
        });
    }

    println!("\n{}", table(&ran));
    let failed: Vec<&str> = ran
        .iter()
        .filter(|r| match &r.result {
            Err(_) => true,
            // Where every capability is provided, a skip hides a regression.
            Ok(Outcome::Skipped(_)) => support::in_ci(),
            Ok(Outcome::Passed) => false,
        })
        .map(|r| r.case.name)
        .collect();
    let total: f64 = ran.iter().map(|r| r.seconds).sum();
    if failed.is_empty() {
        println!("torture: all {} cases passed in {total:.0} s", ran.len());
    } else {
        println!("torture: FAILED: {}", failed.join(", "));
        std::process::exit(1);
    }
}

/// The table of `docs/reliability.md`, with this run's figures.
fn table(ran: &[Ran]) -> String {
    let mut out = String::from(
        "| test | injects | invariant | result | figures of this run |\n|---|---|---|---|---|\n",
    );
    for r in ran {
        let result = match &r.result {
            Ok(Outcome::Passed) => format!("passed ({:.0} s)", r.seconds),
            Ok(Outcome::Skipped(_)) => "skipped".to_owned(),
            Err(_) => "**failed**".to_owned(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.case.name, r.case.injects, r.case.invariant, result, r.figures
        ));
    }
    out
}
