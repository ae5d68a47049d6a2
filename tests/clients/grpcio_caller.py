"""A gRPC C-core client (grpcio) that keeps one channel open and makes
unary calls when told to, for the tests that restart the agent under a
long-lived connection.

C-core's HPACK inserts a request's fixed fields (:path, :authority,
content-type, te, user-agent...) into the dynamic table once and refers to
them by index afterwards; the trace context is a literal in every call.
An agent that joins the connection later sees only those references.

Usage: grpcio_caller.py HOST:PORT PATH
Reads a count per line on stdin, makes that many calls (every tenth with
no trace context, the rest each with their own span id), prints how many
were answered (any status the server gave: the test's server implements
no method and says so), one line per count; ends at end of input.
"""

import sys

import grpc

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def main() -> int:
    target, path = sys.argv[1], sys.argv[2]
    # One subchannel, no retries: every call on the one connection.
    channel = grpc.insecure_channel(
        target, options=[("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]
    )
    # Raw bytes in and out: an empty message needs no generated code.
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    n = 0
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        answered = 0
        for _ in range(int(line)):
            n += 1
            metadata = [("x-request-id", f"grpcio-{n}")]
            if n % 10 != 0:
                metadata.append(("traceparent", f"00-{TRACE_ID}-{n:016x}-01"))
            try:
                call(b"", metadata=metadata, timeout=10)
                answered += 1
            except grpc.RpcError as e:
                # Unavailable or out of time: no answer came over the channel.
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    print(f"call {n}: {e.code()}", file=sys.stderr)
                else:
                    answered += 1
        print(answered, flush=True)
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
