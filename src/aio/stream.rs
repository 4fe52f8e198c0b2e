//! [`Messages`]: claimed messages as a `Stream`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::{AsyncMessage, AsyncQueue};
use crate::error::Result;

type Claim = Pin<Box<dyn Future<Output = Result<AsyncMessage>> + Send>>;

/// The messages of an [`AsyncQueue`], each claimed as [`AsyncQueue::claim`] does; see
/// [`AsyncQueue::messages`]. Implements [`futures_core::Stream`].
///
/// A message is claimed only while the stream is polled; dropping the stream drops
/// the claim under way, which is cancel-safe.
#[must_use = "a stream claims nothing unless polled"]
pub struct Messages {
    queue: AsyncQueue,
    claim: Option<Claim>,
}

impl Messages {
    pub(super) fn new(queue: AsyncQueue) -> Messages {
        Messages { queue, claim: None }
    }
}

impl futures_core::Stream for Messages {
    type Item = Result<AsyncMessage>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let claim = this.claim.get_or_insert_with(|| {
            let queue = this.queue.clone();
            Box::pin(async move { queue.claim().await })
        });
        match claim.as_mut().poll(cx) {
            Poll::Ready(item) => {
                this.claim = None;
                Poll::Ready(Some(item))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl fmt::Debug for Messages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Messages")
            .field("queue", &self.queue)
            .field("claiming", &self.claim.is_some())
            .finish()
    }
}
