//! `dirq serve` under load: many concurrent submitters, retried submits and idle
//! connections, checked for exactly-once storage. (Latency is measured by
//! `benches/serve.rs`, not here.)

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use dirq::{DirectoryQueue, State};

use crate::serve::{client, library_server, TOKEN};
use crate::util::tempdir;

const CLIENTS: usize = 200;
const PER_CLIENT: usize = 100;
const IDLE: usize = 500;

/// Opens a connection, makes one request on it and leaves it open and idle.
fn idle_connection(addr: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect an idle connection");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request on the idle connection");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    // The answer ends with the JSON body's closing brace.
    while !answer.ends_with(b"}") {
        stream.read_exact(&mut byte).expect("the answer");
        answer.push(byte[0]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    stream
}

#[test]
fn concurrent_submits_are_stored_exactly_once_beside_idle_connections() {
    let dir = tempdir();
    let queue = DirectoryQueue::open(dir.path().join("load")).expect("queue");
    // The library's server, for a header timeout longer than the test (by default an
    // idle connection is closed after 10 s), and without fsync: this test is about what
    // is acknowledged and stored; the benchmark measures the full mode.
    let (_runtime, addr, _stop) = library_server(dir.path(), |config| {
        config
            .header_timeout(Duration::from_secs(600))
            .durability(dirq::Durability::None);
    });
    let addr = addr.to_string();
    let mut idle: Vec<TcpStream> = (0..IDLE).map(|_| idle_connection(&addr)).collect();

    let url = format!("http://{addr}/api/v1/queues/load/messages");
    let acknowledged: Vec<Vec<(String, String)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let url = &url;
                scope.spawn(move || {
                    let agent = client();
                    let mut acked = Vec::new();
                    for m in 0..PER_CLIENT {
                        let body = format!("client {c} message {m}");
                        // Every tenth submit carries a key and is sent twice, as a
                        // client retrying after a lost answer would.
                        let key = (m % 10 == 0).then(|| format!("key-{c}-{m}"));
                        let tries = if key.is_some() { 2 } else { 1 };
                        let mut ids = Vec::new();
                        for _ in 0..tries {
                            let mut request = agent
                                .post(url)
                                .header("Authorization", format!("Bearer {TOKEN}"));
                            if let Some(key) = &key {
                                request = request.header("Idempotency-Key", key);
                            }
                            let mut response = request.send(body.as_bytes()).expect("POST");
                            let status = response.status().as_u16();
                            let text = response.body_mut().read_to_string().expect("answer");
                            assert!(status == 201 || status == 200, "{status}: {text}");
                            let json: serde_json::Value =
                                serde_json::from_str(&text).expect("JSON");
                            ids.push(json["id"].as_str().expect("an id").to_owned());
                        }
                        assert!(
                            ids.windows(2).all(|w| w[0] == w[1]),
                            "a retry got another id: {ids:?}"
                        );
                        acked.push((ids.remove(0), body));
                    }
                    acked
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a client thread"))
            .collect()
    });

    let acknowledged: Vec<(String, String)> = acknowledged.into_iter().flatten().collect();
    assert_eq!(acknowledged.len(), CLIENTS * PER_CLIENT);
    let acked_ids: HashSet<&str> = acknowledged.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        acked_ids.len(),
        CLIENTS * PER_CLIENT,
        "every submit got its own id"
    );
    let stored: Vec<String> = queue
        .ids(State::Incoming)
        .expect("ids")
        .map(|id| id.expect("an id").to_string())
        .collect();
    assert_eq!(
        stored.len(),
        CLIENTS * PER_CLIENT,
        "no duplicates, nothing missing"
    );
    let stored: HashSet<&str> = stored.iter().map(String::as_str).collect();
    assert_eq!(
        stored, acked_ids,
        "exactly the acknowledged ids are in the queue"
    );
    // Each keyed message holds its own body.
    for (id, body) in acknowledged.iter().filter(|(id, _)| id.starts_with("key-")) {
        let bytes = std::fs::read(queue.path(State::Incoming).join(id)).expect("read a message");
        assert_eq!(bytes, body.as_bytes());
    }
    assert_eq!(queue.count(State::Tmp).expect("count"), 0);
    // The idle connections were held open all along, and still answer.
    for stream in &mut idle {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("a request on an idle connection");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).expect("the answer");
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    }
}
