"""The optional Prometheus endpoint (`[metrics] listen = "127.0.0.1:9108"`; off by default).

prometheus-client is imported only here, and this module only when the endpoint is on, so
a gateway without it pays nothing (the 40 MB footprint). Nothing is counted twice: every
figure is read at scrape time from the part that owns it (port workers' line statistics,
poller health, the uplink's state, the executor's result counts, the journal's stats), so no
hot path carries instrumentation.
"""

import logging

from gateway.config.sections import parse_listen

log = logging.getLogger(__name__)

PREFIX = "mgw_"


class GatewayCollector:
    """A prometheus_client collector over a running Gateway."""

    def __init__(self, gateway):
        self.gw = gateway

    def describe(self):
        return []                     # no description up front: collect() at scrape time

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        gw = self.gw

        def counter(name, doc, labels=()):
            return CounterMetricFamily(PREFIX + name, doc, labels=list(labels))

        def gauge(name, doc, labels=()):
            return GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))

        # lines
        line = {k: counter(k, doc, ["port"]) for k, doc in (
            ("line_requests", "requests written on the line (retries included)"),
            ("line_answers", "answers accepted"),
            ("line_timeouts", "attempts without an answer"),
            ("line_garbled_frames", "frames with a bad checksum or end byte"),
            ("line_foreign_frames", "valid frames answering no request of ours"),
            ("line_retries", "requests written again"))}
        busy = gauge("line_busy_ratio", "share of time the line carried our transactions",
                     ["port"])
        is_open = gauge("line_open", "1 while the serial port is open", ["port"])
        for w in list(gw.workers.values()):
            st = w.line_stats()
            port = [st["port"]]
            line["line_requests"].add_metric(port, st["requests"])
            line["line_answers"].add_metric(port, st["answers"])
            line["line_timeouts"].add_metric(port, st["timeouts"])
            line["line_garbled_frames"].add_metric(port, st["checksum_errors"])
            line["line_foreign_frames"].add_metric(port, st["foreign_frames"])
            line["line_retries"].add_metric(port, st["retries"])
            busy.add_metric(port, st["utilisation"])
            is_open.add_metric(port, 1 if st["open"] else 0)
        yield from line.values()
        yield busy
        yield is_open

        # meters
        meters = gauge("meters", "configured meters by health", ["state"])
        online = gauge("meter_online", "1 while the meter answers", ["meter", "port"])
        counts = {"online": 0, "offline": 0}
        for port, poller in list(gw.pollers.items()):
            for mid, h in list(poller.health.items()):
                counts["online" if h.online else "offline"] += 1
                online.add_metric([mid, port], 1 if h.online else 0)
        for state, n in counts.items():
            meters.add_metric([state], n)
        yield meters
        yield online

        # journal and uplink
        try:
            jstats = gw.journal.stats()
        except Exception:             # a failing disk: the rest still scrapes
            jstats = None
        if jstats:
            size = gauge("journal_bytes", "the journal's file size")
            size.add_metric([], jstats["file_bytes"])
            yield size
            drops = counter("journal_dropped", "rows dropped oldest first at the quota",
                            ["stream"])
            stored = gauge("journal_rows", "rows kept in the journal", ["stream"])
            for s, st in sorted(jstats["streams"].items()):
                drops.add_metric([s], st["dropped"])
                stored.add_metric([s], st["stored"])
            yield drops
            yield stored
        lost = counter("memory_lost", "readings and events lost while the disk failed",
                       ["kind"])
        lost.add_metric(["readings"], gw.sink.lost)
        lost.add_metric(["events"], gw.sink.lost_events)
        yield lost
        up = gw.uplink
        connected = gauge("uplink_connected", "1 while connected to the broker")
        connected.add_metric([], 1 if up is not None and up.state["connected"] else 0)
        yield connected
        if up is not None:
            ust = up.status(jstats) if jstats else up.status()
            backlog = gauge("uplink_backlog", "rows not yet acknowledged by the broker",
                            ["stream"])
            for s, n in sorted(ust.get("backlog", {}).items()):
                backlog.add_metric([s], n)
            yield backlog
            age = gauge("uplink_oldest_unsent_age_seconds",
                        "age of the oldest reading the broker has not acknowledged")
            age.add_metric([], ust.get("oldest_unsent_age_s") or 0)
            yield age
            for key, doc in (("published", "messages published"),
                             ("acked", "messages acknowledged by the broker"),
                             ("connects", "connections made")):
                c = counter("uplink_" + key, doc)
                c.add_metric([], ust.get(key, 0))
                yield c

        # commands, clock, threads
        results = counter("command_results", "command results sent, by action and status",
                          ["action", "status"])
        ex = gw.executor
        if ex is not None:
            for (action, status), n in sorted(dict(ex.outcomes).items()):
                results.add_metric([action, status], n)
        yield results
        clock = gauge("clock_trusted", "1 while the system clock is synchronised")
        clock.add_metric([], 1 if gw.clock.trusted() else 0)
        yield clock
        restarts = counter("thread_restarts", "threads restarted by the supervisor",
                           ["thread"])
        for name, n in sorted(gw.restarts.items()):
            restarts.add_metric([name], n)
        yield restarts


class MetricsServer:
    """The HTTP endpoint on its own thread; stop() closes it."""

    def __init__(self, listen, gateway):
        import prometheus_client
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector
        host, port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(gateway))
        ProcessCollector(registry=self.registry)       # memory, CPU, open files
        started = prometheus_client.start_http_server(port, host, registry=self.registry)
        self._server, self._thread = started if started else (None, None)
        self.listen = "%s:%d" % (host, port)

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def serve(listen, gateway):
    """The endpoint, or None with one line in the log when it cannot be started (metering
    goes on without it)."""
    try:
        server = MetricsServer(listen, gateway)
    except ImportError:
        log.error("metrics: prometheus-client is not installed (pip install "
                  "'meter-gateway[metrics]'); no endpoint on %s", listen)
        return None
    except (OSError, ValueError) as exc:
        log.error("metrics: cannot listen on %s: %s", listen,
                  getattr(exc, "strerror", None) or exc)
        return None
    log.info("metrics on http://%s/metrics", server.listen)
    return server
