//! Starting a demo service: the one place that knows every kind of server
//! a [`ServiceSpec`] can ask for (HTTP/1.x with a thread per connection,
//! async HTTP/1.1, gRPC), above each of them.

use std::sync::{Arc, atomic::AtomicBool};

use crate::{
    netns::Pod,
    service::{Runtime, Service, ServiceSpec},
};

impl ServiceSpec {
    /// Starts the service inside `pod`, on a thread of this process.
    pub fn start(self, pod: &Pod) -> anyhow::Result<Service> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let s = stop.clone();
        let thread = pod.spawn(move || {
            self.serve_until(&s, |r| {
                let _ = tx.send(r);
            })
        })?;
        rx.recv()??;
        Ok(Service::new(stop, thread))
    }

    /// Serves in the current thread's network namespace until `stop` is
    /// set; `ready` is told whether listening worked.
    pub fn serve_until(self, stop: &Arc<AtomicBool>, ready: impl FnOnce(std::io::Result<()>)) {
        // Built here: the exporter's sockets and threads are this namespace's.
        let provider = if self.instrumented() {
            self.provider()
        } else {
            None
        };
        if self.grpc {
            crate::grpc::server::serve_until(Arc::new(self), provider, stop, ready);
        } else if matches!(self.runtime, Runtime::Async | Runtime::AsyncHanded) {
            crate::multiplexed::serve_until(self, provider, stop, ready);
        } else {
            self.serve_threads(provider, stop, ready);
        }
    }
}
