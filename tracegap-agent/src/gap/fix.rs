//! What would close a gap, from what the wire showed: the HTTP client a
//! caller used (its `User-Agent`), the server a callee runs (its `Server`
//! header), the formats on both sides. A table maps them to the
//! OpenTelemetry instrumentation that covers them; what is not in it is
//! said as unknown, with what was seen.

use super::classify::GapKind;
use crate::http::context::Format;

/// Product tokens of `User-Agent` (lowercased prefix) and what instruments
/// that client.
const CLIENTS: &[(&str, &str, &str)] = &[
    (
        "python-requests",
        "Python requests",
        "opentelemetry-instrumentation-requests (or run the service under opentelemetry-instrument)",
    ),
    (
        "python-urllib3",
        "Python urllib3",
        "opentelemetry-instrumentation-urllib3 (or opentelemetry-instrument)",
    ),
    (
        "python-urllib",
        "Python urllib",
        "opentelemetry-instrumentation-urllib (or opentelemetry-instrument)",
    ),
    (
        "python-httpx",
        "Python httpx",
        "opentelemetry-instrumentation-httpx (or opentelemetry-instrument)",
    ),
    (
        "python/",
        "Python aiohttp",
        "opentelemetry-instrumentation-aiohttp-client (or opentelemetry-instrument)",
    ),
    (
        "grpc-python",
        "gRPC Python",
        "opentelemetry-instrumentation-grpc (or opentelemetry-instrument)",
    ),
    (
        "go-http-client",
        "Go net/http",
        "otelhttp: wrap the client's Transport with otelhttp.NewTransport (go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp)",
    ),
    (
        "grpc-go",
        "gRPC Go",
        "otelgrpc: grpc.WithStatsHandler(otelgrpc.NewClientHandler())",
    ),
    (
        "okhttp",
        "OkHttp",
        "the OpenTelemetry Java agent, or the library instrumentation opentelemetry-okhttp-3.0",
    ),
    (
        "apache-httpclient",
        "Apache HttpClient",
        "the OpenTelemetry Java agent, or opentelemetry-apache-httpclient-5.2",
    ),
    (
        "java-http-client",
        "Java's HttpClient",
        "the OpenTelemetry Java agent, or opentelemetry-java-http-client",
    ),
    (
        "java/",
        "Java's HttpURLConnection",
        "the OpenTelemetry Java agent",
    ),
    (
        "reactor-netty",
        "Reactor Netty",
        "the OpenTelemetry Java agent",
    ),
    (
        "grpc-java",
        "gRPC Java",
        "the OpenTelemetry Java agent, or opentelemetry-grpc-1.6",
    ),
    (
        "axios",
        "axios (Node.js http)",
        "@opentelemetry/instrumentation-http (or @opentelemetry/auto-instrumentations-node)",
    ),
    (
        "node-fetch",
        "node-fetch (Node.js http)",
        "@opentelemetry/instrumentation-http (or @opentelemetry/auto-instrumentations-node)",
    ),
    (
        "node",
        "Node.js fetch (undici)",
        "@opentelemetry/instrumentation-undici (or @opentelemetry/auto-instrumentations-node)",
    ),
    (
        "undici",
        "Node.js fetch (undici)",
        "@opentelemetry/instrumentation-undici (or @opentelemetry/auto-instrumentations-node)",
    ),
    (
        "grpc-node",
        "gRPC Node.js",
        "@opentelemetry/instrumentation-grpc",
    ),
    (
        "ruby",
        "Ruby Net::HTTP",
        "opentelemetry-instrumentation-net_http (or opentelemetry-instrumentation-all)",
    ),
    (
        "faraday",
        "Ruby Faraday",
        "opentelemetry-instrumentation-faraday",
    ),
    (
        "guzzlehttp",
        "PHP Guzzle",
        "open-telemetry/opentelemetry-auto-guzzle",
    ),
    (
        "reqwest",
        "Rust reqwest",
        "reqwest-tracing with tracing-opentelemetry, or inject the context with opentelemetry-http",
    ),
    (
        "curl",
        "curl",
        "none: a script's curl passes a context on with -H \"traceparent: ...\"",
    ),
    (
        "wget",
        "wget",
        "none: a script's wget passes a context on with --header",
    ),
];

/// `Server` header prefixes (lowercased) and what instruments that server.
const SERVERS: &[(&str, &str, &str)] = &[
    (
        "nginx",
        "nginx",
        "nginx's OpenTelemetry module (ngx_otel_module)",
    ),
    (
        "openresty",
        "OpenResty",
        "nginx's OpenTelemetry module (ngx_otel_module)",
    ),
    (
        "apache-coyote",
        "Tomcat (Java)",
        "the OpenTelemetry Java agent (-javaagent:opentelemetry-javaagent.jar)",
    ),
    (
        "apache",
        "Apache httpd",
        "opentelemetry-cpp-contrib's httpd module (mod_otel)",
    ),
    (
        "istio-envoy",
        "Istio's Envoy",
        "Istio's tracing with the OpenTelemetry provider",
    ),
    (
        "envoy",
        "Envoy",
        "Envoy's tracing with its OpenTelemetry tracer",
    ),
    (
        "gunicorn",
        "gunicorn (Python)",
        "opentelemetry-instrument (zero-code Python) with opentelemetry-distro",
    ),
    (
        "uvicorn",
        "uvicorn (Python)",
        "opentelemetry-instrument (zero-code Python) with opentelemetry-distro",
    ),
    (
        "hypercorn",
        "hypercorn (Python)",
        "opentelemetry-instrument (zero-code Python) with opentelemetry-distro",
    ),
    (
        "werkzeug",
        "Werkzeug/Flask (Python)",
        "opentelemetry-instrument (zero-code Python) with opentelemetry-distro",
    ),
    (
        "basehttp",
        "Python http.server",
        "opentelemetry-instrument (zero-code Python) with opentelemetry-distro",
    ),
    (
        "tornadoserver",
        "Tornado (Python)",
        "opentelemetry-instrument (zero-code Python) with opentelemetry-distro",
    ),
    (
        "jetty",
        "Jetty (Java)",
        "the OpenTelemetry Java agent (-javaagent:opentelemetry-javaagent.jar)",
    ),
    (
        "kestrel",
        "Kestrel (.NET)",
        "OpenTelemetry .NET automatic instrumentation",
    ),
    (
        "microsoft-iis",
        "IIS (.NET)",
        "OpenTelemetry .NET automatic instrumentation",
    ),
    ("caddy", "Caddy", "Caddy's tracing directive"),
    ("traefik", "Traefik", "Traefik's OpenTelemetry tracing"),
    ("haproxy", "HAProxy", "HAProxy's OpenTelemetry filter"),
];

/// The first product token of a header, lowercased.
fn product(header: &str) -> String {
    header
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

fn lookup<'a>(
    table: &'a [(&str, &str, &str)],
    header: &str,
) -> Option<&'a (&'a str, &'a str, &'a str)> {
    let p = product(header);
    table.iter().find(|(prefix, _, _)| p.starts_with(prefix))
}

/// The client a `User-Agent` names, and what instruments it.
pub fn client(user_agent: Option<&str>) -> String {
    match user_agent {
        Some(ua) => match lookup(CLIENTS, ua) {
            Some((_, name, how)) => format!(
                "its HTTP client is {name} (User-Agent {}): {how}",
                product(ua)
            ),
            None => format!("unknown client (User-Agent {})", product(ua)),
        },
        None => "unknown client (no User-Agent)".to_owned(),
    }
}

/// The OpenTelemetry propagator (`OTEL_PROPAGATORS`) that reads a format.
pub fn propagator(f: Format) -> &'static str {
    match f {
        Format::W3c => "tracecontext",
        Format::Jaeger => "jaeger",
        Format::B3Multi => "b3multi",
        Format::B3Single => "b3",
        Format::Datadog => "datadog (dd-trace: DD_TRACE_PROPAGATION_STYLE)",
        Format::Xray => "xray",
        Format::CloudTrace => "gcp (opentelemetry-propagator-gcp)",
        Format::OtTracer => "ottrace",
        Format::GrpcTraceBin => "OpenCensus binary (grpc-trace-bin)",
        Format::Sw8 => "none: OpenTelemetry has no SkyWalking (sw8) propagator",
    }
}

/// What would close a gap of `kind`: `user_agent` the caller's, `server`
/// the callee's `Server` header, `sent` the formats the caller sent,
/// `received` the format of the request the caller was serving, if known.
pub fn fix(
    kind: GapKind,
    user_agent: Option<&str>,
    server: Option<&str>,
    sent: &[Format],
    received: Option<Format>,
) -> Option<String> {
    Some(match kind {
        GapKind::BrokenPropagation => format!(
            "the caller received a context and called without it: instrument its outbound client; {}",
            client(user_agent)
        ),
        GapKind::MissingContext => format!(
            "the caller sends no context: instrument it, or its client; {}",
            client(user_agent)
        ),
        GapKind::FormatMismatch => match (received, sent) {
            // Nothing on the OpenTelemetry side reads it: no propagator to
            // add, the caller has to speak W3C too.
            (_, [Format::Sw8]) => "the caller sends only SkyWalking sw8, whose ids convert to no W3C trace and which no OpenTelemetry propagator reads: move the caller to OpenTelemetry, or make it send W3C tracecontext beside sw8".to_owned(),
            // The caller read none of what it received, and started a
            // trace of its own in another format.
            (Some(r), [s, ..]) if r != *s => format!(
                "the caller received a {} context and sent a new {} trace: it does not read {}; add it to the caller's propagators (OTEL_PROPAGATORS=tracecontext,baggage,{}), or make its caller send W3C tracecontext",
                r.as_str(),
                s.as_str(),
                r.as_str(),
                propagator(r)
            ),
            // Two formats in one request naming different traces.
            (_, [a, b, ..]) => format!(
                "the request carries {} and {} contexts naming different traces: the caller's propagators inject from different contexts; keep one propagator, or inject all from the same span",
                a.as_str(),
                b.as_str()
            ),
            // One format, which the callee was seen not to read.
            (None, [s]) => format!(
                "the callee does not read {}: add it to the callee's propagators (OTEL_PROPAGATORS=tracecontext,baggage,{}), or make the caller send W3C tracecontext too",
                s.as_str(),
                propagator(*s)
            ),
            _ => "the caller's context formats disagree: keep one propagator (OTEL_PROPAGATORS)"
                .to_owned(),
        },
        GapKind::Uninstrumented | GapKind::Passthrough => match server {
            Some(s) => match lookup(SERVERS, s) {
                Some((_, name, how)) => format!("the callee runs {name} (Server {}): {how}", product(s)),
                None => format!("instrument the callee: unknown server (Server {})", product(s)),
            },
            None => "instrument the callee: unknown server (no Server header)".to_owned(),
        },
        GapKind::MalformedContext => {
            "the caller's propagator writes an invalid header (the detail says which field): update its OpenTelemetry SDK or propagator".to_owned()
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fix_names_the_client_the_server_and_the_propagator() {
        let broken = fix(
            GapKind::BrokenPropagation,
            Some("python-requests/2.31.0"),
            None,
            &[],
            None,
        )
        .unwrap();
        assert!(
            broken.contains("Python requests")
                && broken.contains("opentelemetry-instrumentation-requests"),
            "{broken}"
        );
        let go = fix(
            GapKind::MissingContext,
            Some("Go-http-client/1.1"),
            None,
            &[],
            None,
        )
        .unwrap();
        assert!(go.contains("otelhttp"), "{go}");
        let unknown = fix(GapKind::BrokenPropagation, Some("MyBot/7"), None, &[], None).unwrap();
        assert!(
            unknown.contains("unknown client (User-Agent mybot/7)"),
            "{unknown}"
        );
        // An X-Ray caller into a W3C-only service, which started a W3C trace.
        let xray = fix(
            GapKind::FormatMismatch,
            None,
            None,
            &[Format::W3c],
            Some(Format::Xray),
        )
        .unwrap();
        assert!(
            xray.contains("received a xray context and sent a new w3c trace"),
            "{xray}"
        );
        let both = fix(
            GapKind::FormatMismatch,
            None,
            None,
            &[Format::W3c, Format::B3Single],
            None,
        )
        .unwrap();
        assert!(
            both.contains("w3c and b3 contexts naming different traces"),
            "{both}"
        );
        assert!(
            xray.contains("OTEL_PROPAGATORS=tracecontext,baggage,xray"),
            "{xray}"
        );
        // A callee seen not to read X-Ray, called with X-Ray alone.
        let callee = fix(GapKind::FormatMismatch, None, None, &[Format::Xray], None).unwrap();
        assert!(
            callee.contains("the callee does not read xray")
                && callee.contains("OTEL_PROPAGATORS=tracecontext,baggage,xray"),
            "{callee}"
        );
        // SkyWalking: no propagator to name, received or not.
        for received in [None, Some(Format::W3c)] {
            let sw = fix(
                GapKind::FormatMismatch,
                None,
                None,
                &[Format::Sw8],
                received,
            )
            .unwrap();
            assert!(sw.contains("no OpenTelemetry propagator reads"), "{sw}");
        }
        let nginx = fix(
            GapKind::Uninstrumented,
            None,
            Some("nginx/1.22.1"),
            &[],
            None,
        )
        .unwrap();
        assert!(nginx.contains("ngx_otel_module"), "{nginx}");
        assert!(fix(GapKind::ContextOk, None, None, &[], None).is_none());
    }
}
