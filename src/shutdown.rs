//! The one shutdown path of the daemons.
//!
//! A single task listens for SIGINT and SIGTERM and flips a `watch` channel;
//! every long wait sits in a `select!` with [`Shutdown::wait`]. Work in flight
//! is not cancelled by the signal itself: each loop decides where its safe
//! checkpoint is (the worker finishes the message batch it holds and saves its
//! checkpoint), and the daemon waits for its tasks to complete before exiting.

use tokio::sync::watch;

/// A cloneable view of "has shutdown been asked for?".
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending side: whoever holds it may start the shutdown.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

/// A new, not yet triggered pair.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

impl Shutdown {
    /// A token that never fires, for one-shot commands.
    pub fn never() -> Shutdown {
        let (trigger, shutdown) = channel();
        // Keep the sender alive forever so `wait` never completes.
        std::mem::forget(trigger);
        shutdown
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes once shutdown has been asked for.
    pub async fn wait(&mut self) {
        // An error means every Trigger is gone: nobody can ask any more, so
        // treat it as "asked" rather than hanging.
        let _ = self.rx.wait_for(|v| *v).await;
    }
}

/// Listen for SIGINT/SIGTERM in the background; the first one triggers.
/// The handlers are installed before this returns, so a signal sent once
/// the pid file exists (written after this) is never the default "die".
pub fn on_signals() -> Shutdown {
    use tokio::signal::unix::{signal, SignalKind};
    let (trigger, shutdown) = channel();
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    tokio::spawn(async move {
        let name = match (term, int) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            },
            (Ok(mut term), Err(_)) => {
                term.recv().await;
                "SIGTERM"
            }
            (Err(_), _) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        };
        tracing::info!(signal = name, "shutdown requested");
        trigger.trigger();
    });
    shutdown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn trigger_reaches_every_clone() {
        let (t, s) = channel();
        let mut a = s.clone();
        let mut b = s;
        assert!(!a.is_triggered());
        t.trigger();
        a.wait().await;
        b.wait().await;
        assert!(b.is_triggered());
    }
}
