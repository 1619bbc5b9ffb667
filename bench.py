"""Benchmark qabel_rest against a bare http.server baseline doing the same work, in one run.

    python3 bench.py                          # defaults: wrk if installed, 5 rounds of 3 s
    python3 bench.py --module /path/to/qabel_rest.py --rounds 3 --client python

At the start the module (default: the qabel_rest.py beside this file) is copied into a
temp dir, and that copy is what runs and is imported, so edits made during the run do
not mix into the figures. The baseline ("bare") is a ThreadingHTTPServer with HTTP/1.1
keep-alive and TCP_NODELAY that serves cached JSON bytes and stores PUTs in memory under
a lock: no auth, no validation, no disk. It runs as its own small process that imports
only what it needs. qabel_rest runs as its own process with a temp data dir and fsyncs
every PUT before answering. Both serve the same document and answer GET /synced with the
same bytes (checked). Load comes from wrk when installed, else from a built-in
multi-threaded keep-alive client; the two servers are measured in turn, round after
round, and each one's median counts. Absolute numbers drift; the ratios of one run hold.

Printed, each with its goal and whether it held (and, for each load, the CPU time each
server process used per request, from /proc):
  - GET /synced, 3.7 KB document: qabel_rest / bare throughput        goal >= 0.90
  - PUT one key (qabel_rest fsyncs, bare keeps it in memory): ratio   goal >= 0.50
  - GET /synced, 1 MB document: ratio                                 goal >= 0.90
  - import cost over http.server: cumulative us of qabel_rest in      goal <= 10 ms
    `python -X importtime -c "import http.server, qabel_rest"`, median of 15 runs,
    bytecode compiled first (as shared/checks/design_card.py measures it)
  - RSS of the ready, idle qabel_rest process minus that of the bare  goal <= 4 MB
    one, each after a warm-up request, with the 3.7 KB document: run as a script
    (compiled from source at every start) and as `python -m qabel_rest` (from its .pyc)
  - PUT -> event latency with 100 waiters (long-polls of GET /events): goal p50 <= 5 ms,
    from a PUT's 200 read to a follower's answer with its event read,  p99 <= 50 ms
    each PUT sent once the server is idle, so that 101 requests wait in it; then the same
    with each PUT sent as soon as the 101 polls are re-sent, no goal (the server may still be
    reading them)
  - GET /synced throughput with 100 waiters / without, alternating     goal >= 0.90
    (both on the 3.7 KB qabel_rest process, after its figures; not with --skip-feed)
"""

import argparse
import contextlib
import hashlib
import json
import os
import py_compile
import re
import selectors
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KEY = "bench-key-0123456789abcdef0123456789abcdef"
GOALS = {"GET 3.7KB": 0.90, "PUT 3.7KB": 0.50, "GET 1MB": 0.90}
IMPORT_GOAL_MS = 10
RSS_GOAL_MB = 4
FEED_GOALS_MS = (5, 50)  # p50, p99 of PUT -> event with 100 waiters
FEED_GET_GOAL = 0.90


def sample_synced(n_identities=4):
    """A realistic synced document (the one of shared/bench/sample_docs.py)."""
    key = "A" * 64
    stamp = {"updated": 1700000000, "created": 1700000000, "deleted": 0}
    return {
        "accounts": [{"id": 1, **stamp, "provider": "qabel.de", "user": "alice",
                      "auth": "tok-" + "x" * 30}],
        "drop_servers": [{"id": i, **stamp, "url": f"https://drop{i}.qabel.de/", "auth": "",
                          "active": True} for i in range(2)],
        "storage_servers": [{"id": 1, **stamp, "url": "https://storage.qabel.de/", "auth": ""}],
        "storage_volumes": [{"id": 1, **stamp, "storage_server_id": 1,
                             "public_identifier": "vol-1", "token": "t" * 32,
                             "revoke_token": "r" * 32}],
        "identities": [{"id": i, **stamp, "alias": f"alice-{i}",
                        "keys": {k: key for k in (
                            "private_primary_key", "public_primary_key", "private_enc_key",
                            "public_enc_key", "private_sign_key", "public_sign_key")},
                        "drops": [f"https://drop0.qabel.de/{'d' * 43}"]}
                       for i in range(n_identities)],
        "module_data": {},
    }


def dump(document):
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


# The bare baseline, run as: python -c BARE_SERVER DOCFILE. Its own process with only
# its own imports, so that its RSS is that of a bare server, not of this script.
BARE_SERVER = r'''
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def dump(document):
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()

with open(sys.argv[1], "rb") as f:
    DOC = json.loads(f.read())
LOCK = threading.Lock()
BODY = [dump(DOC)]

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def _send(self, code, data):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, BODY[0])

    def do_PUT(self):
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with LOCK:
            DOC["module_data"][request["key"]] = request["value"]
            BODY[0] = dump(DOC)
        self._send(200, b'{"ok":true}')

ThreadingHTTPServer.daemon_threads = True
server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"bare listening on {server.server_address[1]}", flush=True)
server.serve_forever()
'''


# ---------------------------------------------------------------------------
# Servers and clients
# ---------------------------------------------------------------------------

def start(args, pattern, cwd):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd)
    line = proc.stdout.readline().decode()
    match = re.search(pattern, line)
    if not match:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(match.group(1))


def http_get(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {KEY}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


WRK_PUT = """
counter = 0
request = function()
  counter = counter + 1
  local body = '{"key":"module_data.bench","value":{"n":' .. counter .. '}}'
  return wrk.format("PUT", "/synced", {["Content-Type"]="application/json",
                    ["X-API-Key"]="%s", ["Host"]="localhost"}, body)
end
""" % KEY
WRK_GET = """
wrk.headers["X-API-Key"] = "%s"
wrk.headers["Host"] = "localhost"
""" % KEY


def load_wrk(port, method, seconds, connections, scratch):
    script = os.path.join(scratch, f"{method}.lua")
    with open(script, "w") as f:
        f.write(WRK_PUT if method == "PUT" else WRK_GET)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-s", script,
                          f"http://127.0.0.1:{port}/synced"],
                         capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*", out)
    if bad or errors:
        raise SystemExit(f"wrk saw failures:\n{out}")
    return rate


def load_python(port, method, seconds, connections, scratch):
    """A keep-alive client per thread; counts answered requests (every one a 200)."""
    counts = [0] * connections
    failures = []
    deadline = time.monotonic() + seconds

    def worker(index):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        reader = sock.makefile("rb")
        n = 0
        while time.monotonic() < deadline:
            n += 1
            if method == "PUT":
                body = b'{"key":"module_data.bench","value":{"n":%d}}' % n
                request = (b"PUT /synced HTTP/1.1\r\nHost: localhost\r\nX-API-Key: %s\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                           % (KEY.encode(), len(body), body))
            else:
                request = (b"GET /synced HTTP/1.1\r\nHost: localhost\r\nX-API-Key: %s\r\n\r\n"
                           % KEY.encode())
            sock.sendall(request)
            status = reader.readline()
            length = 0
            while True:
                line = reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
            if b" 200 " not in status:
                failures.append(status)
                break
            counts[index] += 1
        sock.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(connections)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"failed responses: {failures[:3]}")
    return sum(counts) / (time.monotonic() - started)


def send(sock, method, path, body=b""):
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                 .encode() + body)


def answer(reader):
    """(status, headers with lower-case names, body) of one keep-alive answer."""
    status, headers = int(reader.readline().split()[1]), {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.lower()] = value.strip()
    return status, headers, reader.read(int(headers.get("content-length", 0)))


def connect(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=90)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    return sock, sock.makefile("rb")


class Waiters:
    """n connections that long-poll GET /events?timeout=60, re-issued with the new cursor
    after each answer, whose events and read time go to on_answer. One thread serves them
    all (a selector), so that the client's own thread switches stay out of the figure."""

    def __init__(self, port, n, on_answer=lambda events, received: None):
        self.stop, self.issued, self.changed = False, 0, threading.Condition()
        cursor = json.loads(http_get(port, "/events")[1])["cursor"]
        self.selector = selectors.DefaultSelector()
        for _ in range(n):
            sock = connect(port)[0]
            self.selector.register(sock, selectors.EVENT_READ, bytearray())
            self._issue(sock, cursor)
        self.thread = threading.Thread(target=self._run, args=(on_answer,), daemon=True)
        self.thread.start()
        self.wait_issued(n)

    def _issue(self, sock, cursor):
        send(sock, "GET", f"/events?since={cursor}&timeout=60")
        with self.changed:
            self.issued += 1
            self.changed.notify_all()

    def _run(self, on_answer):
        while self.selector.get_map():
            for key, _ in self.selector.select():
                sock, buffer = key.fileobj, key.data
                data = sock.recv(1 << 16)
                buffer += data
                head, _, body = bytes(buffer).partition(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if data and not (length and len(body) >= int(length.group(1))):
                    continue  # the rest of the answer is still on its way
                received = time.perf_counter()
                if data:  # a failure ends the connection, and wait_issued() notices
                    del buffer[:]
                    feed = json.loads(body[:int(length.group(1))])
                    on_answer(feed["events"], received)
                if data and not self.stop:
                    self._issue(sock, feed["cursor"])
                else:
                    self.selector.unregister(sock)
                    sock.close()

    def wait_issued(self, count):
        with self.changed:
            if not self.changed.wait_for(lambda: self.issued >= count, 10):
                raise SystemExit("the feed waiters stopped answering")

    def close(self, put):
        self.stop = True
        while self.thread.is_alive():
            put()  # an event answers every waiter, which then sees stop and closes
            self.thread.join(0.1)


def busy_ns(pid):
    """thread id -> ns it has spent on a CPU or runnable waiting for one, so far (Linux)."""
    times = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that has just ended
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                times[tid] = sum(map(int, f.read().split()[:2]))
    return times


def settle(pid, window=0.005, most=2.0):
    """Wait until a process's threads run or wait to run under 10% of a window (a thread that
    ended meanwhile counts for nothing, a new one for all its time); False if not within most s."""
    deadline = time.monotonic() + most
    while time.monotonic() < deadline:
        before = busy_ns(pid)
        time.sleep(window)
        after = busy_ns(pid)
        if sum(ns - before.get(tid, 0) for tid, ns in after.items()) < window * 1e9 / 10:
            return True
    return False


def feed_latencies(port, pid, put, settled, puts=200):
    """ms from reading each PUT's 200 to a follower beside 100 waiters holding its event.
    settled: before each PUT, the server has gone idle, so 101 requests wait in it (busy:
    how many PUTs went without, the server still busy after 2 s)."""
    seen, latencies, busy = {}, [], 0  # seen: etag -> when the follower had read its answer
    waiters = Waiters(port, 100)
    follower = Waiters(port, 1, lambda events, t: seen.update((e["etag"], t) for e in events))
    for i in range(puts):
        if settled and not settle(pid):
            busy += 1
        etag, done = put()
        # Each answer holds one event: wait until all 101 have re-issued their long-poll
        # (sent: unless settled, the next PUT may meet the server still taking them up).
        waiters.wait_issued(100 * (i + 2))
        follower.wait_issued(i + 2)
        # As is, not clamped at 0: negative when the follower read the event before this
        # thread had read the PUT's 200 (the event is published before the 200 is sent).
        latencies.append((seen[etag] - done) * 1000)
    waiters.close(put)
    follower.close(put)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49], cuts[98], busy


def feed_figures(port, pid, args, load, scratch):
    """p50 and p99 ms of PUT -> event with 100 waiters, the server idle before each PUT and
    then each PUT sent once the polls are re-sent; the GET /synced rates with and without
    100 waiters (medians of alternating rounds)."""
    sock, reader = connect(port)
    values = iter(range(1000, 1 << 30))  # a new poll_interval each PUT, so an event each

    def put():
        send(sock, "PUT", "/settings", b'{"key":"poll_interval","value":%d}' % next(values))
        status, headers, _ = answer(reader)
        if status != 200:
            raise SystemExit(f"PUT /settings answered {status}")
        return headers["etag"], time.perf_counter()

    latencies = feed_latencies(port, pid, put, True) + feed_latencies(port, pid, put, False)[:2]
    rates = {True: [], False: []}
    for _ in range(args.rounds):
        for waiting in (False, True):
            waiters = Waiters(port, 100 if waiting else 0)
            time.sleep(0.2)  # let the server take up the last long-polls
            rates[waiting].append(load(port, "GET", args.duration, args.connections, scratch))
            waiters.close(put)
    sock.close()
    return (*latencies, statistics.median(rates[True]), statistics.median(rates[False]))


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def cpu_seconds(pid):
    """The user and system CPU time a process has used so far (from /proc, as rss_kb)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # from the third field on: the name may
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # hold spaces


def imported_rss_kb(document, module_dir, scratch):
    """The ready RSS of qabel_rest run as `python -m qabel_rest`, so from its compiled
    module, as an app that embeds it imports it. As a script (`python qabel_rest.py`)
    CPython compiles the whole file from source every start, and keeps some of that
    memory."""
    data_dir = tempfile.mkdtemp(dir=scratch)
    with open(os.path.join(data_dir, "synced.json"), "wb") as f:
        f.write(dump(document))
    py_compile.compile(os.path.join(module_dir, "qabel_rest.py"), doraise=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    proc = subprocess.Popen([sys.executable, "-m", "qabel_rest", "--port", "0", "--data-dir",
                             data_dir, "--api-key", KEY], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=module_dir, env=env)
    try:
        port = int(re.search(r"listening on http://[^:]+:(\d+)",
                             proc.stdout.readline().decode()).group(1))
        http_get(port, "/synced")
        time.sleep(0.5)
        return rss_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def import_ms(module_dir, runs=15):
    """Median over runs of -X importtime's cumulative time of qabel_rest, in ms, with
    http.server imported first (as shared/checks/design_card.py measures it)."""
    py_compile.compile(os.path.join(module_dir, "qabel_rest.py"), doraise=True)
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    cmd = [sys.executable, "-X", "importtime", "-c", "import http.server, qabel_rest"]
    subprocess.run(cmd, cwd=module_dir, env=env, capture_output=True, check=True)  # warm-up
    times = []
    for _ in range(runs):
        err = subprocess.run(cmd, cwd=module_dir, env=env, capture_output=True, text=True,
                             check=True).stderr
        match = re.search(r"^import time:\s+\d+ \|\s+(\d+) \| qabel_rest$", err, re.M)
        times.append(int(match.group(1)) / 1000 if match else 0)
    return statistics.median(times)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def scenario(name, document, methods, args, load, module_dir, scratch, results, feed=False):
    """Start both servers on the document, check they serve the same bytes, note their
    ready RSS, then measure each method alternating the servers."""
    data_dir = os.path.join(scratch, name)
    os.mkdir(data_dir)
    doc_file = os.path.join(data_dir, "synced.json")
    with open(doc_file, "wb") as f:
        f.write(dump(document))
    bare, bare_port = start([sys.executable, "-c", BARE_SERVER, doc_file],
                            r"bare listening on (\d+)", scratch)
    qabel, qabel_port = start([sys.executable, os.path.join(module_dir, "qabel_rest.py"),
                               "--port", "0", "--data-dir", data_dir, "--api-key", KEY,
                               "--max-body", str(4 << 20)],
                              r"listening on http://[^:]+:(\d+)", module_dir)
    try:
        # the warm-up request of each server
        same = http_get(bare_port, "/synced") == http_get(qabel_port, "/synced")
        print(f"{name}: {len(dump(document)):,} bytes, same GET bytes from both: {same}",
              flush=True)
        if not same:
            raise SystemExit("the two servers do not serve the same bytes")
        time.sleep(0.5)  # let the warm-up connections' threads end
        results[f"RSS {name}"] = (rss_kb(bare.pid), rss_kb(qabel.pid), imported_rss_kb(
            document, module_dir, scratch))
        for method in methods:
            # Alternate the two servers and take each one's median: the machine's
            # speed drifts, and a drift then hits both alike.
            runs = {"bare": [], "qabel_rest": []}
            cpu = {"bare": [0.0, 0.0], "qabel_rest": [0.0, 0.0]}  # server CPU s, requests
            for _ in range(args.rounds):
                for server, proc, port in (("bare", bare, bare_port),
                                           ("qabel_rest", qabel, qabel_port)):
                    used = cpu_seconds(proc.pid)
                    rate = load(port, method, args.duration, args.connections, scratch)
                    cpu[server][0] += cpu_seconds(proc.pid) - used
                    cpu[server][1] += rate * args.duration
                    runs[server].append(rate)
            bare_rate, qabel_rate = (statistics.median(runs[s]) for s in ("bare", "qabel_rest"))
            results[f"{method} {name}"] = (bare_rate, qabel_rate)
            print(f"  {method:4s} bare {bare_rate:8,.0f} req/s   qabel_rest "
                  f"{qabel_rate:8,.0f} req/s   ratio {qabel_rate / bare_rate:.2f}   server CPU "
                  f"per request: bare {cpu['bare'][0] / cpu['bare'][1] * 1e6:,.0f} us, "
                  f"qabel_rest {cpu['qabel_rest'][0] / cpu['qabel_rest'][1] * 1e6:,.0f} us",
                  flush=True)
        if feed:  # after the figures above, so it leaves them as they were
            results["feed"] = feed_figures(qabel_port, qabel.pid, args, load, scratch)
            print("  feed PUT -> event p50 {:.2f} ms, p99 {:.2f} ms ({} PUTs found the server "
                  "busy; each PUT once the polls are re-sent: p50 {:.2f}, p99 {:.2f}); GET with "
                  "100 waiters {:,.0f} req/s, without {:,.0f} req/s".format(*results["feed"]),
                  flush=True)
    finally:
        for proc in (bare, qabel):
            proc.terminate()
            proc.wait(10)


def verdict(held):
    return "held" if held else "MISSED"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", default=os.path.join(HERE, "qabel_rest.py"),
                        help="the qabel_rest.py to benchmark (copied first; default: "
                             "%(default)s)")
    parser.add_argument("--duration", type=float, default=3, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=5,
                        help="measurements per server and request, alternating; the "
                             "median counts (%(default)s)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--skip-feed", action="store_true",
                        help="leave out the two change-feed figures")
    args = parser.parse_args()

    scratch = tempfile.mkdtemp(prefix="qabel-bench-")
    try:
        module_dir = os.path.join(scratch, "module")
        os.mkdir(module_dir)
        module = shutil.copy(args.module, os.path.join(module_dir, "qabel_rest.py"))
        with open(module, "rb") as f:
            source = f.read()
        lines = source.count(b"\n")
        use_wrk = args.client == "wrk" or args.client == "auto" and shutil.which("wrk")
        load = load_wrk if use_wrk else load_python
        print(f"command: {shlex.join([os.path.basename(sys.executable)] + sys.argv)}")
        print(f"module: {os.path.abspath(args.module)} (copied at start: "
              f"{lines} lines, sha256 {hashlib.sha256(source).hexdigest()[:12]})")
        print(f"client: {'wrk -t1' if use_wrk else 'built-in python client'}, "
              f"{args.connections} connections, median of {args.rounds} alternating runs of "
              f"{args.duration:g} s, {os.cpu_count()} cores, Python {sys.version.split()[0]}",
              flush=True)

        results = {}
        scenario("3.7KB", sample_synced(4), ("GET", "PUT"), args, load, module_dir,
                 scratch, results, feed=not args.skip_feed)
        n = 1
        while len(dump(sample_synced(n))) < 1 << 20:
            n *= 2
        while len(dump(sample_synced(n - 16))) >= 1 << 20:
            n -= 16
        scenario("1MB", sample_synced(n), ("GET",), args, load, module_dir, scratch,
                 results)
        cost = import_ms(module_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print()
    for what, label in (("GET 3.7KB", "GET /synced, 3.7 KB document"),
                        ("PUT 3.7KB", "PUT one key (qabel_rest fsyncs, bare in memory)"),
                        ("GET 1MB", "GET /synced, 1 MB document")):
        bare_rate, qabel_rate = results[what]
        ratio = qabel_rate / bare_rate
        print(f"{label:48s} bare {bare_rate:7,.0f} req/s  qabel_rest {qabel_rate:7,.0f} "
              f"req/s  ratio {ratio:.2f}  goal >= {GOALS[what]:.2f}: "
              f"{verdict(ratio >= GOALS[what])}")
    print(f"{'import qabel_rest over import http.server':48s} {cost:.1f} ms (-X importtime, "
          f"median of 15)  goal <= {IMPORT_GOAL_MS} ms: {verdict(cost <= IMPORT_GOAL_MS)}")
    bare_kb, script_kb, imported_kb = results["RSS 3.7KB"]
    for how, kb in (("python qabel_rest.py", script_kb), ("python -m qabel_rest", imported_kb)):
        extra = (kb - bare_kb) / 1024
        print(f"{'RSS ready, ' + how + ', minus bare':48s} {extra:+.1f} MB (qabel_rest "
              f"{kb / 1024:.1f} MB, bare {bare_kb / 1024:.1f} MB)  goal <= {RSS_GOAL_MB} MB: "
              f"{verdict(extra <= RSS_GOAL_MB)}")
    if "feed" in results:
        p50, p99, busy, fast_p50, fast_p99, with_, without = results["feed"]
        print(f"{'PUT -> event latency with 100 waiters':48s} p50 {p50:.2f} ms  p99 {p99:.2f} "
              f"ms  goal p50 <= {FEED_GOALS_MS[0]} ms, p99 <= {FEED_GOALS_MS[1]} ms: "
              f"{verdict(p50 <= FEED_GOALS_MS[0] and p99 <= FEED_GOALS_MS[1] and not busy)}"
              + (f" ({busy} PUTs found the server busy)" if busy else ""))
        print(f"{'  the same, each PUT once the polls are re-sent':48s} p50 {fast_p50:.2f} ms  "
              f"p99 {fast_p99:.2f} ms  no goal (the server may still be reading them)")
        print(f"{'GET /synced throughput with 100 waiters':48s} without {without:7,.0f} "
              f"req/s  with {with_:7,.0f} req/s  ratio {with_ / without:.2f}  goal >= "
              f"{FEED_GET_GOAL:.2f}: {verdict(with_ / without >= FEED_GET_GOAL)}")


if __name__ == "__main__":
    main()
