#!/usr/bin/env python3
"""oslo.messaging peer for the mqrpc interop tests.

Runs a real oslo.messaging RPC server or client (rabbit driver) so that the
Rust side can be tested against it on one RabbitMQ. Needs only the standard
library and oslo.messaging (>= 18.2; see scripts/oslo-venv.sh); ``--trace``
also needs opentelemetry-sdk and opentelemetry-instrumentation-oslo-messaging,
which that script installs too.

Subcommands
-----------

``server --url URL --topic T --server S [--exchange E] [--endpoint E] [--trace]``
    An RPC server on Target(topic=T, server=S, exchange=E) with one endpoint.
    The default (``--endpoint interop``): version 1.3, null namespace, offering:

    ========================== ============================================
    echo(payload)              returns payload
    add(a, b)                  returns a + b
    whoami()                   returns S
    fail(message)              raises ValueError(message)
    sleep(seconds)             sleeps, returns seconds
    record(id)                 prints {"event": "record", "server": S,
                               "id": id, "method": "record"}, returns None
    context()                  returns the context dict it received
    _private()                 returns "private"; refused (NoSuchMethod) by
                               oslo's default access policy
    ========================== ============================================

    ``--endpoint calc``: namespace "calc", version 1.1 (the peer of the typed
    services of ``#[mqrpc::service]``), offering:

    ========================== ============================================
    add(a, b)                  returns a + b
    bump(by)                   (a cast) adds by to this server's total and
                               prints {"event": "bump", "server": S,
                               "by": by, "total": <new total>}
    total()                    returns this server's total
    whoami()                   returns S
    subtract(**kwargs)         returns kwargs["from"] - kwargs["subtrahend"]
                               ("from" cannot be a Python parameter name)
    fail(message)              raises ValueError(message)
    ========================== ============================================

    ``--rpc-ping`` sets oslo.messaging's ``rpc_ping_enabled``, so the server
    also answers ``oslo_rpc_server_ping`` with "pong".

    Prints ``{"event": "ready"}`` once the server is consuming. Stops
    gracefully (stop + wait) on SIGTERM/SIGINT or when stdin reaches EOF
    (unless --ignore-stdin), then prints ``{"event": "stopped"}`` and exits 0.

``client --url URL --topic T [--exchange E] [--allow-exmod M ...] [--trace]``
    Reads one JSON request per stdin line, handles them one at a time in
    order, and writes one JSON line per request to stdout::

        {"id": 1, "method": "add", "args": {"a": 1, "b": 2},
         "server": null, "version": null, "namespace": null,
         "fanout": false, "cast": false, "timeout": 10,
         "call_monitor_timeout": null, "context": {"user": "u"}}

    Every key but ``id`` and ``method`` is optional; null means "not set".
    Answers are ``{"id": 1, "ok": <result>}`` (casts: ``"ok": null``) or
    ``{"id": 1, "error": {"type", "module", "message", "mro",
    "is_value_error", "exc_type", "value", "version", "method"}}``; the last
    four are the attributes of that name (RemoteError's exc_type and value,
    UnsupportedVersion's version and method), null when absent. Each
    ``--allow-exmod`` adds a module to the transport's allowed_remote_exmods:
    oslo rebuilds remote exceptions of those modules as their own class
    instead of a RemoteError. Exits 0 at EOF.

``--trace`` (both subcommands)
    Installs an opentelemetry-sdk tracer provider and instruments
    oslo.messaging with ``OsloMessagingInstrumentor`` (PyPI package
    opentelemetry-instrumentation-oslo-messaging): every request sent gets a
    PRODUCER span "<[namespace.]method> send" whose W3C trace context goes into
    the request's context (on the wire ``_context_traceparent``, and
    ``_context_tracestate`` / ``_context_baggage`` when not empty), and every
    request dispatched gets a CONSUMER span "<[namespace.]method> receive"
    whose parent is the one that context names. Each span, when it ends, is
    printed as one more JSON line::

        {"event": "span", "name": "add send", "kind": "producer",
         "trace_id": <32 hex digits>, "span_id": <16 hex digits>,
         "parent_span_id": <16 hex digits> | null,
         "attributes": {"messaging.operation": "call", ...}}

    The client prints the spans of a request before its answer (a span ends
    before the answer is written); the server prints a call's span before it
    replies.

stdout carries only these JSON lines; logging goes to stderr at WARNING.
"""

import argparse
import json
import logging
import signal
import sys
import threading
import time
import warnings

# Keep stderr readable: oslo.service imports eventlet (deprecated) even when
# only the threading executor is used, and passing executor= is deprecated
# although 'threading' is already what oslo.messaging would pick.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
warnings.filterwarnings("ignore",
                        message="Using the 'executor' argument is deprecated")

from oslo_config import cfg  # noqa: E402
import oslo_messaging  # noqa: E402

_STDOUT_LOCK = threading.Lock()


def emit(obj):
    """Write one JSON line to stdout and flush (thread-safe)."""
    line = json.dumps(obj, default=_json_default)
    with _STDOUT_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _json_default(value):
    # Results come back JSON-decoded already; this only guards odd objects
    # (e.g. a context object) so that one answer never kills the peer.
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


def make_transport(url, compression=None, transient_quorum=False,
                   allowed_remote_exmods=None):
    cfg.CONF([], project="mqrpc-interop")
    transport = oslo_messaging.get_rpc_transport(
        cfg.CONF, url=url, allowed_remote_exmods=allowed_remote_exmods)
    if transient_quorum:
        # Read when the driver's connections are made, as kombu_compression below.
        cfg.CONF.set_override("rabbit_transient_quorum_queue", True,
                              group="oslo_messaging_rabbit")
    if compression:
        # The rabbit driver registered its options above and reads this one when it
        # opens a connection, which it has not done yet.
        cfg.CONF.set_override("kombu_compression", compression,
                              group="oslo_messaging_rabbit")
    return transport


# --------------------------------------------------------------------------
# tracing (--trace)
# --------------------------------------------------------------------------


def install_tracing():
    """Print every finished span as a JSON line and instrument oslo.messaging.

    Imported here, not at the top, so that a peer run without --trace needs
    nothing but oslo.messaging; with --trace a missing package is an
    ImportError, the peer exits before "ready", and the test fails.
    """
    from opentelemetry import trace
    from opentelemetry.instrumentation.oslo_messaging import (
        OsloMessagingInstrumentor,
    )
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class JsonLineExporter(SpanExporter):
        def export(self, spans):
            for span in spans:
                parent = span.parent
                emit({
                    "event": "span",
                    "name": span.name,
                    "kind": span.kind.name.lower(),
                    "trace_id": format(span.context.trace_id, "032x"),
                    "span_id": format(span.context.span_id, "016x"),
                    "parent_span_id": (format(parent.span_id, "016x")
                                       if parent is not None else None),
                    "attributes": dict(span.attributes or {}),
                })
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLineExporter()))
    trace.set_tracer_provider(provider)
    OsloMessagingInstrumentor().instrument(tracer_provider=provider)


# --------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------


class InteropEndpoint:
    target = oslo_messaging.Target(version="1.3")

    def __init__(self, server_name):
        self.server_name = server_name

    def echo(self, ctxt, payload):
        return payload

    def add(self, ctxt, a, b):
        return a + b

    def whoami(self, ctxt):
        return self.server_name

    def fail(self, ctxt, message):
        raise ValueError(message)

    def sleep(self, ctxt, seconds):
        time.sleep(seconds)
        return seconds

    def record(self, ctxt, id):  # noqa: A002 (the wire argument is "id")
        emit({"event": "record", "server": self.server_name, "id": id,
              "method": "record"})
        return None

    def context(self, ctxt):
        return ctxt

    def _private(self, ctxt):
        return "private"


class CalcEndpoint:
    """The Python side of a typed service: namespace "calc", version 1.1."""

    target = oslo_messaging.Target(namespace="calc", version="1.1")

    def __init__(self, server_name):
        self.server_name = server_name
        self._lock = threading.Lock()
        self._total = 0

    def add(self, ctxt, a, b):
        return a + b

    def bump(self, ctxt, by):
        with self._lock:
            self._total += by
            total = self._total
        emit({"event": "bump", "server": self.server_name, "by": by,
              "total": total})

    def total(self, ctxt):
        with self._lock:
            return self._total

    def whoami(self, ctxt):
        return self.server_name

    def subtract(self, ctxt, **kwargs):
        return kwargs["from"] - kwargs["subtrahend"]

    def fail(self, ctxt, message):
        raise ValueError(message)


_ENDPOINTS = {"interop": InteropEndpoint, "calc": CalcEndpoint}


def run_server(args):
    transport = make_transport(args.url, args.compression,
                               args.transient_quorum)
    if args.rpc_ping:
        # Registered by the dispatcher when it is made, which is too late to
        # override it; registering the same options twice is allowed.
        from oslo_messaging.rpc import dispatcher as rpc_dispatcher
        cfg.CONF.register_opts(rpc_dispatcher._dispatcher_opts)
        cfg.CONF.set_override("rpc_ping_enabled", True)
    target = oslo_messaging.Target(topic=args.topic, server=args.server,
                                   exchange=args.exchange or None)
    endpoint = _ENDPOINTS[args.endpoint](args.server)
    server = oslo_messaging.get_rpc_server(
        transport, target, [endpoint], executor="threading")

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if not args.ignore_stdin:
        def watch_stdin():
            try:
                for _ in sys.stdin:
                    pass
            finally:
                stop.set()

        threading.Thread(target=watch_stdin, name="stdin-watch",
                         daemon=True).start()

    server.start()
    emit({"event": "ready"})

    # Wait with a timeout so that signal handlers always get to run.
    while not stop.wait(0.5):
        pass

    server.stop()
    server.wait()
    transport.cleanup()
    emit({"event": "stopped"})
    return 0


# --------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------

# Request keys passed to RPCClient.prepare() when present and not null.
_PREPARE_KEYS = ("server", "version", "namespace", "fanout", "timeout",
                 "call_monitor_timeout")


def error_dict(exc):
    cls = type(exc)
    return {
        "type": cls.__name__,
        "module": cls.__module__,
        "message": str(exc),
        "mro": [c.__name__ for c in cls.__mro__],
        "is_value_error": isinstance(exc, ValueError),
        "exc_type": getattr(exc, "exc_type", None),
        "value": getattr(exc, "value", None),
        "version": getattr(exc, "version", None),
        "method": getattr(exc, "method", None),
    }


def handle_request(transport, args, req):
    target = oslo_messaging.Target(topic=args.topic,
                                   exchange=args.exchange or None)
    client = oslo_messaging.get_rpc_client(transport, target)
    prepare = {k: req[k] for k in _PREPARE_KEYS if req.get(k) is not None}
    cctxt = client.prepare(**prepare)
    context = req.get("context") or {}
    kwargs = req.get("args") or {}
    if req.get("cast"):
        cctxt.cast(context, req["method"], **kwargs)
        return None
    return cctxt.call(context, req["method"], **kwargs)


def run_client(args):
    transport = make_transport(args.url, args.compression,
                               args.transient_quorum, args.allow_exmod)
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            req_id = None
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise TypeError("request must be a JSON object")
                req_id = req.get("id")
                if "method" not in req:
                    raise KeyError("method")
                result = handle_request(transport, args, req)
            except Exception as exc:  # every failure becomes an answer
                emit({"id": req_id, "error": error_dict(exc)})
            else:
                emit({"id": req_id, "ok": result})
    finally:
        transport.cleanup()
    return 0


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="oslo_peer.py",
        description="oslo.messaging RPC peer for mqrpc interop tests")
    sub = parser.add_subparsers(dest="command", required=True)

    srv = sub.add_parser("server", help="run an oslo RPC server")
    srv.add_argument("--url", required=True,
                     help="transport URL, e.g. rabbit://guest:guest@127.0.0.1:5672/")
    srv.add_argument("--topic", required=True)
    srv.add_argument("--server", required=True)
    srv.add_argument("--exchange", default=None,
                     help="target exchange (default: control_exchange 'openstack')")
    srv.add_argument("--compression", default=None,
                     help="kombu_compression for what it sends (gzip, bzip2)")
    srv.add_argument("--transient-quorum", action="store_true",
                     help="rabbit_transient_quorum_queue = true")
    srv.add_argument("--trace", action="store_true",
                     help="instrument oslo.messaging with OpenTelemetry and "
                          "print each finished span as a JSON line")
    srv.add_argument("--endpoint", choices=sorted(_ENDPOINTS),
                     default="interop",
                     help="the endpoint to serve (default: interop)")
    srv.add_argument("--rpc-ping", action="store_true",
                     help="rpc_ping_enabled = true (answer oslo_rpc_server_ping)")
    srv.add_argument("--ignore-stdin", action="store_true",
                     help="do not stop at stdin EOF (stop on SIGTERM/SIGINT only)")

    cli = sub.add_parser("client", help="send JSON-line requests from stdin")
    cli.add_argument("--url", required=True)
    cli.add_argument("--topic", required=True)
    cli.add_argument("--exchange", default=None)
    cli.add_argument("--compression", default=None,
                     help="kombu_compression for what it sends (gzip, bzip2)")
    cli.add_argument("--transient-quorum", action="store_true",
                     help="rabbit_transient_quorum_queue = true")
    cli.add_argument("--trace", action="store_true",
                     help="instrument oslo.messaging with OpenTelemetry and "
                          "print each finished span as a JSON line")
    cli.add_argument("--allow-exmod", action="append", default=[],
                     help="a module whose remote exceptions oslo rebuilds "
                          "(allowed_remote_exmods); repeatable")

    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.trace:
        install_tracing()
    if args.command == "server":
        return run_server(args)
    return run_client(args)


if __name__ == "__main__":
    sys.exit(main())
