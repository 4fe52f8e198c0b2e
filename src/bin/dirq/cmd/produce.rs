//! Putting messages in and taking them out: init, push, take, cat.

use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use dirq::{DirectoryQueue, Message, MessageId};

use crate::output::{context, quiet_broken_pipe, stdout_error, unless_broken_pipe, CliResult};

/// Creates each queue; with `mode`, also sets it on the root, state directories,
/// `seen/` and its buckets of a queue that existed (created ones get it from the
/// builder).
/// With `seen_ttl`, stores how long each queue remembers finished ids.
pub(crate) fn init(queues: &[PathBuf], mode: Option<u32>, seen_ttl: Option<Duration>) -> CliResult {
    for queue in queues {
        let mut builder = DirectoryQueue::builder(queue);
        if let Some(mode) = mode {
            builder.dir_mode(mode);
        }
        if let Some(ttl) = seen_ttl {
            builder.remember_finished(ttl);
        }
        let queue = builder.open()?;
        if let Some(mode) = mode {
            set_dir_modes(&queue, mode)?;
        }
    }
    Ok(())
}

#[cfg(unix)]
fn set_dir_modes(queue: &DirectoryQueue, mode: u32) -> CliResult {
    use std::os::unix::fs::PermissionsExt;
    let states = dirq::State::ALL
        .iter()
        .map(|&state| queue.path(state).to_path_buf());
    // seen/ (not a state) and its buckets: every user of the queue writes records
    // and lock files there.
    let seen = queue.root().join("seen");
    let buckets = std::fs::read_dir(&seen)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| entry.path());
    let dirs = std::iter::once(queue.root().to_path_buf())
        .chain(states)
        .chain(std::iter::once(seen.clone()))
        .chain(buckets);
    for dir in dirs {
        match std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)) {
            // An optional state directory (hold/, deferred/) this queue does not have.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            result => result.map_err(context(format!(
                "failed to set mode {mode:o} on {}",
                dir.display()
            )))?,
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn set_dir_modes(_queue: &DirectoryQueue, _mode: u32) -> CliResult {
    Ok(())
}

/// Enqueues each file (standard input for `-` or none); with `not_before`, for
/// delivery then, through `deferred/`.
/// Where `dirq push` puts its messages.
pub(crate) enum Placement {
    /// `incoming/`.
    Now,
    /// `deferred/`, until then (`--at`, `--delay`).
    At(SystemTime),
    /// A group's member (`--group`, `--ordered`).
    Group(dirq::queue::Group),
}

pub(crate) fn push(queue: &DirectoryQueue, files: &[OsString], placement: &Placement) -> CliResult {
    let stdin_only = [OsString::from("-")];
    let files = if files.is_empty() {
        &stdin_only[..]
    } else {
        files
    };
    let mut out = io::stdout().lock();
    for file in files {
        let id = if file == OsStr::new("-") {
            enqueue_input(queue, io::stdin().lock(), placement, "standard input")?
        } else {
            let path = Path::new(file);
            let input = std::fs::File::open(path).map_err(context(format!(
                "failed to open input file {}",
                path.display()
            )))?;
            let what = format!("input file {}", path.display());
            enqueue_input(queue, input, placement, &what)?
        };
        writeln!(out, "{id}")
            .or_else(unless_broken_pipe)
            .map_err(stdout_error)?;
    }
    Ok(())
}

/// Enqueues the one input (a file, or standard input for `-` or none) under `id`
/// unless the queue has the id; prints the id when it stored the message, and says on
/// standard error where the id already is otherwise.
pub(crate) fn push_with_id(
    queue: &DirectoryQueue,
    files: &[OsString],
    id: &MessageId,
) -> CliResult {
    let enqueued = match files {
        [] => enqueue_with_id(queue, io::stdin().lock(), id, "standard input")?,
        [file] if file == OsStr::new("-") => {
            enqueue_with_id(queue, io::stdin().lock(), id, "standard input")?
        }
        [file] => {
            let path = Path::new(file);
            let input = std::fs::File::open(path).map_err(context(format!(
                "failed to open input file {}",
                path.display()
            )))?;
            enqueue_with_id(queue, input, id, &format!("input file {}", path.display()))?
        }
        _ => return Err("--id takes exactly one input: one id names one message".into()),
    };
    let root = queue.root().display();
    match enqueued {
        dirq::Enqueued::Stored => writeln!(io::stdout().lock(), "{id}")
            .or_else(unless_broken_pipe)
            .map_err(stdout_error)?,
        dirq::Enqueued::AlreadyQueued(state) => {
            eprintln!("dirq: {root}: {id} is already in {state}/; nothing enqueued");
        }
        _ => eprintln!("dirq: {root}: {id} was already processed (seen/); nothing enqueued"),
    }
    Ok(())
}

fn enqueue_with_id(
    queue: &DirectoryQueue,
    input: impl Read,
    id: &MessageId,
    what: &str,
) -> Result<dirq::Enqueued, Box<dyn std::error::Error + Send + Sync>> {
    let mut input = Input {
        inner: input,
        failed: None,
    };
    match queue.enqueue_reader_with_id(id, &mut input) {
        Ok(enqueued) => {
            if !enqueued.is_stored() {
                // Answered before the input was read: read it anyway, so that a
                // producer piping into us is not killed by SIGPIPE.
                let _ = io::copy(&mut input.inner, &mut io::sink());
            }
            Ok(enqueued)
        }
        Err(e) => match input.failed {
            Some(cause) => Err(Box::new(context(format!(
                "failed to read {what}; nothing was enqueued"
            ))(cause))),
            None => Err(Box::new(e)),
        },
    }
}

/// Enqueues what `input` holds. When reading `input` fails (a directory, an I/O error),
/// the error names `what` was being read: the library's error names the queue's
/// temporary file, which the operator never gave.
fn enqueue_input(
    queue: &DirectoryQueue,
    input: impl Read,
    placement: &Placement,
    what: &str,
) -> Result<MessageId, Box<dyn std::error::Error + Send + Sync>> {
    let mut input = Input {
        inner: input,
        failed: None,
    };
    let enqueued = match placement {
        Placement::Now => queue.enqueue_reader(&mut input),
        Placement::At(at) => queue.enqueue_reader_at(&mut input, *at),
        Placement::Group(group) => queue.enqueue_reader_in_group(group, &mut input),
    };
    match enqueued {
        Ok(id) => Ok(id),
        Err(e) => match input.failed {
            Some(cause) => Err(Box::new(context(format!(
                "failed to read {what}; nothing was enqueued"
            ))(cause))),
            None => Err(Box::new(e)),
        },
    }
}

/// A reader that keeps its first error, so that the input, not the queue, is named.
struct Input<R> {
    inner: R,
    failed: Option<io::Error>,
}

impl<R: Read> Read for Input<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            let kind = e.kind();
            if kind == io::ErrorKind::Interrupted {
                return e;
            }
            self.failed.get_or_insert(e);
            io::Error::new(kind, "the input could not be read")
        })
    }
}

pub(crate) fn take(
    queue: &DirectoryQueue,
    next: Option<&DirectoryQueue>,
    count: u64,
    wait: Option<Duration>,
    separator: u8,
) -> CliResult {
    // Forwarding a message into its own queue puts it back where the next claim
    // finds it again: `take q --to q -n 5` would move one message five times. The
    // handles are compared by directory identity, so `q/.` or a symlink is caught too.
    if let Some(next) = next.filter(|next| next.same_queue(queue)) {
        return Err(format!(
            "failed to take from {}: --to {} is the same queue",
            queue.root().display(),
            next.root().display()
        )
        .into());
    }
    let mut out = io::stdout().lock();
    let mut taken = 0;
    while taken < count {
        let claimed = match (taken, wait) {
            (0, Some(wait)) => queue.claim_timeout(wait)?,
            _ => queue.try_claim()?,
        };
        let Some(message) = claimed else { break };
        match next {
            Some(next) => {
                let id = message.id().clone();
                message.forward(next)?;
                writeln!(out, "{id}")
                    .or_else(unless_broken_pipe)
                    .map_err(stdout_error)?;
            }
            None => print_then_commit(message, &mut out, separator)?,
        }
        taken += 1;
    }
    Ok(())
}

/// Writes the message and its separator, and commits it only once they are out; a
/// message that could not be written goes back to `incoming/`.
fn print_then_commit(message: Message, out: &mut impl Write, separator: u8) -> CliResult {
    let written = io::copy(&mut message.reader(), out)
        .and_then(|_| out.write_all(&[separator]))
        .and_then(|()| out.flush());
    if let Err(e) = written {
        let id = message.id().clone();
        if let Err(release) = message.release() {
            tracing::warn!(%id, error = %release, "cannot release message");
        }
        return Err(Box::new(context(format!(
            "failed to write message {id} to standard output; it was put back"
        ))(e)));
    }
    message.commit()?;
    Ok(())
}

pub(crate) fn cat(queue: &DirectoryQueue, id: &OsStr) -> CliResult {
    let id = MessageId::new(id)?;
    let (_, bytes) = dirq::admin::peek(queue, &id)?;
    let mut out = io::stdout().lock();
    quiet_broken_pipe(out.write_all(&bytes).and_then(|()| out.flush())).map_err(stdout_error)?;
    Ok(())
}
