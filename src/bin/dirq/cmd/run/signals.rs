//! The supervisor's signals, turned into requests for its loop.

/// What a signal asks of the supervisor.
#[derive(Debug, Clone, Copy)]
pub(super) enum Request {
    /// SIGTERM or SIGINT: stop draining; again: stop at once.
    Stop,
    /// SIGUSR1.
    Statistics,
    /// SIGHUP: read the pipeline file again and apply it.
    Reload,
}

/// The supervisor's signals, read by its main loop.
///
/// IMPORTANT: no thread waits for them. The supervisor stays single-threaded because
/// when it dies, the kernel passes its children to each of its remaining threads in
/// turn and sends the parent-death signal at every step: with a second thread, a stage
/// process would get SIGTERM twice, and the second SIGTERM means "stop at once, abandon
/// running commands" instead of draining.
#[cfg(unix)]
pub(super) struct SignalWatch(signal_hook::iterator::Signals);

#[cfg(unix)]
impl SignalWatch {
    pub(super) fn new() -> Result<SignalWatch, Box<dyn std::error::Error + Send + Sync>> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
        Ok(SignalWatch(signal_hook::iterator::Signals::new([
            SIGTERM, SIGINT, SIGHUP, SIGUSR1,
        ])?))
    }

    /// The requests of the signals received since the last call; never blocks.
    pub(super) fn requests(&mut self) -> Vec<Request> {
        use signal_hook::consts::{SIGHUP, SIGUSR1};
        self.0
            .pending()
            .map(|signal| match signal {
                SIGHUP => Request::Reload,
                SIGUSR1 => Request::Statistics,
                _ => Request::Stop,
            })
            .collect()
    }
}

#[cfg(not(unix))]
pub(super) struct SignalWatch;

#[cfg(not(unix))]
impl SignalWatch {
    pub(super) fn new() -> Result<SignalWatch, Box<dyn std::error::Error + Send + Sync>> {
        Err("dirq run needs Unix signals".into())
    }

    pub(super) fn requests(&mut self) -> Vec<Request> {
        Vec::new()
    }
}
