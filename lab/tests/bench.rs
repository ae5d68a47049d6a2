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
