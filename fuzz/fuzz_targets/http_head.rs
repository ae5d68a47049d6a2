//! Any bytes the kernel copies must give a head or an error, never a panic,
//! and whatever parses must give a context reading without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracegap_agent::http::{context::Propagation, message::parse_head};

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = parse_head(data) {
        assert!(head.len <= data.len());
        let _ = Propagation::from_head(&head);
    }
});
