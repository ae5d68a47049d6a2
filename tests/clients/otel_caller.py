"""A caller instrumented with the OpenTelemetry SDK whose context goes out
through the propagators OTEL_PROPAGATORS names (the official contrib ones
for X-Ray, Google Cloud Trace, OpenTracing: tests/clients/requirements.txt),
so a test sees each format as an OpenTelemetry service really sends it.

Usage: OTEL_PROPAGATORS=xray otel_caller.py URL...
Makes one GET per URL, each in a span of its own, and prints a JSON list of
those spans' trace ids (32 hex digits), in order. Every second span id is
below 2^60 (its first hex digit 0, as one random id in 16 is): propagators
that write ids unpadded (OpenTracing's) then send fewer than 16 digits.
"""

import json
import sys
import urllib.request

from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator


class SmallEveryOther(RandomIdGenerator):
    def __init__(self) -> None:
        self.n = 0

    def generate_span_id(self) -> int:
        self.n += 1
        span_id = super().generate_span_id()
        return span_id >> 4 if self.n % 2 == 0 else span_id


def main() -> int:
    trace.set_tracer_provider(TracerProvider(id_generator=SmallEveryOther()))
    tracer = trace.get_tracer("tracegap-tests")
    traces = []
    for url in sys.argv[1:]:
        with tracer.start_as_current_span("call") as span:
            headers = {}
            propagate.inject(headers)
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=5) as answer:
                answer.read()
            traces.append(format(span.get_span_context().trace_id, "032x"))
    print(json.dumps(traces))
    return 0


if __name__ == "__main__":
    sys.exit(main())
