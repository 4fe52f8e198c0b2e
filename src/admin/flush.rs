//! Flushing deferred messages: delivering them now instead of at their due time, as
//! Postfix's `postqueue -f` (all) and `postqueue -i` (one) do.

use std::io;

use crate::engine::deferred::deliver;
use crate::error::{Error, Operation, Result};
use crate::format::deferred::parse_deferred_name;
use crate::{DirectoryQueue, MessageId, State};

/// Delivers the deferred message `id` now: it moves from `deferred/` to `incoming/`,
/// where the next claim may take it, whatever its due time. Its attempt count is kept,
/// as when it falls due by itself.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use dirq::{DirectoryQueue, State};
///
/// let dir = tempfile::tempdir()?;
/// let queue = DirectoryQueue::open(dir.path().join("q"))?;
/// let id = queue.enqueue_at(b"tomorrow", SystemTime::now() + Duration::from_secs(86_400))?;
/// assert!(queue.try_claim()?.is_none(), "not due yet");
/// dirq::admin::flush(&queue, &id)?;
/// assert_eq!(queue.try_claim()?.expect("delivered").id(), &id);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// - [`Error::Io`] with kind `NotFound` when `deferred/` has no message with this id
///   (or the queue has no `deferred/`).
/// - [`Error::Duplicate`] when `incoming/` already holds a message with this id; the
///   message stays deferred.
///
/// # Durability
///
/// `Full`: `deferred/` and `incoming/` are synced. `Batch`: at the next
/// [`sync`](DirectoryQueue::sync). `None`: never.
pub fn flush(queue: &DirectoryQueue, id: &MessageId) -> Result<()> {
    let inner = queue.engine();
    let incoming = inner.dir(State::Incoming);
    let not_found = |path| {
        Err(Error::io(
            Operation::Deliver,
            path,
            io::Error::new(io::ErrorKind::NotFound, "no deferred message with this id"),
        ))
    };
    let Some(deferred) = inner.state_dir(State::Deferred) else {
        return not_found(queue.path(State::Deferred).join(id.as_os_str()));
    };
    let Some(name) = inner.find(State::Deferred, id)? else {
        return not_found(deferred.join(id.as_os_str()));
    };
    match deferred
        .dir
        .rename_noreplace(&name, &incoming.dir, id.as_os_str())
    {
        Ok(()) => inner.syncer().changed(&[deferred, incoming]),
        // Fell due and was delivered (or claimed) meanwhile.
        Err(e) if e.kind() == io::ErrorKind::NotFound => not_found(deferred.join(&name)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(Error::Duplicate {
            op: Operation::Deliver,
            path: incoming.join(id.as_os_str()),
            id: id.clone(),
        }),
        Err(e) => Err(Error::moving(
            Operation::Deliver,
            deferred.join(&name),
            incoming.join(id.as_os_str()),
            e,
        )),
    }
}

/// Delivers every deferred message now, with one read of `deferred/`, and returns how
/// many moved. Entries that are not deferred messages are left for
/// [`check`](crate::admin::check) to report; a message whose id `incoming/` already
/// holds stays deferred and is counted in neither.
///
/// # Errors
///
/// [`Error::Io`] when `deferred/` cannot be read or a move fails for another reason
/// than a lost race; the messages moved before it stay moved.
///
/// # Durability
///
/// As [`flush`], once for all the messages moved.
pub fn flush_all(queue: &DirectoryQueue) -> Result<usize> {
    let inner = queue.engine();
    let Some(deferred) = inner.state_dir(State::Deferred) else {
        return Ok(0);
    };
    let incoming = inner.dir(State::Incoming);
    let mut names = Vec::new();
    deferred
        .dir
        .scan(&mut Vec::new(), |entry| {
            names.push(entry.name.to_os_string())
        })
        .map_err(|e| Error::io(Operation::Scan, &deferred.path, e))?;
    let mut moved = 0;
    let mut result = Ok(());
    for name in names {
        let Some((_, id)) = parse_deferred_name(&name) else {
            continue;
        };
        match deliver(deferred, incoming, &name, &id) {
            Ok(true) => moved += 1,
            Ok(false) => {}
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // Sync what moved before reporting an error too: those messages are delivered.
    if moved > 0 {
        inner.syncer().changed(&[deferred, incoming])?;
    }
    result.map(|()| moved)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    #[test]
    fn flush_delivers_one_or_all_and_reports_unknown_ids() {
        let dir = tempfile::tempdir().unwrap();
        let queue = DirectoryQueue::open(dir.path().join("q")).unwrap();
        let a = queue.enqueue_at(b"a", later()).unwrap();
        let b = queue.enqueue_at(b"b", later()).unwrap();
        let c = queue.enqueue_at(b"c", later()).unwrap();
        flush(&queue, &b).unwrap();
        assert_eq!(queue.count(State::Incoming).unwrap(), 1);
        let err = flush(&queue, &b).unwrap_err();
        assert_eq!(
            err.io_error().map(io::Error::kind),
            Some(io::ErrorKind::NotFound)
        );
        assert!(err.to_string().contains("deliver deferred"), "{err}");
        assert_eq!(flush_all(&queue).unwrap(), 2);
        assert_eq!(queue.count(State::Deferred).unwrap(), 0);
        let mut ids: Vec<MessageId> = queue
            .ids(State::Incoming)
            .unwrap()
            .map(|id| id.unwrap())
            .collect();
        ids.sort();
        let mut expected = vec![a, b, c];
        expected.sort();
        assert_eq!(ids, expected);
        assert_eq!(flush_all(&queue).unwrap(), 0);
    }

    #[test]
    fn flush_keeps_a_message_whose_id_is_already_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let queue = DirectoryQueue::open(dir.path().join("q")).unwrap();
        let id = queue.enqueue_at(b"deferred", later()).unwrap();
        // Planted: enqueue_with_id would find the id in deferred/ and store nothing.
        std::fs::write(queue.path(State::Incoming).join(id.as_os_str()), b"waiting").unwrap();
        assert!(matches!(flush(&queue, &id), Err(Error::Duplicate { .. })));
        assert_eq!(flush_all(&queue).unwrap(), 0);
        assert_eq!(queue.count(State::Deferred).unwrap(), 1);
    }
}
