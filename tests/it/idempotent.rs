//! Idempotent enqueue: `enqueue_with_id` stores a message under a given id once, and
//! tells what it found instead.

use dirq::{Enqueued, MessageId, State};

use crate::util::TestQueue;

#[test]
fn a_second_enqueue_with_the_same_id_stores_nothing() {
    let t = TestQueue::new();
    let id = MessageId::new("order-17").unwrap();
    assert_eq!(
        t.queue.enqueue_with_id(&id, b"first").unwrap(),
        Enqueued::Stored
    );
    assert_eq!(
        t.queue.enqueue_with_id(&id, b"second").unwrap(),
        Enqueued::AlreadyQueued(State::Incoming)
    );
    assert_eq!(t.names(State::Incoming), ["order-17"]);
    assert!(
        t.names(State::Tmp).is_empty(),
        "the refused copy is removed"
    );
    let message = t.queue.try_claim().unwrap().unwrap();
    assert_eq!(message.bytes().unwrap(), b"first");
}
