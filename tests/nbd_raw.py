#!/usr/bin/env python3
"""Raw-socket NBD client for malformed and edge-case requests that real
clients refuse to send. Usage: nbd_raw.py SOCKET EXPORT SCENARIO.
Exits non-zero with a message when the server does not behave as the NBD
spec says."""
import os
import socket
import struct
import sys

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE = 0x67446698
STRUCT = 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED, OPT_LIST_META, OPT_SET_META = 1, 2, 3, 6, 7, 8, 9, 10
ERR_UNSUP = (1 << 31) + 1
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = range(8)
EPERM, EINVAL, ENOSPC, EOVERFLOW = 1, 22, 28, 75


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


class Conn:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(path)

    def recvn(self, n):
        b = b""
        while len(b) < n:
            c = self.s.recv(n - len(b))
            if not c:
                raise EOFError("server closed the connection")
            b += c
        return b

    def closed(self):
        """True if the server closes without sending anything more."""
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True

    def greet(self):
        magic, opt, flags = struct.unpack(">QQH", self.recvn(18))
        check(magic == 0x4E42444D41474943 and opt == IHAVEOPT, "bad greeting")
        check(flags & 1, "server is not fixed newstyle")
        self.s.sendall(struct.pack(">I", 3))  # fixed newstyle + no zeroes

    def opt(self, code, data=b""):
        self.s.sendall(struct.pack(">QII", IHAVEOPT, code, len(data)) + data)

    def opt_reply(self):
        magic, opt, kind, ln = struct.unpack(">QIII", self.recvn(20))
        check(magic == REPLY_MAGIC, "bad option reply magic")
        return opt, kind, self.recvn(ln)

    def go(self, export, structured=False, contexts=()):
        if structured:
            self.opt(OPT_STRUCTURED)
            check(self.opt_reply()[1] == 1, "structured replies refused")
        if contexts:
            d = struct.pack(">I", len(export)) + export.encode() + struct.pack(">I", len(contexts))
            for c in contexts:
                d += struct.pack(">I", len(c)) + c.encode()
            self.opt(OPT_SET_META, d)
            self.ids = {}
            while True:
                _, kind, data = self.opt_reply()
                if kind == 1:
                    break
                check(kind == 4, "unexpected meta context reply %x" % kind)
                self.ids[data[4:].decode()] = struct.unpack(">I", data[:4])[0]
        self.opt(OPT_GO, struct.pack(">I", len(export)) + export.encode() + struct.pack(">H", 0))
        size = flags = None
        while True:
            _, kind, data = self.opt_reply()
            if kind == 1:
                break
            check(kind == 3, "GO failed with reply type %x: %r" % (kind, data))
            if struct.unpack(">H", data[:2])[0] == 0:
                size, flags = struct.unpack(">QH", data[2:12])
        self.structured = structured
        return size, flags

    def req(self, cmd, offset, length, flags=0, cookie=1, payload=b"", magic=REQ_MAGIC):
        self.s.sendall(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload)

    def reply(self):
        """Returns (cookie, error, data) for simple or structured replies."""
        magic = struct.unpack(">I", self.recvn(4))[0]
        if magic == SIMPLE:
            err, cookie = struct.unpack(">IQ", self.recvn(12))
            return cookie, err, None
        check(magic == STRUCT, "bad reply magic %x" % magic)
        flags, kind, cookie, ln = struct.unpack(">HHQI", self.recvn(16))
        data = self.recvn(ln)
        if kind == 0x8001:
            err = struct.unpack(">I", data[:4])[0]
            return cookie, err, data
        return cookie, 0, (kind, flags, data)

    def expect_error(self, err, what, **kw):
        kw.setdefault("cookie", 77)
        self.req(**kw)
        cookie, e, _ = self.reply()
        check(cookie == kw["cookie"], "%s: reply for the wrong cookie" % what)
        check(e == err, "%s: expected error %d, got %d" % (what, err, e))


def scenario_options(path, export):
    c = Conn(path)
    c.greet()
    c.opt(99, b"junk")
    check(c.opt_reply()[1] == ERR_UNSUP, "unknown option not answered with ERR_UNSUP")
    c.opt(OPT_LIST)
    names = []
    while True:
        _, kind, data = c.opt_reply()
        if kind == 1:
            break
        check(kind == 2, "LIST: unexpected reply %x" % kind)
        n = struct.unpack(">I", data[:4])[0]
        names.append(data[4:4 + n].decode())
    check(export in names, "LIST does not show %s: %r" % (export, names))
    c.opt(OPT_GO, struct.pack(">I", 7) + b"missing" + struct.pack(">H", 0))
    check(c.opt_reply()[1] == (1 << 31) + 6, "GO for a missing export is not ERR_UNKNOWN")
    size, _ = c.go(export)
    check(size > 0, "no size after GO")
    c.req(READ, 0, 512)
    cookie, err, _ = c.reply()
    check(err == 0, "read after option errors failed")
    c.recvn(512)
    c.req(DISC, 0, 0)
    check(c.closed(), "server did not close after DISC")


def scenario_simple_errors(path, export):
    c = Conn(path)
    c.greet()
    size, flags = c.go(export)
    c.expect_error(EINVAL, "read past the end", cmd=READ, offset=size - 1, length=2)
    c.expect_error(EINVAL, "read with offset overflow", cmd=READ, offset=(1 << 64) - 1, length=2)
    c.expect_error(ENOSPC, "write past the end", cmd=WRITE, offset=size, length=4, payload=b"abcd")
    c.expect_error(EINVAL, "trim past the end", cmd=TRIM, offset=size - 512, length=1024)
    c.expect_error(EINVAL, "unknown command", cmd=42, offset=0, length=0)
    c.expect_error(EINVAL, "unknown flag", cmd=FLUSH, offset=0, length=0, flags=0x4000)
    c.expect_error(EINVAL, "read above the maximum without structured replies", cmd=READ, offset=0, length=33 << 20)
    c.expect_error(EINVAL, "block status without structured replies", cmd=BS, offset=0, length=512)
    c.expect_error(EINVAL, "DF without structured replies", cmd=READ, offset=0, length=512, flags=4)
    # Still usable: write then read back.
    c.req(WRITE, 4096, 4, payload=b"wxyz", cookie=5)
    check(c.reply()[:2] == (5, 0), "valid write failed after errors")
    c.req(READ, 4096, 4, cookie=6)
    check(c.reply()[:2] == (6, 0), "valid read failed after errors")
    check(c.recvn(4) == b"wxyz", "read back wrong data")
    # Pipelined requests all get answered (in any order).
    for i in range(64):
        c.req(READ, i * 512, 512, cookie=1000 + i)
    seen = set()
    for _ in range(64):
        cookie, err, _ = c.reply()
        check(err == 0, "pipelined read failed")
        c.recvn(512)
        seen.add(cookie)
    check(seen == set(range(1000, 1064)), "pipelined replies missing")


def scenario_structured(path, export):
    c = Conn(path)
    c.greet()
    size, flags = c.go(export, structured=True, contexts=["base:allocation", "qemu:dirty-bitmap:cbt"])
    check(set(c.ids) == {"base:allocation", "qemu:dirty-bitmap:cbt"}, "contexts not selected: %r" % c.ids)
    c.expect_error(EINVAL, "structured read past the end", cmd=READ, offset=size, length=1)
    c.expect_error(EOVERFLOW, "read above the maximum block size", cmd=READ, offset=0, length=33 << 20)
    c.expect_error(EINVAL, "zero-length block status", cmd=BS, offset=0, length=0)
    c.req(WRITE, 0, 3, payload=b"abc", cookie=9)
    check(c.reply()[:2] == (9, 0), "write failed")
    c.req(READ, 0, 3, cookie=10)
    cookie, err, (kind, fl, data) = c.reply()
    check(kind == 1 and fl & 1 and data[8:] == b"abc", "structured read reply wrong")
    c.req(BS, 0, size, cookie=11, flags=8)  # REQ_ONE
    got = {}
    while True:
        cookie, err, (kind, fl, data) = c.reply()
        check(kind == 5, "expected a block status chunk")
        cid = struct.unpack(">I", data[:4])[0]
        ext = [struct.unpack(">II", data[i:i + 8]) for i in range(4, len(data), 8)]
        got[cid] = ext
        if fl & 1:
            break
    check(len(got) == 2, "block status chunks for %d contexts" % len(got))
    dirty = got[c.ids["qemu:dirty-bitmap:cbt"]]
    check(len(dirty) == 1 and dirty[0][1] == 1, "REQ_ONE dirty extent wrong: %r" % dirty)


def scenario_spec_divergences(path, export):
    """The four the conformance run against libnbd found."""
    c = Conn(path)
    c.greet()
    size, flags = c.go(export, structured=True, contexts=["base:allocation"])
    FUA = 1
    # FUA is accepted on every command once advertised.
    for cmd, ln in ((READ, 512), (FLUSH, 0), (CACHE, 512), (BS, 512)):
        c.req(cmd, 0, ln, flags=FUA, cookie=20 + cmd)
        while True:
            cookie, err, rest = c.reply()
            check(err == 0, "FUA on command %d answered error %d" % (cmd, err))
            if rest is None or rest[1] & 1:
                break
    # A zero-length read gets no OFFSET_DATA chunk (libnbd drops the
    # connection over one), but a done NONE chunk.
    c.req(READ, 0, 0, cookie=30)
    cookie, err, rest = c.reply()
    check(cookie == 30 and err == 0, "zero-length read failed")
    check(rest is not None and rest[0] == 0 and rest[1] & 1 and rest[2] == b"",
          "zero-length read not answered with a done NONE chunk: %r" % (rest,))
    # A DISC with a flag set still ends the connection.
    c.req(DISC, 0, 0, flags=FUA)
    check(c.closed(), "server did not close after a DISC with a flag set")


def scenario_read_only(path, export):
    c = Conn(path)
    c.greet()
    size, flags = c.go(export)
    check(flags & 2, "read-only flag not advertised")
    c.expect_error(EPERM, "write to a read-only export", cmd=WRITE, offset=0, length=4, payload=b"abcd")
    c.expect_error(EPERM, "trim on a read-only export", cmd=TRIM, offset=0, length=4096)
    c.expect_error(EPERM, "write zeroes on a read-only export", cmd=WZ, offset=0, length=4096)


def scenario_bad_magic(path, export):
    c = Conn(path)
    c.greet()
    c.go(export)
    c.req(READ, 0, 512, magic=0x12345678)
    check(c.closed(), "server answered a request with a bad magic instead of disconnecting")


def scenario_oversized_write(path, export):
    c = Conn(path)
    c.greet()
    c.go(export)
    c.req(WRITE, 0, 64 << 20)
    check(c.closed(), "server did not disconnect on a write above the maximum payload")


def scenario_garbage_handshake(path, export):
    c = Conn(path)
    c.recvn(18)
    c.s.sendall(os.urandom(64))
    check(c.closed(), "server did not close on a garbage handshake")
    c = Conn(path)
    c.greet()
    c.s.sendall(struct.pack(">QII", IHAVEOPT, 99, 1 << 30))
    _, kind, _ = c.opt_reply()
    check(kind == (1 << 31) + 9, "oversized option not answered with ERR_TOO_BIG")
    c.s.close()


if __name__ == "__main__":
    sock, export, name = sys.argv[1:4]
    globals()["scenario_" + name.replace("-", "_")](sock, export)
    print("ok " + name)
