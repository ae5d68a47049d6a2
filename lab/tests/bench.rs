//! The benchmark's generated stream goes through the real pipeline: half
//! the requests carry context (context_ok), half do not (a span each).
//! Figures are the bench's business; this checks the stream is what the
//! bench says it is.

#[test]
fn the_generated_stream_is_classified_as_the_bench_assumes() {
    let spans = tracegap_lab::bench::pipeline(tracegap_lab::bench::events(1000).collect());
    assert_eq!(spans, 500);
    assert!(tracegap_lab::bench::hold_flows(1000) > 0);
}

/// The kernel bench's crafted packets do what its table says they do:
/// requests and responses copied, the second sighting skipped, nothing
/// dropped or unparsable. Timing is the bench's business.
#[test]
fn the_kernel_bench_packets_take_the_paths_it_names() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED the_kernel_bench_packets_take_the_paths_it_names: needs root");
        return Ok(());
    }
    let c = tracegap_lab::bench::kernel::check_cases()?;
    // As many runs of each of six packets: a GET and a POST leaving a
    // pod, a response, the GET entering a pod (a request, not copied), a
    // bulk segment and a bare ACK (no payload); and the smaller batch of
    // the HTTP/2 HEADERS whose side is unknown (left alone, not an HTTP/1
    // request, not an HTTP/2 segment read).
    let runs = c.http_responses;
    let logging = u64::from(tracegap_lab::bench::kernel::LOGGING_BATCH);
    assert!(runs > 0, "{c:?}");
    assert_eq!(c.packets, 6 * runs + logging, "{c:?}");
    assert_eq!(c.tcp_payload_segments, 5 * runs + logging, "{c:?}");
    assert_eq!(c.http_requests, 3 * runs, "{c:?}");
    assert_eq!(c.second_sightings_skipped, runs + logging, "{c:?}");
    assert_eq!(c.h2_segments, 0, "{c:?}");
    Ok(())
}

/// Replayed as ring-buffer records, the stream gives the same spans: the
/// records are what the kernel writes and decode back to the events.
#[test]
fn the_stream_replayed_as_records_is_classified_alike() {
    let records = tracegap_lab::bench::records(1000);
    assert_eq!(records.len(), 2000);
    assert_eq!(tracegap_lab::bench::pipeline_records(&records), 500);
}
