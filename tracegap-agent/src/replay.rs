//! The agent's pipeline without the kernel: events pushed in as the event
//! loop takes them from the ring, through the same code (assembly,
//! pairing, HTTP/2, classification, metrics, the report, spans). What the
//! bench times and what the allocation test counts (issue 33): figures of
//! the agent as it runs, not of a copy of its steps.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::{
    agent::{AgentConfig, Pipeline},
    events::RawEvent,
    export::SpanQueue,
    gap::span::SyntheticSpan,
    http::{assemble::Message, h2::follow},
    identity::Directory,
    metrics::Metrics,
    report::Report,
    server::Shared,
};

/// Spans the replay holds for its caller at most; past it they are
/// counted as dropped (`queue_full`), as the agent's queue would.
pub const QUEUE: usize = 64 * 1024;

/// A pipeline fed by hand. Standalone (no Kubernetes API, no trace store:
/// `config.kubernetes` and `config.reconcile` are not used).
pub struct Replay {
    pipeline: Pipeline,
    shared: Arc<Shared>,
    spans: mpsc::Receiver<SyntheticSpan>,
    messages: Vec<Message>,
    h2_out: Vec<follow::Out>,
}

impl Replay {
    pub fn new(config: &AgentConfig) -> Self {
        let metrics = Arc::new(Metrics::new());
        let shared = Arc::new(Shared::new(metrics.clone()));
        let directory = Arc::new(Directory::with_identities(config.services.clone()));
        let (queue, spans) = SpanQueue::channel(QUEUE, metrics);
        Self {
            pipeline: Pipeline::new(config, shared.clone(), directory, queue, None),
            shared,
            spans,
            messages: Vec::new(),
            h2_out: Vec::new(),
        }
    }

    /// One event, as the event loop takes it.
    pub fn push(&mut self, e: RawEvent) {
        self.pipeline.event(e, &mut self.messages, &mut self.h2_out);
    }

    /// What the event loop does after each batch: hops held for evidence
    /// whose time has come are settled.
    pub fn batch_done(&mut self) {
        self.pipeline.release_deferred(false);
    }

    /// The periodic work (heads flushed, requests given up on, counters).
    pub fn tick(&mut self) {
        self.pipeline.tick(&mut self.messages, &mut self.h2_out);
    }

    /// Hops held for evidence settled now, as at shutdown.
    pub fn finish(&mut self) {
        self.pipeline.release_deferred(true);
    }

    /// Spans built so far, taken (each handed to `f`).
    pub fn take_spans(&mut self, mut f: impl FnMut(SyntheticSpan)) -> usize {
        let mut n = 0;
        while let Ok(s) = self.spans.try_recv() {
            f(s);
            n += 1;
        }
        n
    }

    /// The per-edge report, as `/report` serves it.
    pub fn report(&self) -> Report {
        self.shared
            .reporter
            .lock()
            .map(|r| r.report())
            .unwrap_or_default()
    }
}
