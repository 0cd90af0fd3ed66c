#!/usr/bin/env python3
"""oslo.messaging peer for the mqrpc interop tests.

Runs a real oslo.messaging RPC server or client, notifier or notification
listener (rabbit driver) so that the Rust side can be tested against it on one
RabbitMQ, and measures the oslo RPC client for ``mqrpc bench --oslo``. Needs only the standard library and oslo.messaging (>= 18.2; see
scripts/oslo-venv.sh); ``--trace`` also needs opentelemetry-sdk and
opentelemetry-instrumentation-oslo-messaging, which that script installs too.

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

``notify --url URL --topic T [--topic T2 ...] --publisher-id P``
    An ``oslo_messaging.Notifier(transport, driver="messagingv2",
    topics=[T, ...], publisher_id=P)`` on a notification transport. Reads one
    JSON notification per stdin line and sends it, one at a time in order::

        {"id": 1, "priority": "info", "event_type": "compute.instance.create",
         "payload": {...}, "context": {"user": "u", "request_id": "r"},
         "publisher_id": null}

    ``priority`` is a Notifier method (audit, debug, info, warn, error,
    critical, sample); ``publisher_id``, when set, goes through
    ``Notifier.prepare(publisher_id=...)``. ``context`` (optional) becomes an
    oslo.context ``RequestContext`` (``RequestContext.from_dict``): oslo sends
    the context's redacted copy and drops a plain dict's. Answers
    ``{"id": 1, "ok": null}`` once the notifier returned (the rabbit driver
    waits for the publisher confirm), or ``{"id": 1, "error": {...}}`` as the
    client does. Exits 0 at EOF.

``listen-notifications --url URL --topic T [--topic T2 ...] [--exchange E]
[--pool P] [--allow-requeue] --endpoint JSON [--endpoint JSON ...]``
    ``oslo_messaging.get_notification_listener(transport, targets, endpoints,
    executor="threading", pool=P, allow_requeue=...)`` with a
    Target(topic=T, exchange=E) per topic and one endpoint per ``--endpoint``::

        {"name": "errors", "priorities": ["error", "critical"],
         "filter": {"event_type": "^compute\\.", "publisher_id": "...",
                    "context": {...}, "payload": {...}, "metadata": {...}},
         "requeue_once": ["retry.me"]}

    The endpoint has a method for each priority listed; ``filter`` (optional)
    is its ``filter_rule``, a ``NotificationFilter`` of those keyword
    arguments; the first time it gets a notification whose event type is in
    ``requeue_once`` it returns ``NotificationResult.REQUEUE`` (handled
    afterwards). Each call prints::

        {"event": "notification", "endpoint": "errors", "priority": "error",
         "ctxt": {...}, "publisher_id": "...", "event_type": "...",
         "payload": ..., "metadata": {"message_id": "...", "timestamp": "..."},
         "result": "handled" | "requeue"}

    Prints ``{"event": "ready"}`` once the listener has declared its queues and
    consumes; stops (stop + wait) at stdin EOF or on SIGTERM/SIGINT, prints
    ``{"event": "stopped"}`` and exits 0.

``bench --url URL --topic T [--server S] [--exchange E] --calls N
[--concurrency C[,C2...]] [--payload-size B] [--warmup W] [--min-seconds S]``
    Measures an oslo.messaging RPC client calling ``echo(payload)`` (a string
    of B bytes, default 100) on Target(topic=T, server=S, exchange=E): one
    RPCClient on one transport shared by C threads, as a Python service would
    share them. W calls (default 50) warm the client up first; then, for each
    concurrency in turn, the threads make at least N calls between them and go
    on starting calls until S seconds (default 0) have passed. Each call is
    timed on its own; every echo must come back whole. Prints one JSON line per
    concurrency::

        {"event": "bench", "concurrency": 16, "calls": 5000, "seconds": 2.1,
         "calls_per_s": 2380.9, "p50_us": 6510.2, "p99_us": 9800.0,
         "p999_us": 12000.1, "oslo_messaging": "18.3.1", "python": "3.12.3"}

    With concurrency 1 the calls are sequential: the percentiles are the
    sequential latency. A failed call ends the run with an exit status of 1.

``--trace`` (server and client)
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
import math
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


def run_until_stopped(runner, transport, watch_stdin):
    """Starts `runner` (an RPC server or a notification listener), says ready,
    and stops it on SIGTERM, SIGINT or, if `watch_stdin`, the end of stdin."""
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if watch_stdin:
        def watch():
            try:
                for _ in sys.stdin:
                    pass
            finally:
                stop.set()

        threading.Thread(target=watch, name="stdin-watch",
                         daemon=True).start()

    runner.start()
    emit({"event": "ready"})

    # Wait with a timeout so that signal handlers always get to run.
    while not stop.wait(0.5):
        pass

    runner.stop()
    runner.wait()
    transport.cleanup()
    emit({"event": "stopped"})
    return 0


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

    return run_until_stopped(server, transport,
                             watch_stdin=not args.ignore_stdin)


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
# notifications
# --------------------------------------------------------------------------

_PRIORITIES = ("audit", "debug", "info", "warn", "error", "critical",
               "sample")


def make_notification_transport(url):
    cfg.CONF([], project="mqrpc-interop")
    return oslo_messaging.get_notification_transport(cfg.CONF, url=url)


def run_notify(args):
    from oslo_context import context as oslo_context

    transport = make_notification_transport(args.url)
    notifier = oslo_messaging.Notifier(transport, driver="messagingv2",
                                       topics=args.topic,
                                       publisher_id=args.publisher_id)
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            req_id = None
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise TypeError("notification must be a JSON object")
                req_id = req.get("id")
                priority = req["priority"]
                if priority not in _PRIORITIES:
                    raise ValueError("unknown priority %r" % priority)
                sender = notifier
                if req.get("publisher_id") is not None:
                    sender = notifier.prepare(publisher_id=req["publisher_id"])
                ctxt = None
                if req.get("context") is not None:
                    ctxt = oslo_context.RequestContext.from_dict(req["context"])
                getattr(sender, priority)(ctxt, req["event_type"],
                                          req.get("payload"))
            except Exception as exc:  # every failure becomes an answer
                emit({"id": req_id, "error": error_dict(exc)})
            else:
                emit({"id": req_id, "ok": None})
    finally:
        transport.cleanup()
    return 0


class NotifyEndpoint:
    """An endpoint with a method per listed priority that prints each call."""

    def __init__(self, spec):
        self.name = spec["name"]
        self._requeue_once = set(spec.get("requeue_once") or ())
        self._requeued = set()
        self._lock = threading.Lock()
        if spec.get("filter"):
            self.filter_rule = oslo_messaging.NotificationFilter(
                **spec["filter"])
        for priority in spec["priorities"]:
            if priority not in _PRIORITIES:
                raise ValueError("unknown priority %r" % priority)
            setattr(self, priority, self._handler(priority))

    def _handler(self, priority):
        def handle(ctxt, publisher_id, event_type, payload, metadata):
            result = "handled"
            if event_type in self._requeue_once:
                with self._lock:
                    key = metadata.get("message_id")
                    if key not in self._requeued:
                        self._requeued.add(key)
                        result = "requeue"
            emit({"event": "notification", "endpoint": self.name,
                  "priority": priority, "ctxt": ctxt,
                  "publisher_id": publisher_id, "event_type": event_type,
                  "payload": payload, "metadata": metadata,
                  "result": result})
            if result == "requeue":
                return oslo_messaging.NotificationResult.REQUEUE
            return oslo_messaging.NotificationResult.HANDLED
        return handle


def run_listen_notifications(args):
    transport = make_notification_transport(args.url)
    targets = [oslo_messaging.Target(topic=topic,
                                     exchange=args.exchange or None)
               for topic in args.topic]
    endpoints = [NotifyEndpoint(json.loads(spec)) for spec in args.endpoint]
    listener = oslo_messaging.get_notification_listener(
        transport, targets, endpoints, executor="threading",
        allow_requeue=args.allow_requeue, pool=args.pool)

    return run_until_stopped(listener, transport, watch_stdin=True)



# --------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------


def _percentile_us(sorted_ns, quantile):
    """The value at `quantile` of sorted nanoseconds, in microseconds (the
    smallest value at or above that share of the calls, as hdrhistogram's)."""
    if not sorted_ns:
        return 0.0
    index = min(len(sorted_ns), max(1, math.ceil(quantile * len(sorted_ns))))
    return sorted_ns[index - 1] / 1000.0


def _bench_calls(client, payload, concurrency, calls, min_seconds):
    """At least `calls` echo calls from `concurrency` threads, and more until
    `min_seconds` have passed; returns (wall seconds, each call's nanoseconds)."""
    lock = threading.Lock()
    started_calls = [0]
    durations = []
    failures = []
    clock = time.perf_counter_ns
    started = clock()
    until = started + int(min_seconds * 1e9)

    def worker():
        mine = []
        try:
            while True:
                with lock:
                    if started_calls[0] >= calls and clock() >= until:
                        break
                    started_calls[0] += 1
                begun = clock()
                back = client.call({}, "echo", payload=payload)
                mine.append(clock() - begun)
                if back != payload:
                    raise ValueError("echo returned %d bytes instead of %d"
                                     % (len(back or ""), len(payload)))
        except Exception as exc:  # reported by the main thread
            failures.append(exc)
        finally:
            with lock:
                durations.extend(mine)

    threads = [threading.Thread(target=worker, name="bench-%d" % i,
                                daemon=True)
               for i in range(max(1, concurrency))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = (clock() - started) / 1e9
    if failures:
        raise failures[0]
    return seconds, durations


def run_bench(args):
    import importlib.metadata
    import platform

    transport = make_transport(args.url)
    target = oslo_messaging.Target(topic=args.topic, server=args.server,
                                   exchange=args.exchange or None)
    client = oslo_messaging.get_rpc_client(transport, target,
                                           timeout=args.timeout)
    payload = "x" * args.payload_size
    versions = {
        "oslo_messaging": importlib.metadata.version("oslo.messaging"),
        "python": platform.python_version(),
    }
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",") if c]
        if args.warmup:
            _bench_calls(client, payload, max(concurrencies), args.warmup, 0)
        for concurrency in concurrencies:
            seconds, durations = _bench_calls(client, payload, concurrency,
                                              args.calls, args.min_seconds)
            durations.sort()
            line = {
                "event": "bench",
                "concurrency": concurrency,
                "calls": len(durations),
                "seconds": seconds,
                "calls_per_s": len(durations) / seconds if seconds else 0.0,
                "p50_us": _percentile_us(durations, 0.5),
                "p99_us": _percentile_us(durations, 0.99),
                "p999_us": _percentile_us(durations, 0.999),
            }
            line.update(versions)
            emit(line)
    except Exception as exc:
        emit({"event": "error", "error": error_dict(exc)})
        return 1
    finally:
        transport.cleanup()
    return 0

# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="oslo_peer.py",
        description="oslo.messaging peer for mqrpc interop tests")
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

    ntf = sub.add_parser("notify",
                         help="send JSON-line notifications from stdin")
    ntf.add_argument("--url", required=True)
    ntf.add_argument("--topic", action="append", required=True,
                     help="a notification topic; repeatable")
    ntf.add_argument("--publisher-id", required=True)

    lsn = sub.add_parser("listen-notifications",
                         help="run an oslo notification listener")
    lsn.add_argument("--url", required=True)
    lsn.add_argument("--topic", action="append", required=True,
                     help="a notification topic; repeatable")
    lsn.add_argument("--exchange", default=None,
                     help="targets' exchange (default: control_exchange)")
    lsn.add_argument("--pool", default=None,
                     help="listener pool (default: none, the default group)")
    lsn.add_argument("--allow-requeue", action="store_true")
    lsn.add_argument("--endpoint", action="append", required=True,
                     help="an endpoint as JSON (see the module docstring); "
                          "repeatable")

    bench = sub.add_parser("bench",
                           help="measure an oslo RPC client calling echo")
    bench.add_argument("--url", required=True)
    bench.add_argument("--topic", required=True)
    bench.add_argument("--server", default=None)
    bench.add_argument("--exchange", default=None)
    bench.add_argument("--calls", type=int, required=True,
                       help="calls per concurrency, at least")
    bench.add_argument("--concurrency", default="1",
                       help="threads calling at once; a comma-separated "
                            "list measures each in turn (default 1)")
    bench.add_argument("--payload-size", type=int, default=100,
                       help="bytes of the echoed string (default 100)")
    bench.add_argument("--warmup", type=int, default=50,
                       help="calls before the measured ones (default 50)")
    bench.add_argument("--min-seconds", type=float, default=0.0,
                       help="go on calling until this long has passed")
    bench.add_argument("--timeout", type=float, default=60.0,
                       help="each call's timeout in seconds (default 60)")

    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "trace", False):
        install_tracing()
    if args.command == "server":
        return run_server(args)
    if args.command == "notify":
        return run_notify(args)
    if args.command == "listen-notifications":
        return run_listen_notifications(args)
    if args.command == "bench":
        return run_bench(args)
    return run_client(args)


if __name__ == "__main__":
    sys.exit(main())
