#!/usr/bin/env python3
"""A load client that counts failures precisely (wrk's error counts are too coarse for the reload
and crash sections) and tallies which worker answered (fairness).

    loadclient.py --port P [--conns C] [--duration S] [--keepalive] [--timeout S] [--rate R]
                  [--sources N]

With --rate R the load is paced: R requests per second in all, each connection sending one every
C/R seconds on its own schedule (staggered); a request that is late starts at once and the slots
it missed are skipped, not made up in a burst. Without it every connection sends the next
request as soon as the last one is done.

With --sources N every connection is bound, before connect(), to a source address of its own
turn: the k-th connection opened comes from 127.0.0.(1 + k % N) (IP_BIND_ADDRESS_NO_PORT, so
the port is picked at connect() for the whole 4-tuple and N addresses do not share one bind()
port range). The summary then has "by_source": for each source address, how many answers came
from each worker (the first word of the body: the pid in herder-demo's and node-app.js's).

Prints "started" once SIGTERM/SIGINT are handled; runs until --duration has passed or one of
them arrives, lets in-flight requests finish (each bounded by --timeout), then prints one JSON
object on stdout.

A request counts as ok when a complete HTTP response with a 2xx status arrived. Every other
request is failed, in exactly one class:
  refused  connect() got ECONNREFUSED (no socket listening)
  reset    ECONNRESET / EPIPE while sending or reading
  closed   the server closed the connection before a complete response (EOF)
  timeout  no connection or no complete response within --timeout
  non2xx   a complete response with a status outside 200-299
  other    any other error (the message is kept in "examples")
Latency (p50, p99, max) is over the ok requests, connect included.
With --keepalive a connection is reused until it fails; in keep-alive mode a request sent on an
idle connection the server closed concurrently is a failure too (HTTP clients would retry it).
"""
import argparse
import asyncio
import json
import signal
import socket
import time
from collections import Counter

REQ_CLOSE = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
REQ_KA = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


# linux/in.h; socket.IP_BIND_ADDRESS_NO_PORT exists only from Python 3.12.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


class Closed(Exception):
    pass


async def connect_from(port, source):
    """A connection to 127.0.0.1:port from the address `source` (any port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def read_response(reader, keepalive):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    if length is not None:
        body = await reader.readexactly(length)
    elif keepalive:
        raise Closed("no content-length on keep-alive")
    else:
        body = await reader.read()
    return status, body


def classify(exc):
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(exc, (asyncio.IncompleteReadError, Closed)):
        return "closed"
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    return "other"


async def main(args):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The first line: a SIGTERM from now on ends the run with a result (before, it killed the
    # interpreter, and a caller that stops a fast event at once got nothing).
    print("started", flush=True)
    ok = 0
    fails = Counter()
    examples = []
    bodies = Counter()
    by_source = {}
    opened = 0
    fail_times = []
    lat = []
    t0 = time.monotonic()
    deadline = t0 + args.duration

    def fail(kind, exc):
        fails[kind] += 1
        if len(fail_times) < 10000:
            fail_times.append(round(time.monotonic() - t0, 3))
        if kind == "other" and len(examples) < 5:
            examples.append(repr(exc))

    gap = args.conns / args.rate if args.rate > 0 else 0.0

    async def one_conn(i):
        nonlocal ok, opened
        reader = writer = source = None
        slot = t0 + gap * i / args.conns
        while not stop.is_set() and time.monotonic() < deadline:
            if gap:
                wait = slot - time.monotonic()
                if wait > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), wait)
                        break
                    except asyncio.TimeoutError:
                        pass
                slot = max(slot + gap, time.monotonic())
            t_req = time.monotonic()
            try:
                if writer is None and args.sources:
                    source = f"127.0.0.{1 + opened % args.sources}"
                    opened += 1
                    reader, writer = await asyncio.wait_for(
                        connect_from(args.port, source), args.timeout)
                elif writer is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", args.port), args.timeout)
                writer.write(REQ_KA if args.keepalive else REQ_CLOSE)
                status, body = await asyncio.wait_for(
                    read_response(reader, args.keepalive), args.timeout)
                if 200 <= status < 300:
                    ok += 1
                    lat.append(time.monotonic() - t_req)
                    text = body.decode(errors="replace").strip()
                    bodies[text] += 1
                    if source:
                        worker = text.split()[0] if text else "?"
                        tally = by_source.setdefault(source, Counter())
                        tally[worker] += 1
                else:
                    fail("non2xx", None)
                if not args.keepalive:
                    writer.close()
                    writer = None
            except Exception as exc:  # noqa: BLE001 - every failure is classified
                fail(classify(exc), exc)
                if writer is not None:
                    writer.close()
                writer = None
                if isinstance(exc, ConnectionRefusedError):
                    await asyncio.sleep(0.001)
        if writer is not None:
            writer.close()

    async def stopper():
        await asyncio.wait([asyncio.ensure_future(stop.wait())],
                           timeout=max(0.0, deadline - time.monotonic()))
        stop.set()

    tasks = [asyncio.ensure_future(one_conn(i)) for i in range(args.conns)]
    await asyncio.gather(stopper(), *tasks)
    elapsed = time.monotonic() - t0
    lat.sort()

    def q(p):
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None
    print(json.dumps({
        "ok": ok, "failed": sum(fails.values()), "fails": dict(fails),
        "elapsed": round(elapsed, 3), "p50_ms": q(0.5), "p99_ms": q(0.99),
        "max_ms": round(lat[-1] * 1000, 2) if lat else None, "rps": round(ok / elapsed, 1) if elapsed else 0,
        "bodies": dict(bodies), "by_source": {a: dict(c) for a, c in by_source.items()},
        "fail_times": fail_times, "examples": examples,
    }))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=16)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--keepalive", action="store_true")
    p.add_argument("--rate", type=float, default=0.0,
                   help="requests per second in all (default: as fast as the server answers)")
    p.add_argument("--sources", type=int, default=0,
                   help="bind each connection to 127.0.0.(1 + k %% N), k counting connections")
    a = p.parse_args()
    if not 0 <= a.sources <= 254:
        p.error("--sources takes 0..254 (127.0.0.1 .. 127.0.0.254)")
    asyncio.run(main(a))
