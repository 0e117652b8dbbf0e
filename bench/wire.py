"""Latency as the wire sees it: where a slow answer's time went, outside the service's own
figures.

wrk reports latencies; the service's histogram reports its own. Neither says whether the
slowest hundredth of requests waited in the client, in the kernel, for the database or in
the worker's event loop. This captures the loopback traffic of a load (tcpdump, headers
only) and reads it back, per connection::

    python bench/wire.py --port PORT [--database-port 5432] [--pid PID] -- wrk ...
    python bench/wire.py --port PORT --seconds 10        # capture while you run a load
    python bench/wire.py --port PORT --read FILE.pcap    # read an earlier capture

and prints:

- **requests**: from a request's first segment to its answer's first segment, per
  connection (what the client waits, less its own event loop): mean and quantiles, and
  the requests in flight by Little's law (mean latency x requests a second);
- **answers in bursts**: answers less than ``--burst-gap`` apart form a burst. A service
  answering after group commits answers in bursts of about a commit's decisions, one
  burst per commit; the interval between bursts is the cycle a request waits for;
- **silences**: the longest times without an answer, each with the database round trips
  that overlapped it, and with ``--pid`` what the service's threads did meanwhile
  (on a CPU, from the kernel's ``sched_switch`` events; needs tracefs, as root), so a
  silence reads as the worker busy, waiting for the database, or not running;
- **slow requests**: those at or over the p99, grouped into episodes (starting within
  50 ms of one another): a few long episodes are stalls, many short ones a cycle;
- **database round trips**: from a query's first segment to the first reply segment,
  per database connection (the audit commits, the polls).

With a command after ``--``, the capture runs while the command runs and stops when it
ends (its output is shown); otherwise for ``--seconds``. ``--keep FILE`` keeps the
capture. tcpdump is installed with apt-get when missing and the script runs as root.

Only plain HTTP/1.1 on TCP over IPv4 or IPv6 is read, one answer per request in order
per connection (as wrk and the service do); a capture's own drops are said (tcpdump
prints them).

What it showed in round 19 of issue 17 (one decision worker, 1M customers, PostgreSQL,
wrk at 32 connections back to back): the worker answers in bursts of about 14, one per
group commit, every 4.5-5.6 ms (median); a burst waits for the commit (about 2 ms) and
the commit for the worker to decide the decisions it holds. The longest silences, 10-15
ms, were the worker deciding on its CPU (7-10 ms of them) with no commit in flight, not a
pause; a few were a commit held by the disk (one of 62 ms).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SNAPLEN = 160
"""Bytes kept of each packet: the headers and the first bytes of the payload."""
TRACEFS = Path("/sys/kernel/tracing")
_METHODS = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"PATCH ", b"HEAD ", b"OPTIONS ")
_LINK_HEADER = {0: 4, 1: 14, 113: 16, 276: 20}
"""Bytes before the IP header, by pcap link type (BSD loopback, Ethernet, Linux cooked
v1 and v2)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """A TCP segment with payload: when, from which port to which, its first bytes."""

    at: float
    source: int
    destination: int
    head: bytes


def segments(path: Path) -> Iterator[Segment]:
    """The TCP segments with payload of a pcap file (not pcapng), in capture order."""
    data = path.read_bytes()
    if len(data) < 24:
        raise ValueError(f"{path}: not a pcap file (too short)")
    magic = data[:4]
    formats = {
        b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
        b"\xa1\xb2\xc3\xd4": (">", 1e-6),
        b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
        b"\xa1\xb2\x3c\x4d": (">", 1e-9),
    }
    if magic not in formats:
        raise ValueError(f"{path}: not a pcap file (pcapng is not read: tcpdump -w writes pcap)")
    order, unit = formats[magic]
    (link,) = struct.unpack_from(order + "I", data, 20)
    if link not in _LINK_HEADER:
        raise ValueError(f"{path}: link type {link} is not read (capture on lo or any)")
    skip = _LINK_HEADER[link]
    record = struct.Struct(order + "IIII")
    offset = 24
    while offset + 16 <= len(data):
        seconds, fraction, kept, _ = record.unpack_from(data, offset)
        offset += 16
        packet = data[offset + skip : offset + kept]
        offset += kept
        if not packet:
            continue
        version = packet[0] >> 4
        if version == 4:
            if packet[9] != 6:  # not TCP
                continue
            tcp = packet[(packet[0] & 15) * 4 :]
        elif version == 6:
            if packet[6] != 6:  # not TCP, or behind extension headers
                continue
            tcp = packet[40:]
        else:
            continue
        if len(tcp) < 20:
            continue
        source, destination = struct.unpack_from(">HH", tcp)
        head = tcp[(tcp[12] >> 4) * 4 :]
        if head:
            yield Segment(seconds + fraction * unit, source, destination, head)


@dataclass
class Traffic:
    """What a capture holds, read per connection (the client's port names it)."""

    requests: list[tuple[float, float]] = field(default_factory=list)  # (sent, latency)
    answers: list[float] = field(default_factory=list)
    queries: list[tuple[float, float]] = field(default_factory=list)  # database (sent, rtt)
    unanswered: int = 0


def read_traffic(path: Path, port: int, database_port: int | None) -> Traffic:
    traffic = Traffic()
    waiting: defaultdict[int, deque[float]] = defaultdict(deque)
    asked: dict[int, float] = {}
    for segment in segments(path):
        if segment.destination == port and segment.head.startswith(_METHODS):
            waiting[segment.source].append(segment.at)
        elif segment.source == port and segment.head.startswith(b"HTTP/1."):
            traffic.answers.append(segment.at)
            queue = waiting.get(segment.destination)
            if queue:
                sent = queue.popleft()
                traffic.requests.append((sent, segment.at - sent))
        elif database_port is not None and segment.destination == database_port:
            asked.setdefault(segment.source, segment.at)
        elif (
            database_port is not None
            and segment.source == database_port
            and segment.destination in asked
        ):
            sent = asked.pop(segment.destination)
            traffic.queries.append((sent, segment.at - sent))
    traffic.unanswered = sum(len(q) for q in waiting.values())
    traffic.requests.sort()
    return traffic


def quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


@dataclass(frozen=True, slots=True)
class Run:
    """A thread on a CPU from ``start`` to ``end``, leaving in ``state`` (R: preempted,
    S: asleep, D: waiting for a disk)."""

    thread: int
    name: str
    start: float
    end: float
    state: str


_THREAD_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
"""A name ``--client`` takes (the kernel keeps 15 characters of a thread's name); it goes
into a tracefs filter."""
_SWITCH = re.compile(
    r"\s(\d+\.\d+): sched_switch: prev_comm=(.+?) prev_pid=(\d+) prev_prio=\d+ "
    r"prev_state=(\S+) ==> next_comm=(.+?) next_pid=(\d+)"
)


class SchedTrace:
    """The kernel's ``sched_switch`` events of one process's threads and of the threads
    named ``clients`` (the load's), while a capture runs (tracefs; the trace clock is made
    ``mono`` and shifted to the capture's wall clock)."""

    def __init__(self, pid: int, clients: tuple[str, ...] = ("wrk",)) -> None:
        if not (TRACEFS / "trace").exists():
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=False)
        if not (TRACEFS / "trace").exists():
            raise SystemExit("--pid needs tracefs (/sys/kernel/tracing) and root")
        self.threads = {int(t.name): (t / "comm").read_text().strip() for t in _tasks(pid)}
        bad = [c for c in clients if not _THREAD_NAME.fullmatch(c)]
        if bad:
            raise SystemExit(f"--client {bad[0]!r}: a thread name is 1-15 of A-Z a-z 0-9 _ . -")
        self.clients = clients
        self.saved: dict[str, str] = {}
        self.shift = 0.0

    def _write(self, name: str, value: str) -> None:
        (TRACEFS / name).write_text(value)

    def start(self) -> None:
        # What is changed here is put back in stop(): other users of tracefs keep theirs.
        clock = (TRACEFS / "trace_clock").read_text()
        self.saved = {
            "trace_clock": clock[clock.index("[") + 1 : clock.index("]")],
            "buffer_size_kb": (TRACEFS / "buffer_size_kb").read_text().split()[0],
        }
        self._write("tracing_on", "0")
        self._write("trace", "")
        self._write("trace_clock", "mono")
        self._write("buffer_size_kb", "32768")
        wanted = " || ".join(
            [f"prev_pid == {t} || next_pid == {t}" for t in sorted(self.threads)]
            + [f'prev_comm == "{c}" || next_comm == "{c}"' for c in self.clients]
        )
        self._write("events/sched/sched_switch/filter", wanted)
        self._write("events/sched/sched_switch/enable", "1")
        self.shift = time.time() - time.monotonic()
        self._write("tracing_on", "1")

    def stop(self) -> list[Run]:
        self._write("tracing_on", "0")
        self._write("events/sched/sched_switch/enable", "0")
        self._write("events/sched/sched_switch/filter", "0")
        text = (TRACEFS / "trace").read_text()
        self._write("trace", "")
        for name, value in self.saved.items():
            self._write(name, value)
        began: dict[int, float] = {}
        runs: list[Run] = []
        for line in text.splitlines():
            match = _SWITCH.search(line)
            if match is None:
                continue
            at = float(match[1]) + self.shift
            previous, following = int(match[3]), int(match[6])
            if previous in began:
                runs.append(Run(previous, match[2], began.pop(previous), at, match[4].rstrip("+")))
            if following in self.threads or match[5] in self.clients:
                began[following] = at
        return runs


def off_cpu(runs: list[Run], threads: set[int], start: float, end: float) -> dict[str, float]:
    """Time ``threads`` spent off a CPU between ``start`` and ``end`` (summed), by the
    state each left its last run in (R: preempted, so waiting for a CPU; S: asleep; D:
    waiting for a disk)."""
    waited = {"R": 0.0, "S": 0.0, "D": 0.0}
    for thread in threads:
        own = sorted((r for r in runs if r.thread == thread), key=lambda r: r.start)
        for before, after in zip(own, own[1:], strict=False):
            a, b = max(before.end, start), min(after.start, end)
            if b > a:
                key = before.state[:1] if before.state[:1] in waited else "S"
                waited[key] += b - a
    return waited


def _tasks(pid: int) -> list[Path]:
    return [p for p in Path(f"/proc/{pid}/task").iterdir() if p.name.isdigit()]


def capture(args: argparse.Namespace, pcap: Path, trace: SchedTrace | None) -> list[Run] | None:
    """Capture into ``pcap`` while the command runs (or for ``--seconds``); the threads'
    runs meanwhile if ``trace``."""
    ensure_tcpdump()
    ports = f"tcp port {args.port}"
    if args.database_port:
        ports += f" or tcp port {args.database_port}"
    argv = ["tcpdump", "-i", args.interface, "-s", str(SNAPLEN), "-w", str(pcap), "-U"]
    argv += ["--time-stamp-precision=nano", ports]
    dump = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # tcpdump opens the interface
    if dump.poll() is not None:
        raise SystemExit(f"tcpdump failed: {dump.stderr.read().strip() if dump.stderr else ''}")
    if trace is not None:
        trace.start()
    try:
        if args.command:
            done = subprocess.run(args.command, check=False)
            if done.returncode:
                print(f"the command exited {done.returncode}", file=sys.stderr)
        else:
            time.sleep(args.seconds)
    finally:
        runs = trace.stop() if trace is not None else None
        dump.send_signal(signal.SIGINT)
        _, said = dump.communicate(timeout=30)
    dropped = re.search(r"(\d+) packets dropped by kernel", said or "")
    if dropped and int(dropped[1]):
        print(f"tcpdump: {dropped[1]} packets dropped by the kernel", file=sys.stderr)
    return runs


def ensure_tcpdump() -> None:
    if shutil.which("tcpdump"):
        return
    if os.geteuid() != 0:
        raise SystemExit("tcpdump is missing: install it (sudo apt-get install -y tcpdump)")
    print("tcpdump is missing: apt-get install -y tcpdump", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-qq", "tcpdump"], check=True, stdout=sys.stderr)


def report(traffic: Traffic, args: argparse.Namespace, runs: list[Run] | None) -> None:
    requests = traffic.requests
    if not requests:
        raise SystemExit(f"no answered request on port {args.port} in the capture")
    span = requests[-1][0] - requests[0][0] or 1e-9
    latencies = sorted(latency for _, latency in requests)
    mean = statistics.fmean(latencies)
    rate = len(requests) / span
    print(
        f"requests: {len(requests):,} answered in {span:.1f} s ({rate:,.0f} a second), "
        f"{traffic.unanswered} unanswered at the end"
    )
    print(
        "  latency ms: mean {} p50 {} p90 {} p99 {} p999 {} max {}".format(
            ms(mean),
            *(ms(quantile(latencies, q)) for q in (0.5, 0.9, 0.99, 0.999)),
            ms(latencies[-1]),
        )
    )
    print(f"  in flight (Little: mean latency x rate): {mean * rate:.1f}")

    answers = traffic.answers
    bursts: list[list[float]] = [[answers[0]]]
    for at in answers[1:]:
        if at - bursts[-1][-1] > args.burst_gap / 1e3:
            bursts.append([at])
        else:
            bursts[-1].append(at)
    sizes = [len(b) for b in bursts]
    intervals = sorted(b[0] - a[0] for a, b in zip(bursts, bursts[1:], strict=False))
    print(
        f"answers in bursts (gaps over {args.burst_gap} ms): {len(bursts):,} bursts, "
        f"size median {statistics.median(sizes):g}, mean {statistics.fmean(sizes):.1f}"
    )
    if intervals:
        print(
            "  burst to burst ms: median {} p90 {} p99 {} max {}".format(
                *(ms(quantile(intervals, q)) for q in (0.5, 0.9, 0.99)), ms(intervals[-1])
            )
        )

    queries = sorted(traffic.queries)
    if queries:
        trips = sorted(rtt for _, rtt in queries)
        print(
            f"database round trips: {len(trips):,}; ms median {ms(quantile(trips, 0.5))} "
            f"p90 {ms(quantile(trips, 0.9))} p99 {ms(quantile(trips, 0.99))} max {ms(trips[-1])}"
        )

    threshold = quantile(latencies, 0.99)
    episodes: list[list[float]] = []  # [first start, last start, count, worst]
    for sent, latency in requests:
        if latency < threshold:
            continue
        if episodes and sent - episodes[-1][1] < 0.05:
            episode = episodes[-1]
            episode[1], episode[2], episode[3] = sent, episode[2] + 1, max(episode[3], latency)
        else:
            episodes.append([sent, sent, 1, latency])
    counts = sorted(int(e[2]) for e in episodes)
    print(
        f"slow requests (>= p99, {ms(threshold)} ms): {sum(counts):,} in {len(episodes)} "
        f"episodes; requests an episode median {statistics.median(counts):g}, "
        f"most {counts[-1]}; worst episode {ms(max(e[3] for e in episodes))} ms"
    )

    start = requests[0][0]
    clients = {r.thread for r in runs or () if r.name in args.client}
    gaps = sorted(((b - a, a) for a, b in zip(answers, answers[1:], strict=False)), reverse=True)[
        : args.silences
    ]
    query_starts = [sent for sent, _ in queries]
    print("longest silences (no answer), at seconds into the capture:")
    for length, at in gaps:
        end = at + length
        first = bisect.bisect_left(query_starts, at - 0.05)
        overlapping = [
            (sent, rtt) for sent, rtt in queries[first:] if sent < end and sent + rtt > at
        ]
        said = ", ".join(f"{ms(rtt)} from {ms(sent - at)}" for sent, rtt in overlapping)
        print(f"  {ms(length)} ms at {at - start:.3f} s; database round trips: {said or 'none'}")
        if runs is not None:
            on_cpu: defaultdict[tuple[int, str], float] = defaultdict(float)
            for run in runs:
                if run.end > at and run.start < end:
                    on_cpu[(run.thread, run.name)] += min(run.end, end) - max(run.start, at)
            busy = ", ".join(
                f"{name} {thread} {ms(seconds)}"
                for (thread, name), seconds in sorted(on_cpu.items(), key=lambda kv: -kv[1])
            )
            print(f"    on a CPU meanwhile (ms): {busy or 'no thread of the process'}")
            waited = off_cpu(runs, {args.pid}, at, end)
            print(
                f"    service main thread off a CPU (ms): {ms(waited['R'])} runnable (waiting "
                f"for a CPU), {ms(waited['S'])} asleep (for the GIL, a lock or nothing to "
                f"do), {ms(waited['D'])} waiting for a disk"
            )
            load = off_cpu(runs, clients, at, end)
            print(
                f"    load threads ({', '.join(args.client)}) waiting for a CPU (ms): {ms(load['R'])}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True, help="the service's port")
    parser.add_argument(
        "--database-port",
        type=int,
        default=5432,
        help="the database's port, for its round trips (0: none)",
    )
    parser.add_argument("--interface", default="lo", help="where to capture (default lo)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="capture length without a command"
    )
    parser.add_argument("--read", type=Path, help="read this pcap instead of capturing")
    parser.add_argument("--keep", type=Path, help="keep the capture in this file")
    parser.add_argument("--pid", type=int, help="the service process: its threads' CPU in silences")
    parser.add_argument(
        "--client",
        action="append",
        default=None,
        help="with --pid, the load's thread name, also traced (default wrk; repeatable)",
    )
    parser.add_argument(
        "--burst-gap", type=float, default=0.5, help="ms between answers that ends a burst"
    )
    parser.add_argument("--silences", type=int, default=8, help="how many silences to show")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the load to run")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if args.read and (args.command or args.pid):
        parser.error("--read reads a capture: no command and no --pid")
    args.client = args.client or ["wrk"]
    runs = None
    database_port = args.database_port or None
    if args.read:
        try:
            traffic = read_traffic(args.read, args.port, database_port)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--read: {exc}") from None
    else:
        if os.geteuid() != 0:
            parser.error("capturing needs root (tcpdump); --read reads a capture")
        trace = SchedTrace(args.pid, tuple(args.client)) if args.pid else None
        with contextlib.ExitStack() as stack:
            if args.keep:
                pcap = args.keep
            else:
                folder = stack.enter_context(tempfile.TemporaryDirectory())
                pcap = Path(folder) / "wire.pcap"
            runs = capture(args, pcap, trace)
            traffic = read_traffic(pcap, args.port, database_port)
    report(traffic, args, runs)


if __name__ == "__main__":
    main()
