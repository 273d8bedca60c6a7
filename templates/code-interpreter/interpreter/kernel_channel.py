"""colima-e2b code interpreter: the kernel end of the server <-> kernel channel.

Shared by python_kernel.py and bash_kernel.py (js_kernel.js speaks the same protocol).

server.py starts every kernel as its own process (own session) with `--fd N`, N being
one end of a Unix socketpair. Over that socket, one JSON object per line:

  server -> kernel  {"type": "execute", "code": str, "env": {..}, "env_run": {..}}
                    "env" is set for good, "env_run" for this run only.
  kernel -> server  {"type": "ready", "nonce": str}            once, when warm
                    {"type": "count", "n": int}                 a run has started
                    {"type": "result", "result": {..}, "main": bool}
                    {"type": "error", "name", "value", "traceback"}
                    {"type": "done"}                            the run is over

The kernel's fd 1 and 2 are pipes that server.py reads itself, so the output of user code
and of its child processes needs no relaying. To keep the order between those pipes and
this socket, every message after "ready" is preceded by a marker b"\\0<nonce>:<seq>\\0"
written to fd 1 and to fd 2; the message carries "sync": seq. server.py strips the
markers, holds the message back until it has read marker seq on both pipes, and holds
the output after a marker back until that message is queued.

SIGINT (server.py signals the kernel's process group) interrupts user code only while a
run is in progress; while the kernel sends a message it is deferred, so an interrupt can
never leave half a message on the socket.
"""

import json
import os
import signal
import socket
import sys
import threading

# A message larger than this is dropped (server.py accepts lines up to 32 MiB).
MAX_MESSAGE = 24 << 20


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]


class Channel:
    """The socket to server.py, the output markers and the SIGINT policy of a kernel."""

    def __init__(self, on_interrupt=None):
        fd = int(sys.argv[sys.argv.index("--fd") + 1])
        os.set_inheritable(fd, False)  # children of user code must not hold the socket
        self._sock = socket.socket(fileno=fd)
        self._rfile = self._sock.makefile("rb")
        self.nonce = os.urandom(8).hex()
        self._seq = 0
        self._lock = threading.Lock()
        # While True, SIGINT calls on_interrupt (default: raise KeyboardInterrupt).
        self.running = False
        self._on_interrupt = on_interrupt
        self._sending = 0
        self._deferred = False
        signal.signal(signal.SIGINT, self._sigint)

    def _sigint(self, signum, frame):
        if not self.running:
            return  # an interrupt that arrives between runs is moot
        if self._on_interrupt is not None:
            self._on_interrupt()
        elif self._sending:
            self._deferred = True
        else:
            raise KeyboardInterrupt

    def ready(self):
        """Tells the server the kernel is warm (and the nonce of its markers)."""
        self._sock.sendall(json.dumps({"type": "ready", "nonce": self.nonce}).encode() + b"\n")

    def send(self, msg):
        """Sends one message after the output written so far (see the module doc)."""
        main = threading.current_thread() is threading.main_thread()
        if main:
            self._sending += 1
        try:
            with self._lock:
                self._seq += 1
                line = json.dumps({**msg, "sync": self._seq}, default=str).encode()
                if len(line) > MAX_MESSAGE:
                    # Say so on stderr instead; "dropped" is a message server.py ignores.
                    print(f"[colima-e2b: a {msg.get('type')} of {len(line) >> 20} MiB was dropped,"
                          f" the limit is {MAX_MESSAGE >> 20} MiB]", file=sys.stderr)
                    line = json.dumps({"type": "dropped", "sync": self._seq}).encode()
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:
                        pass
                marker = b"\0%s:%d\0" % (self.nonce.encode(), self._seq)
                for fd in (1, 2):
                    try:
                        _write_all(fd, marker)
                    except OSError:
                        pass  # fd closed by user code: server.py then sees EOF on that pipe
                self._sock.sendall(line + b"\n")
        finally:
            if main:
                self._sending -= 1
                if self._deferred and not self._sending:
                    self._deferred = False
                    if self.running:
                        raise KeyboardInterrupt

    def recv(self):
        """The next command, or None when server.py has gone."""
        line = self._rfile.readline()
        return json.loads(line) if line else None
