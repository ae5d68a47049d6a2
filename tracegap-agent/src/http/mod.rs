//! HTTP/1.x in user space: message heads ([`message`]), trace context in
//! them ([`context`]), and assembling kernel events into messages and
//! exchanges ([`assemble`]).

pub mod assemble;
pub mod context;
pub mod h2;
pub mod message;
pub mod stream;

/// What the tests of this module share.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::{IpAddr, Ipv4Addr};

    use tracegap_common::{Direction, EventKind};

    use crate::events::{Endpoint, Flow, RawEvent};

    /// An event of `kind` on `flow`, seen at `seq` ns, leaving interface
    /// `ifindex`, with `payload`.
    pub fn event(kind: EventKind, flow: Flow, ifindex: u32, seq: u32, payload: &[u8]) -> RawEvent {
        RawEvent {
            ts_ns: u64::from(seq),
            flow,
            ifindex,
            direction: Direction::Egress,
            kind,
            seq,
            ack: 0,
            short_start: false,
            segment_len: payload.len() as u32,
            budget_exhausted: false,
            payload: payload.to_vec().into(),
            via: None,
        }
    }

    /// A client's flow to a server on port 80.
    pub fn flow() -> Flow {
        Flow {
            src: Endpoint {
                ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                port: 40000,
            },
            dst: Endpoint {
                ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
                port: 80,
            },
        }
    }
}
