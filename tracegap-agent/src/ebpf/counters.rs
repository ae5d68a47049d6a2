//! The per-CPU counters the programs keep, summed for people and metrics.

use aya::{Ebpf, maps::PerCpuArray};
use tracegap_common::counter;

use super::Error;

/// Kernel-side counters since the programs were loaded, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub packets: u64,
    pub tcp_payload_segments: u64,
    pub http_requests: u64,
    pub http_responses: u64,
    pub header_continuations: u64,
    pub ringbuf_full: u64,
    pub parse_errors: u64,
    pub header_budget_exhausted: u64,
}

impl Counters {
    /// (name, value) pairs in the order of [`counter::NAMES`].
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> {
        let values = [
            self.packets,
            self.tcp_payload_segments,
            self.http_requests,
            self.http_responses,
            self.header_continuations,
            self.ringbuf_full,
            self.parse_errors,
            self.header_budget_exhausted,
        ];
        counter::NAMES.into_iter().zip(values)
    }
}

pub(super) fn read(ebpf: &Ebpf) -> Result<Counters, Error> {
    let map = ebpf.map("COUNTERS").ok_or(Error::MissingMap("COUNTERS"))?;
    let array = PerCpuArray::<_, u64>::try_from(map).map_err(|source| Error::Map {
        name: "COUNTERS",
        source: Box::new(source),
    })?;
    let sum = |index: u32| -> Result<u64, Error> {
        let values = array.get(&index, 0).map_err(|source| Error::Map {
            name: "COUNTERS",
            source: Box::new(source),
        })?;
        Ok(values.iter().copied().fold(0u64, u64::wrapping_add))
    };
    Ok(Counters {
        packets: sum(counter::PACKETS)?,
        tcp_payload_segments: sum(counter::TCP_PAYLOAD)?,
        http_requests: sum(counter::HTTP_REQUESTS)?,
        http_responses: sum(counter::HTTP_RESPONSES)?,
        header_continuations: sum(counter::CONTINUATIONS)?,
        ringbuf_full: sum(counter::RINGBUF_FULL)?,
        parse_errors: sum(counter::PARSE_ERRORS)?,
        header_budget_exhausted: sum(counter::BUDGET_EXHAUSTED)?,
    })
}
