//! One bridge pair over loopback: queue → `Outbound` → JetStream → `Inbound` → queue,
//! 200-byte messages, end to end. Needs `nats-server` on the PATH (or in /usr/sbin).
//!
//! ```sh
//! cargo bench --features nats --bench bridge            # N=20000
//! DIRQ_BENCH_N=50000 cargo bench --features nats --bench bridge
//! ```
//!
//! Prints, each as the median of 3 runs:
//! - messages/s end to end with a single node, the queues in `Durability::None` and in
//!   `Full`, against the baseline measured in the same run: a local forward A → B of the
//!   same messages, one process, same mode;
//! - the same with a 3-node cluster on loopback and a 3-replica stream;
//! - the latency of one hop (enqueue on one side to claim on the other), p50 and p99 of
//!   500 messages sent one at a time.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dirq::bridge::{setup, BridgeConfig, BridgeStats, Inbound, Outbound, StopHandle};
use dirq::{DirectoryQueue, Durability, State};

const SIZE: usize = 200;

fn nats_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// nats-server processes, killed on drop.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `nodes` JetStream servers on 127.0.0.1 (a cluster when more than one); their URL list.
fn start_servers(dir: &Path, nodes: usize) -> (Servers, String) {
    let server = nats_server().expect("nats-server is not installed");
    let ports: Vec<(u16, u16)> = (0..nodes).map(|_| (free_port(), free_port())).collect();
    let mut children = Vec::new();
    for (i, (port, cluster)) in ports.iter().enumerate() {
        let mut c = Command::new(&server);
        c.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-n"])
            .arg(format!("n{i}"))
            .arg("-sd")
            .arg(dir.join(format!("js{i}")))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if nodes > 1 {
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, c))| format!("nats://127.0.0.1:{c}"))
                .collect();
            c.args(["--cluster_name", "bench", "--cluster"])
                .arg(format!("nats://127.0.0.1:{cluster}"))
                .arg("--routes")
                .arg(routes.join(","));
        }
        children.push(c.spawn().expect("start nats-server"));
    }
    let urls = ports
        .iter()
        .map(|(p, _)| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    (Servers(children), urls)
}

fn setup_when_ready(config: &BridgeConfig) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match setup(config) {
            Ok(_) => return,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("setup: {e}"),
        }
    }
}

fn open(path: &Path, durability: Durability) -> DirectoryQueue {
    DirectoryQueue::builder(path)
        .durability(durability)
        .open()
        .expect("open queue")
}

/// A destination: it remembers finished ids, as `dirq bridge in` makes it.
fn open_destination(path: &Path, durability: Durability) -> DirectoryQueue {
    DirectoryQueue::builder(path)
        .durability(durability)
        .remember_finished(Duration::from_secs(3600))
        .open()
        .expect("open queue")
}

/// A running bridge pair; stopped (drained) by `stop`.
struct Pair {
    stops: [StopHandle; 2],
    threads: Vec<JoinHandle<BridgeStats>>,
}

impl Pair {
    fn start(src: &DirectoryQueue, dst: &DirectoryQueue, config: &BridgeConfig) -> Pair {
        let out = Outbound::new(src.clone(), config.clone());
        let inb = Inbound::new(dst.clone(), config.clone());
        let stops = [out.stop_handle(), inb.stop_handle()];
        let threads = vec![
            std::thread::spawn(move || out.run().expect("bridge out")),
            std::thread::spawn(move || inb.run().expect("bridge in")),
        ];
        Pair { stops, threads }
    }

    fn stop(self) {
        for stop in &self.stops {
            stop.stop();
        }
        for t in self.threads {
            t.join().expect("bridge thread");
        }
    }
}

/// Waits until `queue` holds `n` messages. A count reads the whole directory (tens of
/// thousands of names by the end), so it is taken every 50 ms: counting every 2 ms took
/// most of a core from the bridge it was timing.
fn wait_for(queue: &DirectoryQueue, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while queue.count(State::Incoming).expect("count") < n {
        assert!(Instant::now() < deadline, "messages did not arrive");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fill(queue: &DirectoryQueue, n: usize) {
    let payload = vec![b'x'; SIZE];
    for chunk in 0..n.div_ceil(1000) {
        let k = 1000.min(n - chunk * 1000);
        queue
            .enqueue_batch((0..k).map(|_| payload.as_slice()))
            .expect("fill");
    }
}

fn drain(queue: &DirectoryQueue) {
    while let Some(m) = queue.try_claim().expect("claim") {
        m.commit().expect("commit");
    }
}

/// Messages/s across the bridge pair for `n` messages waiting in the source.
fn bridged(
    dir: &Path,
    urls: &str,
    stream: &str,
    replicas: usize,
    mode: Durability,
    n: usize,
) -> f64 {
    let mut config = BridgeConfig::new(urls, stream);
    // Nothing consumes the destination here: no backpressure pause.
    config.replicas(replicas).watermarks(n + 1, n);
    if let Some(batch) = std::env::var("DIRQ_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.batch(batch);
    }
    setup_when_ready(&config);
    let src = open(&dir.join(format!("{stream}-src")), mode);
    let dst = open_destination(&dir.join(format!("{stream}-dst")), mode);
    fill(&src, n);
    let started = Instant::now();
    let pair = Pair::start(&src, &dst, &config);
    if std::env::var_os("DIRQ_BENCH_TRACE").is_some() {
        while dst.count(State::Incoming).expect("count") < n {
            std::thread::sleep(Duration::from_millis(500));
            eprintln!(
                "{:>6.1}s src {} pending {} dst {}",
                started.elapsed().as_secs_f64(),
                src.count(State::Incoming).expect("count"),
                src.count(State::Pending).expect("count"),
                dst.count(State::Incoming).expect("count")
            );
        }
    }
    wait_for(&dst, n);
    let rate = n as f64 / started.elapsed().as_secs_f64();
    pair.stop();
    drain(&dst);
    rate
}

/// Messages/s of a local forward A → B, the same messages, one thread.
fn forwarded(dir: &Path, mode: Durability, n: usize) -> f64 {
    let a = open(&dir.join("fwd-a"), mode);
    let b = open_destination(&dir.join("fwd-b"), mode);
    fill(&a, n);
    let started = Instant::now();
    while let Some(m) = a.try_claim().expect("claim") {
        m.forward(&b).expect("forward");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drain(&b);
    rate
}

/// Hop latency: one message at a time, enqueue to claim on the other side.
fn latency(dir: &Path, urls: &str, samples: usize) -> (Duration, Duration) {
    let config = BridgeConfig::new(urls, "latency");
    setup_when_ready(&config);
    let src = open(&dir.join("lat-src"), Durability::None);
    let dst = open_destination(&dir.join("lat-dst"), Durability::None);
    let pair = Pair::start(&src, &dst, &config);
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples + 20 {
        let started = Instant::now();
        src.enqueue(vec![b'l'; SIZE]).expect("enqueue");
        let m = dst
            .claim_timeout(Duration::from_secs(30))
            .expect("claim")
            .expect("a message within 30 s");
        let took = started.elapsed();
        m.commit().expect("commit");
        if i >= 20 {
            times.push(took);
        }
    }
    pair.stop();
    times.sort();
    (times[times.len() / 2], times[times.len() * 99 / 100])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo test --benches` runs this with --bench absent: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if nats_server().is_none() {
        eprintln!("bridge bench: nats-server is not installed; nothing measured");
        return;
    }
    let n: usize = std::env::var("DIRQ_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    // DIRQ_BENCH_DIR: where the queues go (another filesystem than the target's).
    let under = std::env::var_os("DIRQ_BENCH_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from);
    let root = tempfile::Builder::new()
        .prefix("dirq-bench-bridge-")
        .tempdir_in(&under)
        .expect("tempdir");
    println!("bridge pair over loopback, {SIZE}-byte messages, N={n}, median of 3");
    let quick = std::env::var_os("DIRQ_BENCH_QUICK").is_some();
    for (label, mode, count) in [
        ("none", Durability::None, n),
        ("full", Durability::Full, n / 4),
    ] {
        if quick && mode != Durability::None {
            continue;
        }
        let dir = root.path().join(label);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let (servers, urls) = start_servers(&dir, 1);
        let mut bridge = Vec::new();
        let mut local = Vec::new();
        for run in 0..3 {
            bridge.push(bridged(&dir, &urls, &format!("b{run}"), 1, mode, count));
            local.push(forwarded(&dir, mode, count));
        }
        drop(servers);
        let (b, l) = (median(bridge), median(local));
        println!(
            "single node, durability {label}, N={count}: {b:.0} msg/s end to end vs local forward {l:.0} msg/s (x{:.2})",
            b / l
        );
    }
    if std::env::var_os("DIRQ_BENCH_QUICK").is_some() {
        return;
    }
    let dir = root.path().join("cluster");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (servers, urls) = start_servers(&dir, 3);
    let mut bridge = Vec::new();
    for run in 0..3 {
        bridge.push(bridged(
            &dir,
            &urls,
            &format!("r{run}"),
            3,
            Durability::None,
            n,
        ));
    }
    drop(servers);
    println!(
        "3-node cluster, 3 replicas, durability none, N={n}: {:.0} msg/s end to end",
        median(bridge)
    );
    let dir = root.path().join("latency");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (servers, urls) = start_servers(&dir, 1);
    let (p50, p99) = latency(&dir, &urls, 500);
    drop(servers);
    println!(
        "hop latency, single node, one message at a time (500): p50 {:.2} ms, p99 {:.2} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
}
