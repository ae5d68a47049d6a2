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
    /// Messages entering a pod not copied again: they were copied leaving
    /// a local pod.
    pub second_sightings_skipped: u64,
    /// Message starts shorter than 8 bytes, followed until complete.
    pub short_starts: u64,
    /// HTTP/2 connection prefaces: connections followed from their start.
    pub h2_prefaces: u64,
    /// Segments of followed HTTP/2 connections with frames copied.
    pub h2_segments: u64,
    /// Followed HTTP/2 connections the kernel lost track of.
    pub h2_lost: u64,
    /// HTTP/2 connections followed from the middle (their preface unseen).
    pub h2_joins: u64,
    /// HTTP/2 server sides read from their second write: the server's
    /// preface crossed the client's and went by first.
    pub h2_server_preface_missed: u64,
    /// Thread turns sent: a request's first send by its client's thread or
    /// first receive by its server's.
    pub thread_turns: u64,
    /// Diagnostics logged (`--kernel-log debug`).
    pub diagnostics_logged: u64,
    /// TLS ClientHellos seen (on each veth they cross): encrypted
    /// connections' first segments.
    pub tls_hellos: u64,
    /// Plaintext chunks OpenSSL's calls returned, sent as events.
    pub tls_plaintext_chunks: u64,
    /// OpenSSL calls whose connection no socket operation had named.
    pub tls_unnamed_calls: u64,
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
            self.second_sightings_skipped,
            self.short_starts,
            self.h2_prefaces,
            self.h2_segments,
            self.h2_lost,
            self.h2_joins,
            self.h2_server_preface_missed,
            self.thread_turns,
            self.diagnostics_logged,
            self.tls_hellos,
            self.tls_plaintext_chunks,
            self.tls_unnamed_calls,
        ];
        counter::NAMES.into_iter().zip(values)
    }
}

pub(super) fn read(ebpf: &Ebpf) -> Result<Counters, Error> {
    let map = ebpf.map("COUNTERS").ok_or(Error::MissingMap("COUNTERS"))?;
    let map_error = |source| Error::Map {
        name: "COUNTERS",
        source: Box::new(source),
    };
    let array =
        PerCpuArray::<_, [u64; counter::COUNT as usize]>::try_from(map).map_err(map_error)?;
    let mut sums = [0u64; counter::COUNT as usize];
    for cpu in array.get(&0, 0).map_err(map_error)?.iter() {
        for (sum, v) in sums.iter_mut().zip(cpu) {
            *sum = sum.wrapping_add(*v);
        }
    }
    let sum = |index: u32| sums[index as usize];
    Ok(Counters {
        packets: sum(counter::PACKETS),
        tcp_payload_segments: sum(counter::TCP_PAYLOAD),
        http_requests: sum(counter::HTTP_REQUESTS),
        http_responses: sum(counter::HTTP_RESPONSES),
        header_continuations: sum(counter::CONTINUATIONS),
        ringbuf_full: sum(counter::RINGBUF_FULL),
        parse_errors: sum(counter::PARSE_ERRORS),
        header_budget_exhausted: sum(counter::BUDGET_EXHAUSTED),
        second_sightings_skipped: sum(counter::SECOND_SIGHTINGS),
        short_starts: sum(counter::SHORT_STARTS),
        h2_prefaces: sum(counter::H2_PREFACES),
        h2_segments: sum(counter::H2_SEGMENTS),
        h2_lost: sum(counter::H2_LOST),
        h2_joins: sum(counter::H2_JOINS),
        h2_server_preface_missed: sum(counter::H2_SERVER_PREFACE_MISSED),
        thread_turns: sum(counter::THREAD_TURNS),
        diagnostics_logged: sum(counter::DIAGNOSTICS),
        tls_hellos: sum(counter::TLS_HELLOS),
        tls_plaintext_chunks: sum(counter::TLS_PLAINTEXT),
        tls_unnamed_calls: sum(counter::TLS_UNNAMED),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_counter_has_a_field() {
        // A counter added to the kernel but not here would be silently cut
        // off by the zip in `iter` (short_starts once was).
        assert_eq!(Counters::default().iter().count(), counter::COUNT as usize);
    }
}
