//! One timer per app connection, re-armed only when it fires early.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::time::Sleep;

/// A deadline that costs a timer-wheel update only when it fires or moves earlier; moving it
/// later (once per request) just stores an `Instant`.
pub(super) struct Deadline {
    sleep: Option<Pin<Box<Sleep>>>,
    at: Instant,
}

impl Deadline {
    pub(super) fn new() -> Deadline {
        Deadline {
            sleep: None,
            at: Instant::now(),
        }
    }

    pub(super) fn set(&mut self, at: Instant) {
        self.at = at;
        if let Some(s) = &mut self.sleep {
            if s.deadline().into_std() > at {
                s.as_mut().reset(at.into());
            }
        }
    }

    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let at = self.at;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at.into())));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if Instant::now() >= self.at {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(self.at.into());
        }
    }
}

/// `fut`, or `Err(())` once `deadline` passes.
pub(super) async fn timed<F: Future>(deadline: &mut Deadline, fut: F) -> Result<F::Output, ()> {
    let mut fut = pin!(fut);
    poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        deadline.poll(cx).map(|()| Err(()))
    })
    .await
}
