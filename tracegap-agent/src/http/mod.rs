//! HTTP/1.x in user space: message heads ([`message`]), trace context in
//! them ([`context`]), and assembling kernel events into messages and
//! exchanges ([`assemble`]).

pub mod assemble;
pub mod context;
pub mod message;
pub mod stream;
