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

    use crate::events::{Endpoint, Flow};

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
