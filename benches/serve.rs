//! Submit latency of `dirq serve`: p50 and p99 of `POST /api/v1/queues/{name}/messages`
//! over HTTP/1.1 keep-alive from 1 and 16 clients, against the baseline of
//! `DirectoryQueue::enqueue` from as many threads, on the same disk in the same run
//! (docs/performance.md, "Submit latency"), and the rates of both.
//!
//! `cargo bench --features serve --bench serve` (set `DIRQ_BENCH_DIR` to put the spool
//! on another filesystem; default: a temporary directory under `target/`).

use std::time::{Duration, Instant};

use dirq::{DirectoryQueue, Durability};

const PER_CLIENT: usize = 1000;
const TOKEN: &str = "bench-token";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report(
    label: &str,
    mut samples: Vec<Duration>,
    baseline: Option<(Duration, Duration)>,
) -> (Duration, Duration) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.50), percentile(&samples, 0.99));
    let ratio = baseline.map_or(String::new(), |(b50, b99)| {
        format!(
            "  ({:.1}x / {:.1}x the baseline)",
            p50.as_secs_f64() / b50.as_secs_f64(),
            p99.as_secs_f64() / b99.as_secs_f64()
        )
    });
    println!(
        "{label:<44} n={:<6} p50 {:>8.3} ms  p99 {:>8.3} ms{ratio}",
        samples.len(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
    (p50, p99)
}

/// Submits `PER_CLIENT` messages from each of `clients` threads; every latency.
fn http_submits(url: &str, clients: usize, body: &[u8]) -> Vec<Duration> {
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(move || {
                    let agent: ureq::Agent = ureq::Agent::config_builder()
                        .http_status_as_error(false)
                        .build()
                        .into();
                    let mut latencies = Vec::with_capacity(PER_CLIENT);
                    for _ in 0..PER_CLIENT {
                        let start = Instant::now();
                        let mut response = agent
                            .post(url)
                            .header("Authorization", format!("Bearer {TOKEN}"))
                            .send(body)
                            .expect("POST");
                        let _ = response.body_mut().read_to_vec();
                        latencies.push(start.elapsed());
                        assert_eq!(response.status().as_u16(), 201);
                    }
                    latencies
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().expect("a client"))
            .collect()
    })
}

/// Enqueues `PER_CLIENT` messages from each of `threads` threads; every latency.
fn direct_enqueues(queue: &DirectoryQueue, threads: usize, body: &[u8]) -> Vec<Duration> {
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    (0..PER_CLIENT)
                        .map(|_| {
                            let start = Instant::now();
                            queue.enqueue(body).expect("enqueue");
                            start.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a thread"))
            .collect()
    })
}

fn main() {
    let base = std::env::var_os("DIRQ_BENCH_DIR").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"),
        std::path::PathBuf::from,
    );
    std::fs::create_dir_all(&base).expect("the bench directory");
    let spool = tempfile::tempdir_in(&base).expect("a spool");
    let body = vec![b'x'; 1024];
    println!(
        "submit latency, 1 KiB messages, spool in {}",
        base.display()
    );
    for durability in [Durability::Full, Durability::None] {
        let name = format!("{durability:?}").to_lowercase();
        let queue = DirectoryQueue::builder(spool.path().join(&name))
            .durability(durability)
            .open()
            .expect("queue");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut config = dirq::serve::ServeConfig::new(spool.path());
        config
            .listen("127.0.0.1:0".parse().expect("an address"))
            .token(TOKEN)
            .durability(durability);
        let server = runtime.block_on(config.bind()).expect("bind");
        let url = format!(
            "http://{}/api/v1/queues/{name}/messages",
            server.local_addr()
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = runtime.spawn(server.run_until(async move {
            let _ = stopped.await;
        }));
        for clients in [1, 16] {
            let start = Instant::now();
            let baseline = report(
                &format!("{name}: enqueue, {clients} thread(s) (baseline)"),
                direct_enqueues(&queue, clients, &body),
                None,
            );
            let direct_rate = (clients * PER_CLIENT) as f64 / start.elapsed().as_secs_f64();
            let start = Instant::now();
            report(
                &format!("{name}: POST, {clients} client(s)"),
                http_submits(&url, clients, &body),
                Some(baseline),
            );
            let http_rate = (clients * PER_CLIENT) as f64 / start.elapsed().as_secs_f64();
            println!(
                "{:<44} {direct_rate:.0} msg/s direct, {http_rate:.0} msg/s over HTTP ({:.2}x)",
                "",
                http_rate / direct_rate
            );
        }
        let _ = stop.send(());
        let _ = runtime.block_on(serving);
    }
}
