#!/usr/bin/env python3
"""scripts/bench/bench.py: the measuring half of scripts/bench.sh.

scripts/bench.sh starts PostgreSQL and Redis, initializes the pgbench databases and the
`bench_all` / `bench_big` publications, then runs this program, which:

  catchup  for each run: fresh slots created one after another (same LSN, nothing is
           written between them), a pgbench TPC-B backlog, one marker transaction, then
           pg_recvlogical (to --endpos) and pginval (bench_all, then its own publication)
           read the same backlog, one after the other, order rotated per run.
  latency  while pgbench runs single-row UPDATEs at a fixed rate, a probe sets
           acct:<aid>, updates that row and times commit returned -> key deleted (Redis
           keyevent notification on `del`) with pginval streaming; as a baseline, the
           same probe with pg_recvlogical alone times commit -> the change received.
  big      one UPDATE of 1,000,000 rows (scale 10), read by pg_recvlogical and pginval.
  bigcommit  the same UPDATE with pginval already streaming: its commit returned -> the
           last of the 1,000,000 keys gone (DBSIZE polled every millisecond), with
           `[source] streaming = false` (protocol version 1: the walsender decodes it
           all after the commit) and `true` (version 2: streamed while it runs),
           alternating which goes first.

pginval's time is process start -> the marker key deleted in Redis. The marker is a row
of pgbench_tellers outside pgbench's range, updated in its own transaction after the
backlog, so its key is in pginval's last batch; every key is pre-populated in Redis,
so pginval deletes real keys. pg_recvlogical's time is process start -> exit at
--endpos (the WAL position after the marker transaction).

CPU, peak RSS and voluntary context switches ("wakeups": how often the program blocked
waiting, e.g. for the next message) of both programs come from GNU time
(`/usr/bin/time -f '%e %U %S %M %w %c'`), which runs each of them (CPU cross-checked
with wait4() on time).
The server side (walsender) CPU is the growth of the postmaster's reaped-children time
(cutime + cstime in /proc/<postmaster>/stat) over the consumer's run, read once every
new backend has exited: autovacuum is off and the harness's own connection stays open,
so that is the walsender's CPU (for pginval, plus its short control connection).

Only psycopg2 is needed beyond the standard library; Redis is spoken to directly.
"""

import argparse
import json
import os
import random
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import time

import psycopg2

CLK_TCK = os.sysconf("SC_CLK_TCK")
GNU_TIME = os.environ.get("GNU_TIME", "/usr/bin/time")


def log(msg):
    print(f"-- {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ Redis


class Redis:
    """A minimal RESP2 client: enough for SET/EVAL/EXISTS/CONFIG pipelines."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = self.sock.makefile("rb")

    @staticmethod
    def encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if not isinstance(a, bytes):
                a = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def read(self):
        line = self.rfile.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.rfile.read(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise RuntimeError(f"redis: unexpected reply {line!r}")

    def cmd(self, *args):
        self.sock.sendall(self.encode(args))
        return self.read()

    def pipeline(self, commands, chunk=2000):
        replies = []
        for i in range(0, len(commands), chunk):
            part = commands[i : i + chunk]
            self.sock.sendall(b"".join(self.encode(c) for c in part))
            replies.extend(self.read() for _ in part)
        return replies

    def scan_all(self):
        cursor, keys = b"0", []
        while True:
            cursor, batch = self.cmd("SCAN", cursor, "COUNT", 10000)
            keys.extend(batch)
            if cursor == b"0":
                return keys

    def populate(self, prefix, first, last):
        """SET prefix<first..last> 'x' inside Redis (one Lua call, no round trips)."""
        lua = "for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do redis.call('SET', ARGV[1] .. i, 'x') end return 1"
        self.cmd("EVAL", lua, 0, prefix, first, last)


def crc16(data):
    """CRC16-XMODEM, Redis Cluster's key hash."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key):
    k = key.encode() if isinstance(key, str) else key
    start = k.find(b"{")
    if start >= 0:
        end = k.find(b"}", start + 1)
        if end > start + 1:
            k = k[start + 1 : end]
    return crc16(k) % 16384


RACE_ROWS = 1000  # rows the race's writers and readers pick from (skewed towards low ids)
RACE_READERS = 8
RACE_WRITERS = 4


class Cluster:
    """A Redis Cluster of 3 primaries with a replica each, on free ports, for the
    cluster phase; a plain connection per node, keys routed by CLUSTER SLOTS."""

    def __init__(self, work):
        self.ports = []
        while len(self.ports) < 6:
            port = free_port()
            if port < 55000 and port not in self.ports:
                try:
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", port + 10000))  # the cluster bus port
                    self.ports.append(port)
                except OSError:
                    pass
        self.procs = []
        for port in self.ports:
            d = os.path.join(work, f"cluster-{port}")
            os.makedirs(d, exist_ok=True)
            self.procs.append(Proc(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--cluster-enabled", "yes", "--dir", d,
                                    "--cluster-config-file", "nodes.conf"],
                                   logfile=os.path.join(d, "redis.log"), timefile=os.path.join(d, "redis.time")))
        for port in self.ports:
            deadline = time.time() + 10
            while True:
                try:
                    Redis("127.0.0.1", port).cmd("PING")
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"cluster node {port} did not start")
                    time.sleep(0.05)
        out = subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                              "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
        deadline = time.time() + 60
        while True:
            infos = [Redis("127.0.0.1", p).cmd("CLUSTER", "INFO") for p in self.ports]
            if all(b"cluster_state:ok" in i for i in infos) and self.load_slots() == 3:
                break
            if time.time() > deadline:
                raise RuntimeError("the cluster did not become ok")
            time.sleep(0.2)
        self.conns = {p: Redis("127.0.0.1", p) for p in set(self.owners)}
        for p in self.ports:
            Redis("127.0.0.1", p).cmd("CONFIG", "SET", "notify-keyspace-events", "Kg")

    def load_slots(self):
        """Reads the slot map; returns how many primaries serve slots."""
        self.owners = [None] * 16384
        for entry in Redis("127.0.0.1", self.ports[0]).cmd("CLUSTER", "SLOTS"):
            for slot in range(entry[0], entry[1] + 1):
                self.owners[slot] = entry[2][1]
        return len(set(self.owners)) if None not in self.owners else 0

    def url(self):
        return f"redis://127.0.0.1:{self.ports[0]}"

    def redis_section(self):
        nodes = ", ".join(f'"127.0.0.1:{p}"' for p in self.ports[1:])
        return f"cluster = true\nnodes = [{nodes}]\n"

    def owner(self, key):
        return self.owners[key_slot(key)]

    def flushall(self):
        for c in self.conns.values():
            c.cmd("FLUSHALL")

    def by_node(self, keys):
        groups = {}
        for k in keys:
            groups.setdefault(self.owner(k), []).append(k)
        return groups

    def populate(self, prefix, first, last):
        for port, keys in self.by_node([f"{prefix}{i}" for i in range(first, last + 1)]).items():
            self.conns[port].pipeline([["SET", k, "x"] for k in keys])

    def existing(self, keys):
        left = []
        for port, ks in self.by_node(keys).items():
            left += [k for k, e in zip(ks, self.conns[port].pipeline([["EXISTS", k] for k in ks])) if e]
        return left


class Watcher:
    """Reads a byte stream (a socket, a pipe); wait_for() returns the moment a pattern
    has arrived. Bytes before a match are dropped."""

    def __init__(self, fd):
        self.fd = fd
        self.buf = b""

    def wait_for(self, pat, timeout, alive=None):
        """perf_counter() once `pat` is in the stream, None after `timeout` seconds (or
        as soon as alive() is false)."""
        deadline = time.perf_counter() + timeout
        while True:
            i = self.buf.find(pat)
            if i >= 0:
                now = time.perf_counter()
                self.buf = self.buf[i + len(pat) :]
                return now
            self.buf = self.buf[-len(pat) :]  # a match may straddle two reads
            left = deadline - time.perf_counter()
            if left <= 0 or (alive is not None and not alive()):
                return None
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.1))
            if not ready:
                continue
            data = os.read(self.fd, 1 << 20)
            if not data:
                raise ConnectionError("the stream ended")
            self.buf += data

    def drain(self, secs, keep=64):
        """Reads and drops whatever arrives for `secs` seconds (so a pipe never fills
        and blocks its writer); False once the stream has ended."""
        deadline = time.perf_counter() + secs
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return True
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                data = os.read(self.fd, 1 << 20)
                if not data:
                    return False
                self.buf = (self.buf + data)[-keep:]


class Subscriber(Watcher):
    """A raw Redis SUBSCRIBE connection."""

    def __init__(self, host, port, channel):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(Redis.encode([b"SUBSCRIBE", channel.encode()]))
        super().__init__(self.sock.fileno())
        # The confirmation: *3 $9 subscribe $<n> channel :1
        if self.wait_for(b"subscribe\r\n", 10) is None or self.wait_for(b":1\r\n", 10) is None:
            raise RuntimeError("redis did not confirm SUBSCRIBE")

    def wait_for_key(self, key, timeout, alive=None):
        """When a message naming `key` (a keyevent notification) has arrived."""
        return self.wait_for(b"\r\n" + key + b"\r\n", timeout, alive)

    def close(self):
        self.sock.close()


# ------------------------------------------------------------------------- processes


LIVE = []  # Procs not yet reaped; stopped on exit


def stop_all():
    for p in list(LIVE):
        try:
            p.kill(signal.SIGKILL)
            p.wait(10)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class Proc:
    """A program run under GNU time (`/usr/bin/time -f '%e %U %S %M %w %c'`).

    The measured program is a child of `time`, not of this Python process: a direct
    child's peak RSS would include the Python parent's pages it was forked with. `pid`
    is the program's own pid (signals go there); user+sys CPU and peak RSS are read
    from time's report; CPU is cross-checked with wait4() on `time` (which covers its
    reaped child)."""

    def __init__(self, argv, logfile=None, env=None, timefile=None, stdout=None, stderr_log=None):
        self.argv = argv
        self.timefile = timefile
        out = open(logfile, "ab") if logfile else (stdout or subprocess.DEVNULL)
        self.t0 = time.perf_counter()
        err = open(stderr_log, "ab") if stderr_log else subprocess.STDOUT
        self.p = subprocess.Popen([GNU_TIME, "-f", "%e %U %S %M %w %c", "-o", timefile, "--"] + argv,
                                  stdout=out, stderr=err, env=env)
        if logfile:
            out.close()
        if stderr_log:
            err.close()
        self.status = None
        self.rusage = None
        self.t_exit = None
        self.times = None
        LIVE.append(self)
        self.pid = None
        deadline = time.perf_counter() + 5
        while self.pid is None and time.perf_counter() < deadline:
            try:
                with open(f"/proc/{self.p.pid}/task/{self.p.pid}/children") as f:
                    kids = f.read().split()
            except OSError:
                kids = []
            if kids:
                self.pid = int(kids[0])
            elif not self.alive():
                break
            else:
                time.sleep(0.0005)
        if self.pid is None:
            self.wait(5)
            raise RuntimeError(f"could not start {argv[0]} under {GNU_TIME} (status {self.status})")

    def alive(self):
        if self.status is not None:
            return False
        pid, status, ru = os.wait4(self.p.pid, os.WNOHANG)
        if pid == 0:
            return True
        self._reaped(status, ru)
        return False

    def _reaped(self, status, ru):
        self.t_exit = time.perf_counter()
        self.status = os.waitstatus_to_exitcode(status)
        self.rusage = ru
        self.p.returncode = self.status
        if self in LIVE:
            LIVE.remove(self)
        try:
            with open(self.timefile) as f:
                last = f.read().strip().splitlines()[-1].split()
            self.times = {"elapsed": float(last[0]), "user": float(last[1]), "sys": float(last[2]), "maxrss_kb": int(last[3]),
                          "voluntary_switches": int(last[4]), "involuntary_switches": int(last[5])}
        except (OSError, IndexError, ValueError):
            self.times = None

    def wait(self, timeout):
        deadline = time.perf_counter() + timeout
        while self.alive():
            if time.perf_counter() > deadline:
                return None
            time.sleep(0.001)
        return self.status

    def kill(self, sig):
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout=15, sig=signal.SIGTERM):
        self.kill(sig)
        if self.wait(timeout) is None:
            self.kill(signal.SIGKILL)
            self.wait(10)
            raise RuntimeError(f"{self.argv[0]} did not stop within {timeout} s of SIGTERM")
        return self.status

    def cpu(self):
        if self.times:
            return self.times["user"] + self.times["sys"]
        return self.rusage.ru_utime + self.rusage.ru_stime

    def rss_mb(self):
        if self.times:
            return self.times["maxrss_kb"] / 1024
        return self.rusage.ru_maxrss / 1024  # KiB on Linux

    def proc_cpu(self):
        """user+sys seconds so far, from /proc (while running)."""
        with open(f"/proc/{self.pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK_TCK

    def usage(self):
        """CPU, RSS and wait4's view of them (a cross-check of time's report)."""
        return {
            "cpu_s": self.cpu(),
            "user_s": self.times["user"] if self.times else self.rusage.ru_utime,
            "sys_s": self.times["sys"] if self.times else self.rusage.ru_stime,
            "rss_mb": self.rss_mb(),
            "wakeups": self.times["voluntary_switches"] if self.times else self.rusage.ru_nvcsw,
            "preempted": self.times["involuntary_switches"] if self.times else self.rusage.ru_nivcsw,
            # wait4() on time covers its reaped child: a cross-check of time's CPU figure.
            # (Not of RSS: time's own peak, taken over from Python when it forked, is larger.)
            "wait4_cpu_s": self.rusage.ru_utime + self.rusage.ru_stime,
        }


# ------------------------------------------------------------------------------ bench


READ_TO_INVALIDATION = "pginval_read_to_invalidation_seconds"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_histogram(port, name):
    """The cumulative buckets [(upper bound, count)] of histogram `name` on pginval's /metrics."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    buckets = []
    for line in body.decode().splitlines():
        m = re.match(rf'{name}_bucket\{{le="([^"]+)"\}} (\S+)', line)
        if m:
            buckets.append((float(m.group(1)), float(m.group(2))))
    return buckets


def histogram_diff(after, before):
    before = dict(before)
    return [(le, n - before.get(le, 0)) for le, n in after]


def histogram_quantile(buckets, q):
    """The upper bound of the bucket holding quantile q (cumulative buckets)."""
    total = buckets[-1][1] if buckets else 0
    if not total:
        return float("nan")
    for le, n in buckets:
        if n >= q * total:
            return le
    return float("inf")


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Bench:
    def __init__(self, a):
        self.a = a
        self.bindir = a.pg_bindir
        self.results = {"config": vars(a).copy()}
        self.redis = Redis("127.0.0.1", a.redis_port)
        self.redis_url = f"redis://127.0.0.1:{a.redis_port}/0"
        with open(os.path.join(a.pg_data, "postmaster.pid")) as f:
            self.postmaster = int(f.readline())
        self.warnings = []  # suspicious things seen, for the summary
        self.profiles = {}  # --perf: top symbols of one profiled pginval run per kind
        self.seq = 0

    # -- PostgreSQL helpers

    def dsn(self, db):
        return f"host=127.0.0.1 port={self.a.pg_port} user=postgres dbname={db}"

    def url(self, db):
        return f"postgres://postgres@127.0.0.1:{self.a.pg_port}/{db}"

    def connect(self, db):
        c = psycopg2.connect(self.dsn(db))
        c.autocommit = True
        return c

    @staticmethod
    def q(conn, sql, args=None):
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else None

    def q1(self, conn, sql, args=None):
        return self.q(conn, sql, args)[0][0]

    def reset_slots(self, conn, names):
        for name in names:
            self.wait_slot_inactive(conn, name)
            self.q(conn, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (name,))

    def wait_slot_inactive(self, conn, slot, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            rows = self.q(conn, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            if not rows or not rows[0][0]:
                return
            time.sleep(0.01)
        raise RuntimeError(f"slot {slot} still active after {timeout} s")

    def children(self):
        try:
            with open(f"/proc/{self.postmaster}/task/{self.postmaster}/children") as f:
                return set(f.read().split())
        except OSError:
            return None

    def reaped_ticks(self):
        with open(f"/proc/{self.postmaster}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[13]) + int(rest[14])  # cutime + cstime

    def ticks(self, pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            return int(rest[11]) + int(rest[12])
        except OSError:
            return 0

    def cpu_sample(self):
        """(machine busy, machine steal, this benchmark's processes) CPU seconds so far.

        Ours: this Python process and its reaped children (pgbench, time and what it
        ran), live consumers, the PostgreSQL server (postmaster, live backends, reaped
        backends) and redis-server. The difference in busy time is what other programs
        on the machine used meanwhile: a noise indicator on a shared machine."""
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
        steal = v[7]
        t = os.times()
        ours = (t.user + t.system + t.children_user + t.children_system) * CLK_TCK
        ours += sum(self.ticks(p.pid) for p in list(LIVE))
        ours += self.reaped_ticks() + self.ticks(self.postmaster)
        ours += sum(self.ticks(pid) for pid in (self.children() or ()))
        ours += self.ticks(self.a.redis_pid)
        return busy / CLK_TCK, steal / CLK_TCK, ours / CLK_TCK

    def other_cpu(self, begin):
        end = self.cpu_sample()
        busy, steal, ours = (e - b for e, b in zip(end, begin))
        return {"other_cpu_s": max(0.0, busy - steal - ours), "steal_s": steal, "busy_s": busy}

    def server_cpu_begin(self):
        return (self.children(), self.reaped_ticks())

    def server_cpu_end(self, begin, conn, slot):
        """Server CPU (s) of the backends that started and ended since `begin`."""
        kids, ticks = begin
        self.wait_slot_inactive(conn, slot)
        deadline = time.time() + 10
        while kids is not None and time.time() < deadline:
            now = self.children()
            if now is None or now <= kids:
                break
            time.sleep(0.005)
        else:
            time.sleep(0.2)
        return (self.reaped_ticks() - ticks) / CLK_TCK

    # -- consumers

    def pg_recvlogical(self, db, slot, publication, end_lsn, conn):
        meter = self.cpu_sample()
        begin = self.server_cpu_begin()
        p = Proc(
            [
                os.path.join(self.bindir, "pg_recvlogical"),
                "-d", self.dsn(db), "--start", "-S", slot, "--no-loop",
                "-o", "proto_version=1", "-o", f"publication_names={publication}",
                "-f", "/dev/null", f"--endpos={end_lsn}",
            ],
            logfile=os.path.join(self.a.work, "pg_recvlogical.log"),
            timefile=os.path.join(self.a.work, "pg_recvlogical.time"),
        )
        if p.wait(600) is None:
            p.stop()
            raise RuntimeError("pg_recvlogical did not reach --endpos within 600 s")
        if p.status != 0:
            raise RuntimeError(f"pg_recvlogical exited with {p.status} (see {self.a.work}/pg_recvlogical.log)")
        wall = p.t_exit - p.t0
        server = self.server_cpu_end(begin, conn, slot)
        return {"wall_s": wall, **p.usage(), "walsender_cpu_s": server, **self.other_cpu(meter)}

    def pginval_config(self, name, slot, publication, max_keys=None, metrics_port=None, amqp_exchange=None, redis_extra="",
                       source_extra="", rule_extra=""):
        path = os.path.join(self.a.work, f"{name}.toml")
        limits = f"[limits]\nmax_keys_per_transaction = {max_keys}\n\n" if max_keys else ""
        if redis_extra:
            limits += f"[redis]\n{redis_extra}\n"
        if metrics_port:
            limits += f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n\n'
        entity = ""
        if amqp_exchange:
            limits += f'[events.amqp]\nurl = "{self.a.amqp_url}"\nexchange = "{amqp_exchange}"\n\n'
            entity = 'entity = "account"\n'
        with open(path, "w") as f:
            f.write(
                # column_lists: the publication pginval creates carries only the rules' columns.
                f'[source]\nslot = "{slot}"\npublication = "{publication}"\ncolumn_lists = true\n{source_extra}\n{limits}'
                f'[[rules]]\ntable = "pgbench_accounts"\nkeys = ["acct:{{aid}}"]\n{entity}{rule_extra}\n'
                f'[[rules]]\ntable = "pgbench_tellers"\nkeys = ["teller:{{tid}}"]\n{rule_extra}\n'
                f'[[rules]]\ntable = "pgbench_branches"\nkeys = ["branch:{{bid}}"]\n{rule_extra}'
            )
        return path

    def start_pginval(self, db, config, name, redis_url=None):
        self.seq += 1
        logfile = os.path.join(self.a.work, f"pginval-{self.seq:02d}-{name}.log")
        env = dict(os.environ, PGINVAL_SOURCE_URL=self.url(db), PGINVAL_REDIS_URL=redis_url or self.redis_url)
        # PGINVAL_BENCH_LOG=pginval=debug: pginval's debug log (timestamps of each batch).
        env.pop("RUST_LOG", None)
        if os.environ.get("PGINVAL_BENCH_LOG"):
            env["RUST_LOG"] = os.environ["PGINVAL_BENCH_LOG"]
        p = Proc([self.a.pginval, "run", "--config", config], logfile=logfile, env=env,
                 timefile=logfile[: -len(".log")] + ".time")
        p.logfile = logfile
        return p

    def scan_log(self, p, what):
        """Counts WARN/ERROR lines in a pginval log; remembers the first few."""
        bad = []
        with open(p.logfile, errors="replace") as f:
            for line in f:
                if re.search(r"\b(WARN|ERROR)\b", line):
                    bad.append(line.rstrip())
        for line in bad[:3]:
            self.warnings.append(f"{what}: {line}")
        return len(bad)

    def start_perf(self, p, name):
        """With --perf, a CPU profile of pginval's catch-up, big-transaction and streamed
        runs (software clock; timings of a profiled run are not comparable)."""
        if not (self.a.perf and (name.startswith("catchup") or name in ("big", "bigcommit-streamed"))):
            return None
        p.perf_data = p.logfile[: -len(".log")] + ".perf"
        return subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-p", str(p.pid), "-o", p.perf_data],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), p.perf_data

    @staticmethod
    def stop_profiled(p, perf):
        """Stops pginval (SIGTERM) and its profiler; returns pginval's exit status."""
        status = p.stop()
        if perf is not None:
            perf[0].wait(30)
        return status

    def check_stopped(self, p, status, name, perf):
        """Fails the run unless pginval exited cleanly; keeps its profile."""
        if status != 0:
            raise RuntimeError(f"pginval ({name}) exited with {status} after SIGTERM (log: {p.logfile})")
        self.perf_report(perf, name)

    def perf_report(self, perf, name):
        """The first profile of each kind of run, for the report."""
        if perf is None or name in self.profiles:
            return
        top = []
        for sort, limit, n in (("dso", "2", 6), ("dso,symbol", "1", 20)):
            rep = subprocess.run(["perf", "report", "-i", perf[1], "--stdio", "-q", "--no-children",
                                  "--sort", sort, "--percent-limit", limit], capture_output=True, text=True)
            top += [" ".join(line.split()) for line in rep.stdout.splitlines() if line.strip()][:n] + [""]
        self.profiles[name] = top[:-1]

    def pginval_catchup(self, db, conn, slot, publication, end_lsn, marker_key, populate, name, max_keys=None,
                        amqp_exchange=None, last_effect=None, cluster=None, redis_extra="", rule_extra=""):
        """Times pginval from process start to the deletion of marker_key, or, with
        last_effect (a function that waits for the run's last effect and returns its
        time), to that. With `cluster` (a Cluster), against that cluster."""
        if cluster is None:
            self.redis.cmd("FLUSHALL")
        else:
            cluster.flushall()
        populate()
        marker_port = self.a.redis_port if cluster is None else cluster.owner(marker_key)
        sub = Subscriber("127.0.0.1", marker_port, f"__keyspace@0__:{marker_key}")
        config = self.pginval_config(name, slot, publication, max_keys, amqp_exchange=amqp_exchange, redis_extra=redis_extra,
                                     rule_extra=rule_extra)
        meter = self.cpu_sample()
        begin = self.server_cpu_begin()
        p = self.start_pginval(db, config, name, redis_url=None if cluster is None else cluster.url())
        perf = self.start_perf(p, name)
        try:
            t_gone = sub.wait_for_key(b"del", self.a.timeout, alive=p.alive)
            if t_gone is None:
                raise RuntimeError(
                    f"pginval ({name}) did not delete {marker_key} within {self.a.timeout} s "
                    f"(exit status {p.status}; log: {p.logfile})"
                )
            if last_effect is not None:
                t_gone = last_effect(p)
                if t_gone is None:
                    raise RuntimeError(f"pginval ({name}) did not finish within {self.a.timeout} s (log: {p.logfile})")
            wall = t_gone - p.t0
            # Diagnostic: how long until the slot's confirmed_flush_lsn shows the end.
            confirm_lag = None
            deadline = time.perf_counter() + self.a.confirm_wait
            while time.perf_counter() < deadline:
                if self.q1(conn, "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = %s", (end_lsn, slot)):
                    confirm_lag = time.perf_counter() - t_gone
                    break
                time.sleep(0.005)
            cpu_at_done = p.proc_cpu()
        finally:
            sub.close()
            status = self.stop_profiled(p, perf)
        self.check_stopped(p, status, name, perf)
        server = self.server_cpu_end(begin, conn, slot)
        return {
            "wall_s": wall,
            **p.usage(),
            "cpu_at_done_s": cpu_at_done,
            "walsender_cpu_s": server,
            **self.other_cpu(meter),
            "confirm_lag_s": confirm_lag,
            "log_warnings": self.scan_log(p, name),
            "log": p.logfile,
        }

    def pgbench(self, db, args, capture=True):
        argv = [os.path.join(self.bindir, "pgbench"), "-h", "127.0.0.1", "-p", str(self.a.pg_port), "-U", "postgres"] + args + [db]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"pgbench failed: {r.stderr.strip()[-800:]}")
        return r.stdout + r.stderr

    @staticmethod
    def pgbench_tps(out):
        m = re.search(r"tps = ([\d.]+)", out)
        return float(m.group(1)) if m else None

    def prepare_db(self, conn, db):
        """Row counts from pgbench's scale, and two marker rows outside pgbench's ranges
        (pgbench never touches them): account naccounts+1 (the latency test's start
        probe) and teller ntellers+1, whose update ends every backlog: its key
        teller:<ntellers+1> is in pginval's last batch, and no fallback pattern of the
        accounts table (acct:*) can delete it early. (pgbench takes its scale from
        count(*) of pgbench_branches, so no marker goes there.)"""
        scale = self.q1(conn, "SELECT count(*) FROM pgbench_branches")
        naccounts, nbranches, ntellers = 100000 * scale, scale, 10 * scale
        self.q(conn, "INSERT INTO pgbench_accounts (aid, bid, abalance, filler) VALUES (%s, 1, 0, '') ON CONFLICT DO NOTHING", (naccounts + 1,))
        self.q(conn, "INSERT INTO pgbench_tellers (tid, bid, tbalance, filler) VALUES (%s, 1, 0, '') ON CONFLICT DO NOTHING", (ntellers + 1,))
        self.q(conn, "VACUUM ANALYZE")
        return naccounts, nbranches, ntellers, naccounts + 1, ntellers + 1

    def publication(self, conn, name):
        """The publication's tables, with their column lists (PostgreSQL 15+)."""
        rows = self.q(conn, "SELECT schemaname || '.' || tablename || coalesce(' (' || array_to_string(attnames, ', ') || ')', '') "
                            "FROM pg_publication_tables WHERE pubname = %s ORDER BY 1", (name,))
        return [r[0] for r in rows]

    def ensure_own_publication(self, db, conn):
        """Lets pginval create its own publication (pginval_own) once, as in production."""
        exists = self.q1(conn, "SELECT count(*) FROM pg_publication WHERE pubname = 'pginval_own'")
        if exists:
            return
        self.reset_slots(conn, ["bench_setup"])
        config = self.pginval_config("setup", "bench_setup", "pginval_own")
        p = self.start_pginval(db, config, "setup")
        deadline = time.time() + 60
        while time.time() < deadline and p.alive():
            with open(p.logfile, errors="replace") as f:
                if "streaming" in f.read():
                    break
            time.sleep(0.05)
        else:
            p.stop()
            raise RuntimeError(f"pginval did not start streaming (log: {p.logfile})")
        p.stop()
        self.reset_slots(conn, ["bench_setup"])
        definition = self.publication(conn, "pginval_own")
        self.results["own_publication"] = definition
        log("pginval created its publication pginval_own: " + "; ".join(definition))

    # -- 1. catch-up

    def catchup(self):
        a = self.a
        db = "bench"
        conn = self.connect(db)
        naccounts, nbranches, ntellers, _, marker = self.prepare_db(conn, db)
        self.ensure_own_publication(db, conn)
        marker_key = f"teller:{marker}"
        per_client = a.backlog // 4
        txns = per_client * 4
        changes = 3 * txns + 1  # accounts, tellers, branches per TPC-B transaction + marker

        def populate():
            self.redis.populate("acct:", 1, naccounts)
            self.redis.populate("teller:", 1, marker)
            self.redis.populate("branch:", 1, nbranches)

        self.redis.cmd("CONFIG", "SET", "notify-keyspace-events", "Kg")
        bench_all = self.publication(conn, "bench_all")
        log("publication bench_all: " + "; ".join(bench_all))
        # fence: the own publication with fence = true on every rule (a fence written
        # before each delete), against the plain deletes of "own" in the same run.
        slots = {"recv": "bench_recv", "all": "bench_inval", "own": "bench_own", "fence": "bench_fence"}
        order = ["recv", "all", "own", "fence"]
        runs = []
        for i in range(a.runs):
            self.reset_slots(conn, slots.values())
            self.q(conn, "TRUNCATE pgbench_history")
            self.q(conn, "VACUUM pgbench_accounts, pgbench_tellers, pgbench_branches")
            self.q(conn, "CHECKPOINT")
            start_lsns = [self.q1(conn, "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'pgoutput')", (s,)) for s in slots.values()]
            t = time.perf_counter()
            out = self.pgbench(db, ["-n", "-t", str(per_client), "-c", "4", "-j", "2", "-M", "prepared"])
            backlog_s = time.perf_counter() - t
            self.q(conn, "UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = %s", (marker,))
            end_lsn = self.q1(conn, "SELECT pg_current_wal_lsn()::text")
            wal_bytes = int(self.q1(conn, "SELECT %s::pg_lsn - %s::pg_lsn", (end_lsn, start_lsns[0])))
            touched = self.q(conn, "SELECT 'acct:' || aid FROM pgbench_history UNION SELECT 'teller:' || tid FROM pgbench_history UNION SELECT 'branch:' || bid FROM pgbench_history")
            touched = [r[0] for r in touched]
            log(f"catch-up run {i + 1}/{a.runs}: backlog {txns} transactions in {backlog_s:.1f} s "
                f"(pgbench {self.pgbench_tps(out):.0f} tps), slots at {', '.join(start_lsns)}, end {end_lsn}, "
                f"{wal_bytes / 1e6:.1f} MB of WAL")
            run = {"start_lsns": start_lsns, "end_lsn": end_lsn, "wal_bytes": int(wal_bytes), "backlog_s": backlog_s}
            rot = order[i % len(order) :] + order[: i % len(order)]
            for who in rot:
                if who == "recv":
                    r = self.pg_recvlogical(db, slots["recv"], "bench_all", end_lsn, conn)
                else:
                    pub = "bench_all" if who == "all" else "pginval_own"
                    r = self.pginval_catchup(db, conn, slots[who], pub, end_lsn, marker_key, populate, f"catchup-{who}",
                                             rule_extra="fence = true\n" if who == "fence" else "")
                    exists = self.redis.pipeline([["EXISTS", k] for k in touched])
                    left = [k for k, e in zip(touched, exists) if e]
                    r["keys_left"] = len(left)
                    if left:
                        self.warnings.append(f"catch-up run {i + 1} ({who}): {len(left)} of {len(touched)} touched keys still in Redis "
                                             f"after pginval stopped, e.g. {', '.join(left[:5])}")
                run[who] = r
                msg = (f"   {who:>4}: {r['wall_s']:.3f} s, CPU {r['cpu_s']:.2f} s, RSS {r['rss_mb']:.1f} MB, {r['wakeups']} wakeups, walsender CPU {r['walsender_cpu_s']:.2f} s, "
                       f"other programs {r['other_cpu_s']:.2f} s, steal {r['steal_s']:.2f} s")
                if who != "recv":
                    lag = r["confirm_lag_s"]
                    msg += ", confirmed " + (f"{lag * 1000:.0f} ms" if lag is not None else f"not within {a.confirm_wait:.1f} s")
                    msg += f" after the marker, {r['keys_left']} keys left, {r['log_warnings']} log warnings"
                log(msg)
            run["order"] = rot
            runs.append(run)
        self.reset_slots(conn, slots.values())
        if self.publication(conn, "bench_all") != bench_all:
            self.warnings.append(f"pginval changed publication bench_all, which it did not create: now {self.publication(conn, 'bench_all')}")
        conn.close()
        self.results["catchup"] = {"transactions": txns, "row_changes": changes, "runs": runs,
                                   "bench_all": bench_all, "pginval_own": self.publication(self.connect(db), "pginval_own")}

    def fresh_backlog(self, db, conn, slots, per_client, marker):
        """New slots, then a backlog of 4 x per_client TPC-B transactions and the marker
        update after it; returns the WAL position at the end."""
        self.reset_slots(conn, slots)
        self.q(conn, "TRUNCATE pgbench_history")
        self.q(conn, "VACUUM pgbench_accounts, pgbench_tellers, pgbench_branches")
        self.q(conn, "CHECKPOINT")
        for s_ in slots:
            self.q(conn, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (s_,))
        self.pgbench(db, ["-n", "-t", str(per_client), "-c", "4", "-j", "2", "-M", "prepared"])
        self.q(conn, "UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = %s", (marker,))
        return self.q1(conn, "SELECT pg_current_wal_lsn()::text")

    # -- 1c. Redis Cluster

    def cluster(self):
        """The catch-up backlog against a 3-primary Redis Cluster (one replica each),
        next to the same pginval against the single Redis, in the same runs; and once
        more against the cluster with wait_replicas = 1 (WAIT after every batch)."""
        a = self.a
        db = "bench"
        conn = self.connect(db)
        naccounts, nbranches, ntellers, _, marker = self.prepare_db(conn, db)
        self.ensure_own_publication(db, conn)
        marker_key = f"teller:{marker}"
        per_client = a.backlog // 4
        txns = per_client * 4
        cl = Cluster(a.work)
        log(f"cluster: primaries on {sorted(set(cl.owners))}, nodes {cl.ports}")
        self.redis.cmd("CONFIG", "SET", "notify-keyspace-events", "Kg")

        def populate_single():
            self.redis.populate("acct:", 1, naccounts)
            self.redis.populate("teller:", 1, marker)
            self.redis.populate("branch:", 1, nbranches)

        def populate_cluster():
            cl.populate("acct:", 1, naccounts)
            cl.populate("teller:", 1, marker)
            cl.populate("branch:", 1, nbranches)

        slots = {"single": "bench_cl_single", "cluster": "bench_cl_cluster", "wait": "bench_cl_wait"}
        order = ["single", "cluster", "wait"]
        runs = []
        for i in range(a.runs):
            end_lsn = self.fresh_backlog(db, conn, slots.values(), per_client, marker)
            touched = [r[0] for r in self.q(conn, "SELECT 'acct:' || aid FROM pgbench_history UNION SELECT 'teller:' || tid FROM pgbench_history UNION SELECT 'branch:' || bid FROM pgbench_history")]
            run = {"end_lsn": end_lsn}
            rot = order[i % 3 :] + order[: i % 3]
            for who in rot:
                if who == "single":
                    r = self.pginval_catchup(db, conn, slots[who], "pginval_own", end_lsn, marker_key, populate_single, "cluster-single")
                    exists = self.redis.pipeline([["EXISTS", k] for k in touched])
                    r["keys_left"] = sum(1 for e in exists if e)
                else:
                    extra = cl.redis_section() + ("wait_replicas = 1\n" if who == "wait" else "")
                    r = self.pginval_catchup(db, conn, slots[who], "pginval_own", end_lsn, marker_key, populate_cluster,
                                             f"cluster-{who}", cluster=cl, redis_extra=extra)
                    r["keys_left"] = len(cl.existing(touched))
                if r["keys_left"]:
                    self.warnings.append(f"cluster run {i + 1} ({who}): {r['keys_left']} of {len(touched)} touched keys still in Redis after pginval stopped")
                run[who] = r
                log(f"   {who:>7}: {r['wall_s']:.3f} s, CPU {r['cpu_s']:.2f} s, {r['keys_left']} keys left, {r['log_warnings']} log warnings")
            runs.append(run)
        self.reset_slots(conn, slots.values())
        conn.close()
        self.results["cluster"] = {"transactions": txns, "runs": runs}

    # -- 1b. events on RabbitMQ

    def events(self):
        """The catch-up backlog with the accounts rule publishing an entity event per row
        to RabbitMQ (publisher confirms), next to the same rules without events, in the
        same runs. With events, the time is to the last event in the queue."""
        import pika
        a = self.a
        db = "bench"
        conn = self.connect(db)
        naccounts, nbranches, ntellers, _, marker = self.prepare_db(conn, db)
        self.ensure_own_publication(db, conn)
        marker_key = f"teller:{marker}"
        per_client = a.backlog // 4
        txns = per_client * 4

        def populate():
            self.redis.populate("acct:", 1, naccounts)
            self.redis.populate("teller:", 1, marker)
            self.redis.populate("branch:", 1, nbranches)

        self.redis.cmd("CONFIG", "SET", "notify-keyspace-events", "Kg")
        amqp = pika.BlockingConnection(pika.URLParameters(a.amqp_url))
        channel = amqp.channel()
        exchange = f"pginval_bench_{os.getpid()}"
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        queue = channel.queue_declare(f"{exchange}_q", durable=True).method.queue
        channel.queue_bind(queue, exchange, routing_key="invalidate.*")

        def queued():
            return channel.queue_declare(queue, passive=True).method.message_count

        pgrep = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True)
        broker_pids = [int(x) for x in pgrep.stdout.split()]
        slots = {"off": "bench_ev_off", "amqp": "bench_ev_amqp"}
        order = ["off", "amqp"]
        runs = []
        try:
            for i in range(a.runs):
                end_lsn = self.fresh_backlog(db, conn, slots.values(), per_client, marker)
                run = {"end_lsn": end_lsn}
                rot = order[i % 2:] + order[: i % 2]
                for who in rot:
                    last = None
                    if who == "amqp":
                        channel.queue_purge(queue)

                        def last(p):
                            deadline = time.perf_counter() + a.timeout
                            while time.perf_counter() < deadline and p.alive():
                                if queued() >= txns:
                                    return time.perf_counter()
                                time.sleep(0.002)
                            return None
                    broker_before = sum(self.ticks(pid) for pid in broker_pids)
                    r = self.pginval_catchup(db, conn, slots[who], "pginval_own", end_lsn, marker_key, populate,
                                             f"events-{who}", amqp_exchange=exchange if who == "amqp" else None,
                                             last_effect=last)
                    # RabbitMQ's own CPU over the run (the Erlang VM), to see what bounds it.
                    r["broker_cpu_s"] = (sum(self.ticks(pid) for pid in broker_pids) - broker_before) / CLK_TCK
                    if who == "amqp":
                        r["events_queued"] = queued()
                    run[who] = r
                    log(f"events run {i + 1}/{a.runs} {who:>4}: {r['wall_s']:.3f} s, CPU {r['cpu_s']:.2f} s, RSS {r['rss_mb']:.1f} MB"
                        + (f", {r['events_queued']} events in the queue" if who == "amqp" else "")
                        + f", RabbitMQ CPU {r['broker_cpu_s']:.2f} s"
                        + f", steal {r['steal_s']:.2f} s, {r['log_warnings']} log warnings")
                if a.amqp_ceiling:
                    # The broker alone: as many persistent, confirmed messages, same size.
                    out = subprocess.run([a.amqp_ceiling, str(txns), a.amqp_url], capture_output=True, text=True, check=True)
                    run["ceiling_s"] = float(out.stdout.split(" in ")[1].split()[0])
                    log(f"events run {i + 1}/{a.runs} RabbitMQ alone (examples/amqp_ceiling): {run['ceiling_s']:.3f} s for {txns} messages")
                run["order"] = rot
                runs.append(run)
        finally:
            channel.queue_delete(queue)
            channel.exchange_delete(exchange)
            amqp.close()
        self.reset_slots(conn, slots.values())
        conn.close()
        self.results["events"] = {"transactions": txns, "events": txns, "runs": runs}

    # -- 2. latency

    def latency(self):
        """Commit -> invalidated, for pginval, and commit -> change received for
        pg_recvlogical as the baseline (what the walsender itself delivers on this
        machine under the same load). Each consumer runs alone through its own pass."""
        a = self.a
        db = "bench"
        conn = self.connect(db)
        naccounts, _, _, marker, _ = self.prepare_db(conn, db)
        self.ensure_own_publication(db, conn)
        probe_first = max(1, naccounts - 10000 + 1)  # probes use the last 10,000 aids
        script = os.path.join(a.work, "update-one.sql")
        with open(script, "w") as f:
            f.write(f"\\set aid random(1, {probe_first - 1})\n"
                    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n")
        self.redis.cmd("FLUSHALL")
        self.redis.cmd("CONFIG", "SET", "notify-keyspace-events", "Eg")
        results = {}
        for consumer in ("recv", "pginval"):
            results[consumer] = self.latency_pass(consumer, db, conn, script, marker, probe_first, naccounts)
        self.results["latency"] = results
        conn.close()

    def clusterlatency(self):
        """Commit -> invalidated for pginval against a 3-primary Redis Cluster (one
        replica each), next to pginval against the single Redis in the same invocation
        (same load, same probes)."""
        a = self.a
        db = "bench"
        conn = self.connect(db)
        naccounts, _, _, marker, _ = self.prepare_db(conn, db)
        self.ensure_own_publication(db, conn)
        probe_first = max(1, naccounts - 10000 + 1)
        script = os.path.join(a.work, "update-one.sql")
        with open(script, "w") as f:
            f.write(f"\\set aid random(1, {probe_first - 1})\n"
                    "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n")
        self.redis.cmd("FLUSHALL")
        self.redis.cmd("CONFIG", "SET", "notify-keyspace-events", "Eg")
        cl = Cluster(a.work)
        for port in cl.ports:
            Redis("127.0.0.1", port).cmd("CONFIG", "SET", "notify-keyspace-events", "Eg")
        results = {}
        for consumer in ("pginval", "pginval-cluster"):
            results[consumer] = self.latency_pass(consumer, db, conn, script, marker, probe_first, naccounts,
                                                  cluster=cl if consumer == "pginval-cluster" else None)
        self.results["clusterlatency"] = results
        conn.close()

    def latency_pass(self, consumer, db, conn, script, marker, probe_first, naccounts, cluster=None):
        a = self.a
        slot = {"recv": "bench_lat_recv", "pginval": "bench_lat", "pginval-cluster": "bench_lat_cluster"}[consumer]
        self.reset_slots(conn, [slot])
        cur = conn.cursor()
        update = "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = %s"
        if consumer == "recv":
            self.q(conn, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
            p = Proc([os.path.join(self.bindir, "pg_recvlogical"), "-d", self.dsn(db), "--start", "-S", slot, "--no-loop",
                      "-o", "proto_version=1", "-o", "publication_names=pginval_own", "-f", "-"],
                     stdout=subprocess.PIPE, timefile=os.path.join(a.work, "pg_recvlogical-latency.time"),
                     stderr_log=os.path.join(a.work, "pg_recvlogical-latency.log"))
            watch = Watcher(p.p.stdout.fileno())

            def arm(aid):
                pass

            def seen(aid, timeout):
                # pgoutput's text tuple value: 't', Int32 length, the text.
                v = str(aid).encode()
                return watch.wait_for(b"t\x00\x00" + len(v).to_bytes(2, "big") + v, timeout, alive=p.alive)

            def idle(secs):
                watch.drain(secs)
        elif cluster is None:
            watch = Subscriber("127.0.0.1", a.redis_port, "__keyevent@0__:del")
            metrics_port = free_port()
            p = self.start_pginval(db, self.pginval_config("latency", slot, "pginval_own", metrics_port=metrics_port), "latency")

            def arm(aid):
                self.redis.cmd("SET", f"acct:{aid}", "x")

            def seen(aid, timeout):
                return watch.wait_for_key(f"acct:{aid}".encode(), timeout, alive=p.alive)

            def idle(secs):
                time.sleep(secs)
        else:
            # A key's deletion is notified by the primary that owns its slot.
            watches = {port: Subscriber("127.0.0.1", port, "__keyevent@0__:del") for port in cluster.conns}
            metrics_port = free_port()
            config = self.pginval_config("latency-cluster", slot, "pginval_own", metrics_port=metrics_port,
                                         redis_extra=cluster.redis_section())
            p = self.start_pginval(db, config, "latency-cluster", redis_url=cluster.url())

            def arm(aid):
                key = f"acct:{aid}"
                cluster.conns[cluster.owner(key)].cmd("SET", key, "x")

            def seen(aid, timeout):
                key = f"acct:{aid}"
                return watches[cluster.owner(key)].wait_for_key(key.encode(), timeout, alive=p.alive)

            def idle(secs):
                time.sleep(secs)

            class _All:
                def close(self):
                    for w in watches.values():
                        w.close()

            watch = _All()

        results = {}
        bg = None
        try:
            deadline = time.time() + 60  # until the consumer streams
            while True:
                arm(marker)
                cur.execute(update, (marker,))
                if seen(marker, 1) is not None:
                    break
                if not p.alive() or time.time() > deadline:
                    raise RuntimeError(f"{consumer} did not start streaming (status {p.status})")
            aid = probe_first
            for rate in a.rates:
                own0 = read_histogram(metrics_port, READ_TO_INVALIDATION) if consumer != "recv" else None
                cpu0 = p.proc_cpu()
                meter = self.cpu_sample()
                walsender = self.q1(conn, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,))
                ws0 = self.ticks(walsender)
                bg = subprocess.Popen(
                    [os.path.join(self.bindir, "pgbench"), "-h", "127.0.0.1", "-p", str(a.pg_port), "-U", "postgres",
                     "-n", "-c", "4", "-j", "2", "-M", "prepared", "-R", str(rate), "-T", str(a.latency_secs), "-f", script, db],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                )
                t_start = time.perf_counter()
                idle(min(1.0, a.latency_secs / 5))  # let the rate settle
                lat, lat_send, slow, missed = [], [], [], 0
                t_end = t_start + a.latency_secs - 0.5
                while time.perf_counter() < t_end and bg.poll() is None:
                    this = aid
                    aid = aid + 1 if aid < naccounts else probe_first
                    arm(this)
                    t_send = time.perf_counter()
                    cur.execute(update, (this,))
                    t_commit = time.perf_counter()
                    t_seen = seen(this, 5)
                    if t_seen is None:
                        if not p.alive():
                            raise RuntimeError(f"{consumer} exited during the latency test")
                        missed += 1
                        continue
                    lat.append(max(0.0, t_seen - t_commit))
                    lat_send.append(t_seen - t_send)
                    if t_seen - t_commit > 0.005:
                        slow.append((round(t_commit - t_start, 3), round((t_seen - t_commit) * 1000, 2)))
                    idle(random.uniform(0.002, 0.008))
                while bg.poll() is None:
                    idle(0.05)
                out, _ = bg.communicate()
                bg = None
                elapsed = time.perf_counter() - t_start
                cpu_pct = 100 * (p.proc_cpu() - cpu0) / elapsed
                other = self.other_cpu(meter)
                ws_pct = 100 * (self.ticks(walsender) - ws0) / CLK_TCK / elapsed
                lag = re.search(r"rate limit schedule lag: avg ([\d.]+) \(max ([\d.]+)\) ms", out)
                r = {
                    "rate": rate,
                    "probes": len(lat),
                    "missed": missed,
                    "p50_ms": percentile(lat, 50) * 1000 if lat else None,
                    "p90_ms": percentile(lat, 90) * 1000 if lat else None,
                    "p99_ms": percentile(lat, 99) * 1000 if lat else None,
                    "max_ms": max(lat) * 1000 if lat else None,
                    "p50_from_send_ms": percentile(lat_send, 50) * 1000 if lat_send else None,
                    "p99_from_send_ms": percentile(lat_send, 99) * 1000 if lat_send else None,
                    "pgbench_tps": self.pgbench_tps(out),
                    "pgbench_lag_avg_ms": float(lag.group(1)) if lag else None,
                    "pgbench_lag_max_ms": float(lag.group(2)) if lag else None,
                    "cpu_pct": cpu_pct,
                    "walsender_cpu_pct": ws_pct,
                    "other_cpu_pct": 100 * other["other_cpu_s"] / elapsed,
                    "steal_pct": 100 * other["steal_s"] / elapsed,
                    "machine_busy_pct": 100 * other["busy_s"] / elapsed / os.cpu_count(),
                    "slow_probes": slow,  # (seconds into the load, ms) of probes over 5 ms
                }
                if own0 is not None:
                    # pginval's own share (socket read -> Redis ack) over every transaction
                    # of this rate, from its histogram: upper bucket bounds.
                    own = histogram_diff(read_histogram(metrics_port, READ_TO_INVALIDATION), own0)
                    r["own_transactions"] = own[-1][1] if own else 0
                    r["own_p50_ms"] = histogram_quantile(own, 0.50) * 1000
                    r["own_p99_ms"] = histogram_quantile(own, 0.99) * 1000
                results[str(rate)] = r
                log(f"latency, {consumer}, {rate} tps: {r['probes']} probes, p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, "
                    f"max {r['max_ms']:.2f} ms, {len(slow)} over 5 ms; pgbench {r['pgbench_tps']:.0f} tps, "
                    f"schedule lag avg {r['pgbench_lag_avg_ms']} ms; {consumer} CPU {cpu_pct:.0f}% of a core, walsender {ws_pct:.0f}%; "
                    f"other programs {r['other_cpu_pct']:.0f}%, steal {r['steal_pct']:.0f}%; all {os.cpu_count()} cores {r['machine_busy_pct']:.0f}% busy")
                if own0 is not None:
                    log(f"latency, {consumer}, {rate} tps: its own share (read -> Redis ack) over {r['own_transactions']:.0f} transactions: "
                        f"p50 <= {r['own_p50_ms']:.3f} ms, p99 <= {r['own_p99_ms']:.3f} ms (histogram bucket bounds)")
                idle(1)
        finally:
            if bg is not None and bg.poll() is None:
                bg.kill()
                bg.wait()
            if consumer == "recv":
                # pg_recvlogical ends cleanly on SIGINT (SIGTERM kills it); read its
                # output meanwhile so it is never stuck writing to a full pipe.
                p.kill(signal.SIGINT)
                deadline = time.time() + 15
                while watch.drain(0.05) and time.time() < deadline:
                    pass
                status = p.stop(sig=signal.SIGINT)
                p.p.stdout.close()
            else:
                status = p.stop()
                watch.close()
        if consumer != "recv":
            results["log_warnings"] = self.scan_log(p, consumer)
        if status != 0:
            raise RuntimeError(f"{consumer} exited with {status} after SIGTERM")
        results["rss_mb"] = p.rss_mb()
        results["cpu_s"] = p.cpu()
        self.reset_slots(conn, [slot])
        return results

    # -- 4. the read-then-set race

    def race(self):
        """Cache-aside under concurrent writes: readers GET, on a miss SELECT, wait a
        processing delay, then SET with a 1 h TTL; writers UPDATE skewed rows at a
        fixed rate. Modes, side by side in each run: no invalidation (TTL only), the
        application deleting after its own commit, pginval, pginval with
        redelete_after = 50ms. After the writes stop and every invalidation is done,
        every cached key is audited against the database: a stale key then stays stale
        for its whole TTL."""
        a = self.a
        admin = self.connect("postgres")
        if not self.q(admin, "SELECT 1 FROM pg_database WHERE datname = 'race'"):
            self.q(admin, "CREATE DATABASE race")
        admin.close()
        db = "race"
        conn = self.connect(db)
        self.q(conn, "DROP TABLE IF EXISTS race_items")
        self.q(conn, f"CREATE TABLE race_items (id int PRIMARY KEY, v bigint NOT NULL DEFAULT 0)")
        self.q(conn, f"INSERT INTO race_items SELECT g FROM generate_series(1, {RACE_ROWS}) g")
        modes = ["ttl", "app", "pginval", "redelete", "fence"]
        results = {}
        for delay_ms in a.race_delays:
            for i in range(a.race_runs):
                rot = modes[i % len(modes):] + modes[: i % len(modes)]
                for mode in rot:
                    r = self.race_run(db, conn, mode, delay_ms)
                    results.setdefault(str(delay_ms), {}).setdefault(mode, []).append(r)
                    log(f"race, reader delay {delay_ms} ms, {mode:>8}: {r['stale_keys']} stale keys of {r['keys']} "
                        f"after quiescence; stale reads {r['stale_reads']}/{r['sampled_reads']} sampled "
                        f"({100 * r['stale_read_ratio']:.1f} %); {r['fills']} fills ({r['refused_fills']} refused), "
                        f"{r['hits']} hits, {r['writes']} writes")
        conn.close()
        self.results["race"] = results

    def race_run(self, db, conn, mode, delay_ms):
        import threading
        a = self.a
        self.redis.cmd("FLUSHDB")
        self.q(conn, "UPDATE race_items SET v = 0")
        p = None
        slot = "bench_race"
        fill_sha = None
        if mode in ("pginval", "redelete", "fence"):
            self.reset_slots(conn, [slot])
            # And pginval's state (database 15), or the dropped slot counts as lost.
            state = Redis("127.0.0.1", a.redis_port)
            state.cmd("SELECT", 15)
            state.cmd("FLUSHDB")
            state.sock.close()
            config = os.path.join(a.work, f"race-{mode}.toml")
            extra = {"redelete": 'redelete_after = "50ms"\n', "fence": "fence = true\n"}.get(mode, "")
            with open(config, "w") as f:
                f.write(f'[source]\nslot = "{slot}"\npublication = "pginval_race"\n\n'
                        f'[[rules]]\ntable = "race_items"\nkeys = ["item:{{id}}"]\n{extra}')
            if mode == "fence":
                # The fill script as pginval prints it; its fence TTL is the default 60 s.
                script = subprocess.run([a.pginval, "fill-script", "--config", config], check=True,
                                        capture_output=True, text=True,
                                        env=dict(os.environ, PGINVAL_SOURCE_URL=self.url(db))).stdout
                fill_sha = self.redis.cmd("SCRIPT", "LOAD", script).decode()
            p = self.start_pginval(db, config, f"race-{mode}")
            # Streaming once a committed change reaches Redis.
            deadline = time.time() + 60
            while True:
                self.redis.cmd("SET", "item:1", "probe")
                self.q(conn, "UPDATE race_items SET v = v WHERE id = 1")
                t = time.time() + 1
                while time.time() < t and self.redis.cmd("EXISTS", "item:1"):
                    time.sleep(0.005)
                if not self.redis.cmd("EXISTS", "item:1"):
                    break
                if not p.alive() or time.time() > deadline:
                    raise RuntimeError(f"pginval did not start streaming for the race ({mode})")
        stop = threading.Event()
        counts = {"fills": 0, "refused": 0, "hits": 0, "writes": 0, "sampled": 0, "stale": 0}
        lock = threading.Lock()
        rng_seed = random.randrange(1 << 30)

        def skewed(rng):
            return 1 + int(RACE_ROWS * rng.random() ** 3)

        def reader(n):
            rng = random.Random(rng_seed + n)
            pg = self.connect(db)
            rd = Redis("127.0.0.1", a.redis_port)
            fills = refused = hits = sampled = stale = 0
            while not stop.is_set():
                i = skewed(rng)
                if fill_sha:
                    # The fence protocol: MGET key fence; on a miss, SELECT, then the
                    # fill script, which sets the key only if the fence did not change
                    # (and only within half the fence TTL of the MGET).
                    fence = f"pginval-fence:{{item:{i}}}"
                    started = time.monotonic()
                    cached, seen = rd.cmd("MGET", f"item:{i}", fence)
                else:
                    cached = rd.cmd("GET", f"item:{i}")
                if cached is None:
                    v = self.q1(pg, "SELECT v FROM race_items WHERE id = %s", (i,))
                    if delay_ms:
                        time.sleep(delay_ms / 1000)
                    if not fill_sha:
                        rd.cmd("SET", f"item:{i}", v, "EX", 3600)
                        fills += 1
                    elif time.monotonic() - started < 30:
                        stored = rd.cmd("EVALSHA", fill_sha, 2, f"item:{i}", fence, seen or b"", v, 3_600_000)
                        fills += stored
                        refused += 1 - stored
                else:
                    hits += 1
                    if rng.random() < 0.1:
                        # A sampled hit: older than the row as committed when read?
                        v = self.q1(pg, "SELECT v FROM race_items WHERE id = %s", (i,))
                        sampled += 1
                        stale += int(cached) < v
            with lock:
                counts["fills"] += fills
                counts["refused"] += refused
                counts["hits"] += hits
                counts["sampled"] += sampled
                counts["stale"] += stale
            pg.close()

        def writer(n):
            rng = random.Random(rng_seed + 1000 + n)
            pg = self.connect(db)
            rd = Redis("127.0.0.1", a.redis_port)
            per_writer = a.race_tps / RACE_WRITERS
            next_at = time.perf_counter()
            writes = 0
            while not stop.is_set():
                i = skewed(rng)
                self.q(pg, "UPDATE race_items SET v = v + 1 WHERE id = %s", (i,))
                if mode == "app":
                    rd.cmd("DEL", f"item:{i}")
                writes += 1
                next_at += 1 / per_writer
                time.sleep(max(0.0, next_at - time.perf_counter()))
            with lock:
                counts["writes"] += writes
            pg.close()

        threads = [threading.Thread(target=reader, args=(n,)) for n in range(RACE_READERS)]
        threads += [threading.Thread(target=writer, args=(n,)) for n in range(RACE_WRITERS)]
        for t in threads:
            t.start()
        time.sleep(a.race_secs)  # the run's length: load for a fixed time
        stop.set()
        for t in threads:
            t.join()
        # Quiescence: every commit invalidated (pginval confirmed the WAL end), and
        # second deletes done.
        if p is not None:
            end = self.q1(conn, "SELECT pg_current_wal_insert_lsn() - '0/0'")
            deadline = time.time() + 60
            while True:
                rows = self.q(conn, "SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots WHERE slot_name = %s", (slot,))
                if rows and rows[0][0] is not None and rows[0][0] >= end:
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"pginval did not confirm the race's last commit ({mode})")
                time.sleep(0.01)
            if mode == "redelete":
                time.sleep(0.2)  # the 50 ms second deletes of the last commits
            p.stop()
            self.scan_log(p, f"race-{mode}")
        keys = [k.decode() for k in self.redis.cmd("KEYS", "item:*")]
        values = self.redis.pipeline([["GET", k] for k in keys]) if keys else []
        truth = dict(self.q(conn, "SELECT id, v FROM race_items"))
        stale_keys = sum(1 for k, v in zip(keys, values) if v is not None and int(v) != truth[int(k.split(":")[1])])
        return {
            "keys": len(keys), "stale_keys": stale_keys, "fills": counts["fills"], "refused_fills": counts["refused"],
            "hits": counts["hits"],
            "writes": counts["writes"], "sampled_reads": counts["sampled"], "stale_reads": counts["stale"],
            "stale_read_ratio": counts["stale"] / counts["sampled"] if counts["sampled"] else 0.0,
        }

    # -- 3. big transaction

    def big(self):
        a = self.a
        db = "bigtx"
        conn = self.connect(db)
        naccounts, _, _, _, marker = self.prepare_db(conn, db)
        marker_key = f"teller:{marker}"
        # inval: pginval as configured by default: every key is rendered and UNLINKed,
        # sent to Redis in parts while the transaction streams (memory stays flat).
        # fallback: max_keys_per_transaction = 100,000: past that many rows the rule
        # switches to its fallback, here the pattern acct:* (SCAN + UNLINK).
        slots = {"recv": "big_recv", "inval": "big_inval", "fallback": "big_fallback"}
        self.redis.cmd("CONFIG", "SET", "notify-keyspace-events", "Kg")
        runs = []
        for i in range(a.big_runs):
            self.reset_slots(conn, slots.values())
            self.q(conn, "VACUUM pgbench_accounts")
            self.q(conn, "CHECKPOINT")
            for s in slots.values():
                self.q(conn, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (s,))
            t = time.perf_counter()
            rows = self.q(conn, "WITH u AS (UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= %s RETURNING 1) SELECT count(*) FROM u", (naccounts,))[0][0]
            update_s = time.perf_counter() - t
            self.q(conn, "UPDATE pgbench_tellers SET tbalance = tbalance + 1 WHERE tid = %s", (marker,))
            end_lsn = self.q1(conn, "SELECT pg_current_wal_lsn()::text")
            log(f"big transaction run {i + 1}/{a.big_runs}: UPDATE of {rows} rows took {update_s:.1f} s, end {end_lsn}")
            run = {"rows": rows, "update_s": update_s, "end_lsn": end_lsn}
            order = ["recv", "inval", "fallback"]
            rot = order[i % 3 :] + order[: i % 3]
            for who in rot:
                if who == "recv":
                    r = self.pg_recvlogical(db, slots["recv"], "bench_big", end_lsn, conn)
                else:
                    r = self.pginval_catchup(db, conn, slots[who], "bench_big", end_lsn, marker_key,
                                             lambda: (self.redis.populate("acct:", 1, naccounts),
                                                      self.redis.cmd("SET", marker_key, "x")),
                                             "big" if who == "inval" else "big-fallback",
                                             max_keys=None if who == "inval" else 100000)
                    left = [k for k in self.redis.scan_all() if not k.startswith(b"pginval:")]  # pginval keeps its state in pginval:*
                    r["keys_left"] = len(left)
                    if left:
                        self.warnings.append(f"big transaction run {i + 1}: {len(left)} keys still in Redis after pginval stopped, "
                                             f"e.g. {', '.join(k.decode() for k in left[:5])}")
                run[who] = r
                log(f"   {who:>5}: {r['wall_s']:.2f} s, CPU {r['cpu_s']:.2f} s, RSS {r['rss_mb']:.1f} MB, walsender CPU {r['walsender_cpu_s']:.2f} s, "
                    f"other programs {r['other_cpu_s']:.2f} s, steal {r['steal_s']:.2f} s")
            runs.append(run)
        self.reset_slots(conn, slots.values())
        conn.close()
        self.results["big"] = {"runs": runs}

    # -- 3b. big transaction, live: commit -> last key gone

    def bigcommit(self):
        a = self.a
        db = "bigtx"
        conn = self.connect(db)
        naccounts = self.prepare_db(conn, db)[0]
        # The walsender's logical_decoding_work_mem: pginval's default (8MB), and the
        # server's (PostgreSQL's default, 64MB).
        modes = {"v1": "streaming = false", "streamed": "streaming = true",
                 "streamed64": 'streaming = true\nlogical_decoding_work_mem = "server"'}
        runs = []
        for i in range(a.big_runs):
            run = {}
            for mode in (list(modes) if i % 2 == 0 else list(reversed(modes))):
                slot = f"bigc_{mode}"
                self.reset_slots(conn, [slot])
                self.q(conn, "VACUUM pgbench_accounts")
                self.q(conn, "CHECKPOINT")
                self.q(conn, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
                self.redis.cmd("FLUSHALL")
                name = f"bigcommit-{mode}"
                config = self.pginval_config(name, slot, "bench_big", source_extra=f"{modes[mode]}\n")
                p = self.start_pginval(db, config, name)
                perf = self.start_perf(p, name)
                try:
                    deadline = time.time() + 60
                    while not self.q1(conn, "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s "
                                            "ON s.active_pid = r.pid WHERE s.slot_name = %s", (slot,)):
                        if time.time() > deadline or not p.alive():
                            raise RuntimeError(f"pginval ({name}) did not start streaming (log: {p.logfile})")
                        time.sleep(0.05)
                    base = self.redis.cmd("DBSIZE")
                    self.redis.populate("acct:", 1, naccounts)
                    t0 = time.perf_counter()
                    rows = self.q(conn, "WITH u AS (UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= %s "
                                        "RETURNING 1) SELECT count(*) FROM u", (naccounts,))[0][0]
                    t_commit = time.perf_counter()
                    # How far the walsender is behind at the commit: WAL it has still to
                    # decode before it can send the Stream Commit (or, with protocol 1,
                    # the whole transaction).
                    behind = self.q1(conn, "SELECT pg_current_wal_lsn() - r.sent_lsn FROM pg_stat_replication r "
                                           "JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = %s", (slot,))
                    left = None
                    while time.perf_counter() - t_commit < a.timeout:
                        left = self.redis.cmd("DBSIZE") - base
                        if left <= 0:
                            break
                        time.sleep(0.001)
                    t_gone = time.perf_counter()
                    if left > 0:
                        raise RuntimeError(f"pginval ({name}): {left} keys left {a.timeout} s after the commit (log: {p.logfile})")
                finally:
                    status = self.stop_profiled(p, perf)
                self.check_stopped(p, status, name, perf)
                r = {"rows": rows, "update_s": t_commit - t0, "commit_to_gone_s": t_gone - t_commit,
                     "walsender_behind_mb": float(behind or 0) / 2**20, **p.usage(),
                     "log_warnings": self.scan_log(p, name), "log": p.logfile}
                run[mode] = r
                log(f"bigcommit run {i + 1}/{a.big_runs} {mode:>8}: UPDATE {r['update_s']:.1f} s, commit -> last key gone "
                    f"{r['commit_to_gone_s']:.3f} s (walsender {r['walsender_behind_mb']:.0f} MB of WAL behind at the commit), "
                    f"CPU {r['cpu_s']:.2f} s, RSS {r['rss_mb']:.1f} MB")
            runs.append(run)
        self.reset_slots(conn, [f"bigc_{m}" for m in modes])
        conn.close()
        self.results["bigcommit"] = {"runs": runs}

    # -- report

    def report(self):
        a = self.a
        lines = []
        out = lines.append

        def f(x, fmt="{:.3f}"):
            return "-" if x is None else fmt.format(x)

        def verdict(value, target):
            if value is None:
                return ""
            return "ok" if value <= target else "MISSED"

        e = self.results.get("events")
        if e:
            runs = e["runs"]
            off = median([r["off"]["wall_s"] for r in runs])
            on = median([r["amqp"]["wall_s"] for r in runs])
            ratio = median([r["amqp"]["wall_s"] / r["off"]["wall_s"] for r in runs])
            per_run = ", ".join("%.2f" % (r["amqp"]["wall_s"] / r["off"]["wall_s"]) for r in runs)
            out(f"1b. Events: the {e['transactions']:,}-transaction catch-up, accounts rule with entity events to RabbitMQ "
                f"(publisher confirms; timed to the last event in the queue) vs the same rules without events, median of {len(runs)}")
            out(f"   without events {off:.3f} s, CPU {median([r['off']['cpu_s'] for r in runs]):.2f} s; "
                f"with AMQP events {on:.3f} s, CPU {median([r['amqp']['cpu_s'] for r in runs]):.2f} s "
                f"(RabbitMQ {median([r['amqp']['broker_cpu_s'] for r in runs]):.2f} s), "
                f"RSS {median([r['amqp']['rss_mb'] for r in runs]):.1f} MB; ratio {ratio:.2f} (target <= 2.00 {verdict(ratio, 2.0)}); "
                f"per-run ratios {per_run}")
            if all("ceiling_s" in r for r in runs):
                ceiling = median([r["ceiling_s"] for r in runs])
                vs = median([r["amqp"]["wall_s"] / r["ceiling_s"] for r in runs])
                out(f"   RabbitMQ alone (examples/amqp_ceiling, {e['events']:,} persistent confirmed messages): {ceiling:.3f} s; "
                    f"pginval with events / RabbitMQ alone = {vs:.2f}")
            out("")
        c = self.results.get("cluster")
        if c:
            runs = c["runs"]
            n = len(runs)
            out(f"1c. Redis Cluster (3 primaries, a replica each) vs one Redis: the catch-up backlog of {c['transactions']:,} "
                f"transactions, pginval's own publication, median of {n} run{'s' if n != 1 else ''}")
            single = median([r["single"]["wall_s"] for r in runs])
            out(f"   one Redis:                 {single:.3f} s, CPU {median([r['single']['cpu_s'] for r in runs]):.2f} s")
            for who, label, target in (("cluster", "cluster", 1.3), ("wait", "cluster, wait_replicas = 1", None)):
                wall = median([r[who]["wall_s"] for r in runs])
                ratio = median([r[who]["wall_s"] / r["single"]["wall_s"] for r in runs])
                per_run = ", ".join(f"{r[who]['wall_s'] / r['single']['wall_s']:.2f}" for r in runs)
                goal = f" (target <= {target:.2f} {verdict(ratio, target)})" if target else ""
                out(f"   {label + ':':<27}{wall:.3f} s, CPU {median([r[who]['cpu_s'] for r in runs]):.2f} s, "
                    f"ratio to one Redis {ratio:.2f}{goal}; per run {per_run}; keys left {sum(r[who]['keys_left'] for r in runs)}")
            out("")
        c = self.results.get("catchup")
        if c:
            runs = c["runs"]
            n = len(runs)
            out(f"1. Catch-up: {c['transactions']:,} pgbench TPC-B transactions + 1 marker "
                f"({c['row_changes']:,} published row changes, median {median([r['wal_bytes'] for r in runs]) / 1e6:.0f} MB WAL), "
                f"median of {n} run{'s' if n != 1 else ''}")
            out(f"   {'consumer':<34}{'wall s':>8}{'ratio':>8}{'target':>8}{'':>8}{'CPU s':>8}{'RSS MB':>8}{'wakeups':>9}{'walsnd s':>10}{'confirm ms':>12}{'other s':>9}")
            per_120k = 120000 / c["row_changes"]
            summary = {}
            for who, label, target in (("recv", "pg_recvlogical, bench_all", None),
                                       ("all", "pginval, bench_all", 0.90),
                                       ("own", "pginval, own publication", 0.75),
                                       ("fence", "pginval, own pub., fence = true", None)):
                if who not in runs[0]:
                    continue
                wall = median([r[who]["wall_s"] for r in runs])
                ratio = None if who == "recv" else median([r[who]["wall_s"] / r["recv"]["wall_s"] for r in runs])
                cpu = median([r[who]["cpu_s"] for r in runs])
                rss = median([r[who]["rss_mb"] for r in runs])
                ws = median([r[who]["walsender_cpu_s"] for r in runs])
                other = median([r[who]["other_cpu_s"] for r in runs])
                wakeups = median([r[who]["wakeups"] for r in runs])
                lag = None
                if who != "recv":
                    lags = [r[who]["confirm_lag_s"] for r in runs]
                    lag = None if any(x is None for x in lags) else median(lags) * 1000
                summary[who] = {"wall_s": wall, "ratio": ratio, "cpu_s": cpu, "rss_mb": rss, "walsender_cpu_s": ws, "other_cpu_s": other, "wakeups": wakeups,
                                "cpu_per_120k_s": cpu * per_120k, "confirm_lag_ms": lag}
                if who == "recv":
                    lag_txt = ""
                elif lag is None:
                    lag_txt = f">{a.confirm_wait * 1000:.0f}"
                else:
                    lag_txt = f"{lag:.0f}"
                out(f"   {label:<34}{f(wall):>8}{f(ratio, '{:.2f}'):>8}{f(target, '≤{:.2f}') if target else '':>8}"
                    f"{verdict(ratio, target) if target else '':>8}{f(cpu, '{:.2f}'):>8}{f(rss, '{:.1f}'):>8}{f(wakeups, '{:.0f}'):>9}{f(ws, '{:.2f}'):>10}{lag_txt:>12}{f(other, '{:.2f}'):>9}")
            if "fence" in summary:
                vs_own = median([r["fence"]["wall_s"] / r["own"]["wall_s"] for r in runs])
                cpu_own = median([r["fence"]["cpu_s"] / r["own"]["cpu_s"] for r in runs])
                per_run = ", ".join(f"{r['fence']['wall_s'] / r['own']['wall_s']:.2f}" for r in runs)
                out(f"   fence = true / plain deletes (own publication), same runs: wall {vs_own:.2f}, pginval CPU {cpu_own:.2f}"
                    f" (per run: {per_run})")
                summary["fence"]["vs_own"] = vs_own
            for who in ("all", "own"):
                s = summary[who]
                out(f"   cost, pginval ({who}): {s['cpu_s']:.2f} s CPU = {s['cpu_per_120k_s']:.2f} s per 120,000 row changes "
                    f"(target ≤ 0.50: {verdict(s['cpu_per_120k_s'], 0.5)}), peak RSS {s['rss_mb']:.1f} MB (target ≤ 30: {verdict(s['rss_mb'], 30)})")
            out("   ratio: median of the per-run ratios to pg_recvlogical. wall: process start -> last key deleted (pginval),")
            out("   -> exit at --endpos (pg_recvlogical). walsnd: the walsender's CPU. confirm: marker deleted -> slot's")
            out("   confirmed_flush_lsn at the end. wakeups: voluntary context switches (blocking reads and waits).")
            out("   other: CPU used by other programs on the machine meanwhile (noise).")
            c["summary"] = summary

        lat = self.results.get("latency")
        if lat:
            out("")
            out(f"2. Latency: commit returned -> key deleted in Redis (pginval) / change received (pg_recvlogical, the")
            out(f"   baseline), single-row UPDATEs by pgbench at a fixed rate, 4 clients, {a.latency_secs} s per rate, each consumer alone")
            out(f"   {'consumer':<17}{'rate':>6}{'probes':>8}{'p50 ms':>9}{'target':>8}{'p99 ms':>9}{'target':>8}{'max ms':>9}"
                f"{'pgbench tps':>13}{'sched lag':>11}{'CPU':>6}{'walsnd':>8}{'other':>7}{'busy':>6}")
            targets = {2000: (0.4, 1.0), 5000: (1.0, 5.0)}
            for rate in a.rates:
                for consumer, label in (("recv", "pg_recvlogical"), ("pginval", "pginval")):
                    r = lat.get(consumer, {}).get(str(rate))
                    if not r:
                        continue
                    t50, t99 = targets.get(rate, (None, None)) if consumer == "pginval" else (None, None)
                    out(f"   {label:<17}{rate:>6}{r['probes']:>8}{f(r['p50_ms']):>9}{f(t50, '≤{:g}') if t50 else '':>8}{f(r['p99_ms']):>9}"
                        f"{f(t99, '≤{:g}') if t99 else '':>8}{f(r['max_ms'], '{:.2f}'):>9}{f(r['pgbench_tps'], '{:.0f}'):>13}"
                        f"{f(r['pgbench_lag_avg_ms'], '{:.2f}') + ' ms':>11}{f(r['cpu_pct'], '{:.0f}') + '%':>6}"
                        f"{f(r['walsender_cpu_pct'], '{:.0f}') + '%':>8}{f(r['other_cpu_pct'], '{:.0f}') + '%':>7}"
                        f"{f(r['machine_busy_pct'], '{:.0f}') + '%':>6}"
                        + (f"   p50 {verdict(r['p50_ms'], t50)}, p99 {verdict(r['p99_ms'], t99)}" if t50 else ""))
            for rate in a.rates:
                r = lat.get("pginval", {}).get(str(rate))
                if r and "own_p99_ms" in r:
                    out(f"   pginval's own share at {rate} tps (socket read of the commit -> Redis ack, every transaction, "
                        f"from its histogram): p50 <= {r['own_p50_ms']:.3f} ms, p99 <= {r['own_p99_ms']:.3f} ms")
            if "pginval" in lat:
                out(f"   pginval peak RSS over the latency test: {lat['pginval']['rss_mb']:.1f} MB. CPU, walsnd: the consumer's and its")
                out("   walsender's, in % of one core.")
                out("   other: CPU used by other programs on the machine meanwhile (noise). busy: the whole machine's CPU use,")
                out("   in % of all its cores. sched lag: pgbench's own schedule lag.")

        cl = self.results.get("clusterlatency")
        if cl:
            out("")
            out(f"2b. Latency against a Redis Cluster (3 primaries, a replica each) next to one Redis, same invocation:")
            out(f"   commit returned -> key deleted, single-row UPDATEs by pgbench at a fixed rate, {a.latency_secs} s per rate")
            out(f"   {'consumer':<24}{'rate':>6}{'probes':>8}{'p50 ms':>9}{'target':>8}{'p99 ms':>9}{'target':>8}{'max ms':>9}"
                f"{'own p99':>9}{'CPU':>6}{'steal':>7}")
            targets = {2000: (0.6, 2.0)}
            for rate in a.rates:
                for consumer, label in (("pginval", "pginval, one Redis"), ("pginval-cluster", "pginval, Redis Cluster")):
                    r = cl.get(consumer, {}).get(str(rate))
                    if not r:
                        continue
                    t50, t99 = targets.get(rate, (None, None)) if consumer == "pginval-cluster" else (None, None)
                    out(f"   {label:<24}{rate:>6}{r['probes']:>8}{f(r['p50_ms']):>9}{f(t50, '≤{:g}') if t50 else '':>8}{f(r['p99_ms']):>9}"
                        f"{f(t99, '≤{:g}') if t99 else '':>8}{f(r['max_ms'], '{:.2f}'):>9}{f(r.get('own_p99_ms')):>9}"
                        f"{f(r['cpu_pct'], '{:.0f}') + '%':>6}{f(r['steal_pct'], '{:.0f}') + '%':>7}"
                        + (f"   p50 {verdict(r['p50_ms'], t50)}, p99 {verdict(r['p99_ms'], t99)}" if t50 else ""))
            out("   own p99: pginval's own share (socket read of the commit -> Redis ack), histogram bucket bound.")

        race = self.results.get("race")
        if race:
            out("")
            out(f"4. The read-then-set race: {RACE_READERS} cache-aside readers (GET, on a miss SELECT + delay + SET EX 3600),")
            out(f"   {RACE_WRITERS} writers at {a.race_tps} UPDATEs/s on {RACE_ROWS} skewed rows, {a.race_secs:g} s per run, medians of {a.race_runs} runs")
            out(f"   {'delay':>6} {'mode':<22}{'stale keys':>11}{'of keys':>9}{'stale reads':>13}{'fills':>8}{'refused':>9}{'hits':>9}{'writes':>8}")
            labels = {"ttl": "TTL only", "app": "app deletes", "pginval": "pginval", "redelete": "pginval + redelete 50ms",
                      "fence": "pginval + fence"}
            for delay, modes in race.items():
                for mode in ("ttl", "app", "pginval", "redelete", "fence"):
                    runs = modes.get(mode)
                    if not runs:
                        continue
                    med = lambda k: median([r[k] for r in runs])
                    out(f"   {delay + ' ms':>6} {labels[mode]:<22}{med('stale_keys'):>11g}{med('keys'):>9g}"
                        f"{100 * med('stale_read_ratio'):>12.1f}%{med('fills'):>8g}{med('refused_fills'):>9g}{med('hits'):>9g}{med('writes'):>8g}"
                        f"   (stale keys per run: {', '.join(str(r['stale_keys']) for r in runs)})")
            out("   stale keys: cached values that differ from the row once every invalidation is done (stale for the TTL).")
            out("   stale reads: sampled hits (10 %) whose value is older than the row read right after.")
            out("   refused: fills the fence turned down (the key was invalidated between the read and the fill).")

        b = self.results.get("big")
        if b:
            runs = b["runs"]
            out("")
            out(f"3. Big transaction: one UPDATE of {runs[0]['rows']:,} rows (+ marker), median of {len(runs)} run{'s' if len(runs) != 1 else ''}")
            rw = median([r["recv"]["wall_s"] for r in runs])
            out(f"   {'consumer':<34}{'wall s':>8}{'ratio':>8}{'target':>8}{'':>8}{'CPU s':>8}{'RSS MB':>8}{'walsnd s':>10}{'other s':>9}")
            summary = {"recv_wall_s": rw}
            for who, label in (("recv", "pg_recvlogical, bench_big"), ("inval", "pginval: exact keys, in parts"),
                               ("fallback", "pginval, limit 100k: fallback")):
                if who not in runs[0]:
                    continue
                wall = median([r[who]["wall_s"] for r in runs])
                ratio = None if who == "recv" else median([r[who]["wall_s"] / r["recv"]["wall_s"] for r in runs])
                rss = median([r[who]["rss_mb"] for r in runs])
                summary[who] = {"wall_s": wall, "ratio": ratio, "rss_mb": rss}
                out(f"   {label:<34}{f(wall, '{:.2f}'):>8}{f(ratio, '{:.2f}') if ratio else '':>8}{'≤1.10' if ratio else '':>8}"
                    f"{verdict(ratio, 1.1) if ratio else '':>8}{f(median([r[who]['cpu_s'] for r in runs]), '{:.2f}'):>8}{f(rss, '{:.1f}'):>8}"
                    f"{f(median([r[who]['walsender_cpu_s'] for r in runs]), '{:.2f}'):>10}{f(median([r[who]['other_cpu_s'] for r in runs]), '{:.2f}'):>9}")
                if who != "recv":
                    out(f"   {'':<34}peak RSS target ≤ 100 MB: {verdict(rss, 100)}")
            b["summary"] = summary

        bc = self.results.get("bigcommit")
        if bc:
            runs = bc["runs"]
            out("")
            out(f"3b. Big transaction, pginval streaming: one UPDATE of {runs[0]['v1']['rows']:,} rows, commit returned -> "
                f"last key gone, median of {len(runs)} run{'s' if len(runs) != 1 else ''}")
            out(f"   {'mode':<40}{'UPDATE s':>10}{'commit->gone s':>16}{'target':>8}{'':>8}{'CPU s':>8}{'RSS MB':>8}{'target':>8}{'':>8}")
            summary = {}
            for mode, label in (("v1", "streaming = false (protocol 1)"), ("streamed", "streaming = true (protocol 2), 8MB"),
                                ("streamed64", "streaming = true, server's 64MB")):
                gone = median([r[mode]["commit_to_gone_s"] for r in runs])
                rss = median([r[mode]["rss_mb"] for r in runs])
                target = mode == "streamed"
                summary[mode] = {"commit_to_gone_s": gone, "rss_mb": rss, "per_run": [r[mode]["commit_to_gone_s"] for r in runs]}
                out(f"   {label:<40}{f(median([r[mode]['update_s'] for r in runs]), '{:.2f}'):>10}{f(gone, '{:.3f}'):>16}"
                    f"{'≤2' if target else '':>8}{verdict(gone, 2.0) if target else '':>8}"
                    f"{f(median([r[mode]['cpu_s'] for r in runs]), '{:.2f}'):>8}{f(rss, '{:.1f}'):>8}"
                    f"{'≤150' if target else '':>8}{verdict(rss, 150) if target else '':>8}")
                out(f"   {'':<40}per run: {', '.join(f'{x:.3f}' for x in summary[mode]['per_run'])}")
                behind = ", ".join(f"{r[mode]['walsender_behind_mb']:.0f}" for r in runs)
                out(f"   {'':<40}walsender behind at the commit, MB of WAL: {behind}")
            ratio = median([r["streamed"]["commit_to_gone_s"] / r["v1"]["commit_to_gone_s"] for r in runs])
            out(f"   streamed / protocol 1, commit -> last key gone: {ratio:.3f}")
            summary["ratio"] = ratio
            bc["summary"] = summary

        for name, top in self.profiles.items():
            out("")
            out(f"Profile of pginval ({name}; perf record -e cpu-clock, whole process lifetime, self time):")
            for line in top:
                out(f"   {line}")
        self.results["profiles"] = self.profiles

        if self.warnings:
            out("")
            out("Noticed:")
            seen = set()
            for w in self.warnings:
                if w not in seen:
                    seen.add(w)
                    out(f"   {w}")
        self.results["noticed"] = self.warnings
        return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pg-bindir", required=True)
    ap.add_argument("--pg-data", required=True)
    ap.add_argument("--pg-port", type=int, required=True)
    ap.add_argument("--redis-port", type=int, required=True)
    ap.add_argument("--redis-pid", type=int, required=True)
    ap.add_argument("--pginval", required=True)
    ap.add_argument("--work", required=True, help="directory for configs and logs")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--big-runs", type=int, default=None)
    ap.add_argument("--backlog", type=int, default=40000)
    ap.add_argument("--latency-secs", type=int, default=15)
    ap.add_argument("--rates", default="2000,5000")
    ap.add_argument("--only", default="catchup,latency,big")
    ap.add_argument("--timeout", type=float, default=300, help="longest wait for pginval to finish a backlog")
    ap.add_argument("--confirm-wait", type=float, default=1.0, help="how long to watch for the confirmed flush position")
    ap.add_argument("--json")
    ap.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2f", help="RabbitMQ for the events phase")
    ap.add_argument("--amqp-ceiling", help="examples/amqp_ceiling binary: RabbitMQ's own rate, the events phase's reference")
    ap.add_argument("--perf", action="store_true", help="profile pginval's catch-up runs with perf record")
    ap.add_argument("--race-secs", type=float, default=10, help="seconds of load per race run")
    ap.add_argument("--race-runs", type=int, default=3, help="race runs per mode and reader delay")
    ap.add_argument("--race-delays", default="0,10", help="readers' processing delays in ms, for the race")
    ap.add_argument("--race-tps", type=int, default=500, help="the race's writes per second (all writers)")
    a = ap.parse_args()
    a.rates = [int(x) for x in a.rates.split(",") if x]
    a.race_delays = [int(x) for x in a.race_delays.split(",") if x]
    a.only = [x for x in a.only.split(",") if x]
    if a.big_runs is None:
        a.big_runs = a.runs
    # scripts/bench.sh sends SIGTERM on Ctrl-C: unwind, so every child is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    b = Bench(a)
    try:
        for phase in ("catchup", "cluster", "events", "latency", "clusterlatency", "race", "big", "bigcommit"):
            if phase in a.only:
                getattr(b, phase)()
    finally:
        stop_all()
        text = b.report()
        if a.json:
            with open(a.json, "w") as f:
                json.dump(b.results, f, indent=2, default=str)
        print(text, flush=True)


if __name__ == "__main__":
    main()
