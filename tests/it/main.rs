//! Integration tests: the library across threads and processes, the real binary, and
//! Mentat's own Python implementation of the protocol.

#[cfg(feature = "tokio")]
mod aio;
mod alerts;
#[cfg(feature = "tokio")]
mod async_piper;
#[cfg(feature = "nats")]
mod bridge;
mod cancel;
mod cli;
mod cli_admin;
mod cli_robust;
mod cli_run;
mod concurrency;
mod crash;
mod durability_cli;
mod edit;
mod exec;
mod exec_routes;
mod exec_settings;
mod filesystems;
mod group_commit;
mod groups;
mod history;
mod hostile;
mod idempotent;
mod lifecycle;
mod mentat;
mod operator;
mod peerbench;
mod pipeline_examples;
mod piper;
mod queue;
mod run_supervisor;
#[cfg(feature = "serve")]
mod serve;
#[cfg(feature = "serve")]
mod serve_console;
#[cfg(feature = "serve")]
mod serve_load;
mod util;
mod wakeup;
#[cfg(feature = "serve")]
mod webdriver;
