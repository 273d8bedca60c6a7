#!/usr/bin/env python3
"""colima-e2b code interpreter: the HTTP service on port 49999 of a code-interpreter sandbox.

It speaks the protocol of E2B's code-interpreter SDKs (PyPI e2b-code-interpreter 2.x, npm
@e2b/code-interpreter 2.x), standard library only:

  GET    /health                  200 "OK"
  POST   /execute                 200 NDJSON stream of the run's events (below)
  GET    /contexts                200 [{"id", "language", "cwd"}]
  POST   /contexts                200 {"id", "language", "cwd"}
  DELETE /contexts/{id}           204
  POST   /contexts/{id}/restart   204
  errors                          JSON {"code": status, "message": text}

A run streams, one JSON object a line, as it happens: {"type": "number_of_executions"},
"stdout" / "stderr" ({"text", "timestamp"}: unix ns), "result" (text, html, png, ...
and is_main_result), "error" (name, value, traceback) and last always
{"type": "end_of_execution"}.

Each context is one kernel process in its own session (python_kernel.py, js_kernel.js,
bash_kernel.py; their protocol is described in kernel_channel.py), so contexts never
share state and an interrupt (SIGINT to the kernel's process group) also reaches the
processes user code started. A context runs one cell at a time; further runs queue.
When a client goes away during a run, the run is interrupted, and a kernel that has not
finished the cell 10 s later is killed and replaced (its state is lost).

Before each run the sandbox's environment is read from the sandbox agent (GET /envs);
the agent refusing the request's X-Access-Token is this service's access check.
"""

import asyncio
import codecs
import http
import json
import os
import shutil
import signal
import socket
import sys
import time
import urllib.parse
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
PORT = int(os.environ.get("COLIMA_E2B_INTERPRETER_PORT") or 49999)
ENVD_URL = os.environ.get("COLIMA_E2B_ENVD_URL") or "http://127.0.0.1:49983"

MAX_BODY = 10 << 20  # request bodies
MAX_HEADER_LINES = 100
MAX_MESSAGE = 32 << 20  # a kernel message line (a result with a big PNG)
READ_CHUNK = 64 << 10  # output is read, and sent as events, in pieces of at most this
RUN_QUEUE = 64  # events buffered between a kernel and a slow client
HIGH_WATER = 256 << 10  # buffered response bytes before waiting for the client
MAX_CONTEXTS = 64
KERNEL_START_TIMEOUT = 60
INTERRUPT_GRACE = 10  # seconds a cell gets to stop after the client went away
INTERRUPT_REPEAT = 2  # the SIGINT is repeated this often until it takes
IDLE_TIMEOUT = 600  # an idle keep-alive connection is closed after this
ENVS_TIMEOUT = 3

LANGUAGES = {"python": "python", "python3": "python", "javascript": "javascript",
             "js": "javascript", "bash": "bash", "sh": "bash"}


def log(msg):
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} interpreter: {msg}", file=sys.stderr, flush=True)


class HttpError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class KernelError(Exception):
    """A kernel could not be started."""


def default_cwd():
    return "/home/user" if os.path.isdir("/home/user") else os.path.expanduser("~")


def normalize_language(language):
    if language is None:
        return "python"
    if not isinstance(language, str):
        raise HttpError(400, "language must be a string")
    lang = LANGUAGES.get(language.strip().lower())
    if lang is None:
        raise HttpError(400, f"unsupported language {language!r}; supported: python, javascript, bash")
    return lang


def check_env(value, what):
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise HttpError(400, f"{what} must be an object of strings")
    return value


# -- kernels ---------------------------------------------------------------------------

def kernel_argv(language):
    if language == "python":
        return [sys.executable, os.path.join(HERE, "python_kernel.py")]
    if language == "bash":
        return [sys.executable, os.path.join(HERE, "bash_kernel.py")]
    node = shutil.which("node")
    if node is None:
        raise KernelError("node is not installed: JavaScript contexts are unavailable")
    # --expose-internals: the kernel uses node's REPL transform for top-level await.
    return [node, "--expose-internals", os.path.join(HERE, "js_kernel.js")]


class Kernel:
    """One kernel process: its output pipes, its channel and the run in progress.

    Output and messages go to `sink`, the queue of the run in progress (None between
    runs: output of leftover background processes is then dropped). The markers of
    kernel_channel.py order the two: message n waits until both pipes have been read up
    to marker n, and a pipe at marker n waits until message n has been queued. So a
    run's events keep the kernel's order, and its end comes after all of its output.
    """

    def __init__(self, language, cwd, env):
        self.language = language
        self.proc = None
        self.nonce = None  # marker nonce, told in "ready"
        self.ready = asyncio.get_running_loop().create_future()
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # no warning if unawaited
        self.dead = False
        self.returncode = None
        self.kill_reason = None  # set when we kill it: how the run it ends explains it
        self.applied_env = {}  # agent envs already set in the kernel
        self.sink = None
        self._synced = {"stdout": 0, "stderr": 0}  # last marker read from each pipe
        self._waiting = {"stdout": True, "stderr": True}  # pump waits for the kernel
        self._sync_changed = asyncio.Event()
        self._delivered = 0  # last message queued (or dropped)
        self._delivery = asyncio.Event()
        self._log = b""  # tail of the stderr of the kernel outside runs (start errors)
        self._writer = None
        self._task = asyncio.create_task(self._main(kernel_argv(language), cwd, env))

    async def _main(self, argv, cwd, env):
        parent, child = socket.socketpair()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, "--fd", str(child.fileno()), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                pass_fds=(child.fileno(),), start_new_session=True, cwd=cwd, env=env)
        except OSError as e:
            parent.close()
            self._finish(f"cannot start the {self.language} kernel: {e}")
            return
        finally:
            child.close()
        if self.kill_reason:  # killed while starting
            self._signal(signal.SIGKILL)
        reader, self._writer = await asyncio.open_connection(sock=parent, limit=MAX_MESSAGE)
        pumps = [asyncio.create_task(self._pump(self.proc.stdout, "stdout")),
                 asyncio.create_task(self._pump(self.proc.stderr, "stderr"))]
        messages = asyncio.create_task(self._messages(reader))
        exited = asyncio.create_task(self.proc.wait())
        await asyncio.wait({messages, exited}, return_when=asyncio.FIRST_COMPLETED)
        # The kernel is gone (or broke the protocol). Its last messages and output may
        # still be in flight: give them a moment, then end its process group, whose
        # members could otherwise hold the pipes open.
        await asyncio.wait({messages}, timeout=0.5)
        self._signal(signal.SIGKILL)
        self.returncode = await self.proc.wait()
        await asyncio.wait(pumps, timeout=0.5)
        for task in (messages, *pumps):
            task.cancel()
        self._writer.close()
        self._finish(f"the {self.language} kernel exited with status {self.returncode}")
        if self.sink is not None:
            await self.sink.put(("exit", self.returncode))

    def _finish(self, why):
        self.dead = True
        if not self.ready.done():
            tail = self._log.decode("utf-8", "replace").strip()
            self.ready.set_exception(KernelError(f"{why}: {tail}" if tail else why))

    async def _messages(self, reader):
        while True:
            try:
                line = await reader.readline()
            except ValueError:
                log(f"{self.language} kernel: message over {MAX_MESSAGE >> 20} MiB, killing it")
                return
            if not line:
                return
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("type") == "ready":
                self.nonce = str(msg.get("nonce", "")).encode()
                if not self.ready.done():
                    self.ready.set_result(None)
                continue
            seq = msg.get("sync")
            await self._barrier(seq)
            if self.sink is not None:
                await self.sink.put(("msg", msg))
            if isinstance(seq, int):
                self._delivered = seq
                self._delivery.set()

    async def _barrier(self, seq):
        """Waits until both pipes have been read up to marker `seq`."""
        if not isinstance(seq, int):
            return
        while min(self._synced.values()) < seq:
            self._sync_changed.clear()
            try:
                await asyncio.wait_for(self._sync_changed.wait(), 2)
            except asyncio.TimeoutError:
                # A marker is written before its message, so a pipe that has nothing
                # more to read by now will not bring it (user code moved fd 1 or 2).
                if all(self._waiting[n] for n, s in self._synced.items() if s < seq):
                    return

    async def _pump(self, stream, name):
        """Reads one output pipe: its text goes to the run, its markers to _synced."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        buf = b""
        while True:
            self._waiting[name] = True
            chunk = await stream.read(READ_CHUNK)
            self._waiting[name] = False
            if not chunk:
                break
            buf += chunk
            while True:
                out, seq, buf = self._split(buf)
                await self._output(name, decoder.decode(out))
                if seq is None:
                    break
                await self._output(name, decoder.decode(b"", final=True))
                self._synced[name] = seq
                self._sync_changed.set()
                while self._delivered < seq:  # what follows comes after message seq
                    self._delivery.clear()
                    await self._delivery.wait()
        await self._output(name, decoder.decode(buf, final=True))
        self._synced[name] = float("inf")
        self._sync_changed.set()

    def _split(self, buf):
        """(output before the next marker, its number or None, the rest of buf)."""
        if self.nonce is None:
            return buf, None, b""
        prefix = b"\0" + self.nonce + b":"
        start = 0
        while True:
            i = buf.find(prefix, start)
            if i < 0:
                # Hold back what may be the start of a marker cut by the read.
                j = buf.rfind(b"\0", max(0, len(buf) - len(prefix)))
                if j >= 0 and prefix.startswith(buf[j:]):
                    return buf[:j], None, buf[j:]
                return buf, None, b""
            end = buf.find(b"\0", i + len(prefix))
            if end < 0 and len(buf) - i <= len(prefix) + 20:
                return buf[:i], None, buf[i:]
            if end >= 0 and buf[i + len(prefix):end].isdigit():
                return buf[:i], int(buf[i + len(prefix):end]), buf[end + 1:]
            start = i + 1  # not a marker after all

    async def _output(self, name, text):
        if not text:
            return
        if self.sink is not None:
            await self.sink.put((name, text))
        elif name == "stderr":
            self._log = (self._log + text.encode())[-4096:]

    async def begin(self, msg):
        """Starts a run; returns the queue of its items."""
        queue = self.sink = asyncio.Queue(RUN_QUEUE)
        if self.dead:
            queue.put_nowait(("exit", self.returncode))
            return queue
        try:
            self._writer.write(json.dumps(msg).encode() + b"\n")
            await self._writer.drain()
        except (ConnectionError, OSError):
            pass  # the kernel died: _main reports it to the queue
        return queue

    def end(self, queue):
        """Ends a run; frees pumps that wait on its queue."""
        if self.sink is queue:
            self.sink = None
        while not queue.empty():
            queue.get_nowait()

    def _signal(self, sig):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def interrupt(self):
        self._signal(signal.SIGINT)

    def kill(self, reason):
        self.kill_reason = reason
        self._signal(signal.SIGKILL)


class Context:
    def __init__(self, language, cwd, env_vars):
        self.id = str(uuid.uuid4())
        self.language = language
        self.cwd = cwd
        self.env_vars = env_vars
        self.lock = asyncio.Lock()  # one run at a time; asyncio.Lock is FIFO
        self.kernel = None
        self.closed = False

    def info(self):
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def spawn(self):
        env = dict(os.environ)
        env.update(self.env_vars)
        if self.language == "python":
            env["MPLBACKEND"] = "Agg"  # never an interactive backend: there is no display
        self.kernel = Kernel(self.language, self.cwd, env)

    async def ensure_kernel(self):
        """The context's kernel, started anew if it is gone, once it is warm."""
        if self.kernel is None or self.kernel.dead:
            self.spawn()
        kernel = self.kernel
        try:
            await asyncio.wait_for(asyncio.shield(kernel.ready), KERNEL_START_TIMEOUT)
        except asyncio.TimeoutError:
            kernel.kill("the kernel did not start")
            raise KernelError(f"the {self.language} kernel did not start within"
                              f" {KERNEL_START_TIMEOUT} s") from None
        return kernel

    def restart(self, reason):
        if self.kernel is not None:
            self.kernel.kill(reason)
        self.spawn()

    def close(self):
        self.closed = True
        if self.kernel is not None:
            self.kernel.kill("the context was removed")


class Contexts:
    def __init__(self):
        self.all = {}
        self.defaults = {}  # language -> id of its default context

    def create(self, language, cwd, env_vars):
        if len(self.all) >= MAX_CONTEXTS:
            raise HttpError(429, f"too many contexts (at most {MAX_CONTEXTS}); remove some first")
        ctx = Context(language, cwd, env_vars)
        ctx.spawn()
        self.all[ctx.id] = ctx
        return ctx

    def default(self, language):
        ctx = self.all.get(self.defaults.get(language))
        if ctx is None:
            ctx = self.create(language, default_cwd(), {})
            self.defaults[language] = ctx.id
        return ctx

    def remove(self, ctx):
        self.all.pop(ctx.id, None)
        ctx.close()

    def kill_all(self):
        for ctx in self.all.values():
            ctx.close()


CONTEXTS = Contexts()


# -- the sandbox agent -----------------------------------------------------------------

ENVS_PROBLEM = None


def envs_problem(problem):
    """Logs a problem reading the agent's envs when it starts or ends, not every run."""
    global ENVS_PROBLEM
    if problem != ENVS_PROBLEM:
        log(problem or "the sandbox environment can be read again")
        ENVS_PROBLEM = problem


async def fetch_envs(token):
    """The sandbox's environment from the agent; None if it cannot be read.

    Raises HttpError(401) if the agent refuses the token.
    """
    url = urllib.parse.urlsplit(ENVD_URL)
    path = url.path.rstrip("/") + "/envs"
    headers = f"GET {path} HTTP/1.0\r\nHost: {url.netloc}\r\nAccept: application/json\r\n"
    if token:
        headers += f"X-Access-Token: {token}\r\n"
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            url.hostname, url.port or (443 if url.scheme == "https" else 80),
            ssl=url.scheme == "https"), ENVS_TIMEOUT)
        writer.write((headers + "\r\n").encode("latin-1"))
        answer = b""  # HTTP/1.0: the answer ends with the connection
        while len(answer) <= 1 << 20:
            chunk = await asyncio.wait_for(reader.read(READ_CHUNK), ENVS_TIMEOUT)
            if not chunk:
                break
            answer += chunk
    except (OSError, asyncio.TimeoutError, UnicodeError, ValueError) as e:
        envs_problem(f"cannot read the sandbox environment from {ENVD_URL}: {e!r}")
        return None
    finally:
        if writer is not None:
            writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        envs_problem("the sandbox agent sent no HTTP answer to GET /envs")
        return None
    if status in (401, 403):
        raise HttpError(401, "the sandbox agent refused the access token")
    if status != 200:
        envs_problem(f"the sandbox agent answered GET /envs with {status}")
        return None
    try:
        envs = json.loads(body)
    except ValueError:
        envs = None
    if not isinstance(envs, dict):
        envs_problem("the sandbox agent's GET /envs is not a JSON object")
        return None
    envs_problem(None)
    return {k: v for k, v in envs.items() if isinstance(k, str) and isinstance(v, str)}


# -- HTTP ------------------------------------------------------------------------------

class Request:
    def __init__(self, method, target, version, headers, body):
        self.method = method
        self.path = urllib.parse.urlsplit(target).path or "/"
        self.version = version
        self.headers = headers
        self.body = body

    def json(self):
        if not self.body.strip():
            return {}
        try:
            body = json.loads(self.body)
        except ValueError as e:
            raise HttpError(400, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "the body must be a JSON object")
        return body


class Connection:
    """One client connection: keep-alive requests, one after the other."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.keep_alive = True
        self.gone = None  # while watched: a task that ends when the client goes away

    async def serve(self):
        try:
            while self.keep_alive:
                try:
                    req = await asyncio.wait_for(self.read_request(), IDLE_TIMEOUT)
                except HttpError as e:  # the request could not be read: answer, then close
                    self.keep_alive = False
                    await self.send_json(e.status, {"code": e.status, "message": e.message})
                    break
                if req is None:
                    break
                try:
                    await route(self, req)
                except HttpError as e:
                    await self.send_json(e.status, {"code": e.status, "message": e.message})
                except KernelError as e:
                    await self.send_json(500, {"code": 500, "message": str(e)})
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        except Exception as e:  # a bug: log it, drop the connection, keep serving others
            log(f"request failed: {e!r}")
        finally:
            self.unwatch()
            self.writer.close()

    async def read_request(self):
        try:
            line = await self.reader.readline()
            if not line:
                return None
            method, target, version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            headers = {}
            for _ in range(MAX_HEADER_LINES):
                line = await self.reader.readline()
                if line in (b"\r\n", b"\n"):
                    break
                if not line:
                    raise asyncio.IncompleteReadError(b"", None)
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            else:
                raise HttpError(431, "too many header lines")
        except ValueError:  # a line over the reader's limit, or no 3 parts
            raise HttpError(400, "malformed request") from None
        connection = headers.get("connection", "").lower()
        self.keep_alive = ("close" not in connection if version == "HTTP/1.1"
                           else "keep-alive" in connection)
        return Request(method.upper(), target, version, headers, await self.read_body(headers))

    async def read_body(self, headers):
        if "chunked" in headers.get("transfer-encoding", "").lower():
            await self.continue_100(headers)
            body = b""
            while True:
                size_line = await self.reader.readline()
                try:
                    size = int(size_line.split(b";")[0], 16)
                except ValueError:
                    raise HttpError(400, "malformed chunk") from None
                if size == 0:
                    while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return body
                if len(body) + size > MAX_BODY:
                    raise HttpError(413, f"the body is larger than {MAX_BODY >> 20} MiB")
                body += await self.reader.readexactly(size)
                await self.reader.readline()
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            raise HttpError(400, "malformed Content-Length") from None
        if length > MAX_BODY:
            raise HttpError(413, f"the body is larger than {MAX_BODY >> 20} MiB")
        if length <= 0:
            return b""
        await self.continue_100(headers)
        return await self.reader.readexactly(length)

    async def continue_100(self, headers):
        if headers.get("expect", "").lower() == "100-continue":
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await self.writer.drain()

    def head(self, status, headers):
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", *headers,
                 f"Connection: {'keep-alive' if self.keep_alive else 'close'}", "", ""]
        return "\r\n".join(lines).encode("latin-1")

    async def send_json(self, status, obj=None):
        if status == 204:
            self.writer.write(self.head(status, []))
        else:
            body = json.dumps(obj).encode()
            self.writer.write(self.head(status, ["Content-Type: application/json",
                                                 f"Content-Length: {len(body)}"]) + body)
        await self.writer.drain()

    # Watching for the client going away while a run waits or streams.

    def watch(self):
        async def watch():
            try:
                while await self.reader.read(READ_CHUNK):
                    # A pipelined request: this connection closes after this response.
                    self.keep_alive = False
            except (ConnectionError, OSError):
                pass

        self.gone = asyncio.create_task(watch())

    def unwatch(self):
        if self.gone is not None:
            self.gone.cancel()
            self.gone = None

    async def flush(self):
        """Lets buffered response data out; raises ConnectionError if the client left."""
        if self.writer.transport.is_closing() or self.gone.done():
            raise ConnectionResetError
        if self.writer.transport.get_write_buffer_size() <= HIGH_WATER:
            return
        drain = asyncio.ensure_future(self.writer.drain())
        await asyncio.wait({drain, self.gone}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            drain.cancel()
            raise ConnectionResetError
        drain.result()


class EventStream:
    """The NDJSON body of a run (chunked; raw until close for HTTP/1.0)."""

    def __init__(self, conn, version):
        self.conn = conn
        self.chunked = version != "HTTP/1.0"
        if not self.chunked:
            conn.keep_alive = False

    async def start(self):
        headers = ["Content-Type: application/x-ndjson", "Cache-Control: no-cache",
                   "X-Accel-Buffering: no"]
        if self.chunked:
            headers.append("Transfer-Encoding: chunked")
        self.conn.writer.write(self.conn.head(200, headers))
        await self.conn.flush()

    async def send(self, event):
        data = json.dumps(event, ensure_ascii=False).encode() + b"\n"
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self.conn.writer.write(data)
        await self.conn.flush()

    async def finish(self):
        if self.chunked:
            self.conn.writer.write(b"0\r\n\r\n")
        await self.conn.writer.drain()


def to_event(kernel, item):
    """The SDK event for a kernel item, and whether the run is over."""
    kind, payload = item
    if kind in ("stdout", "stderr"):
        return {"type": kind, "text": payload, "timestamp": time.time_ns()}, False
    if kind == "exit":
        if kernel.kill_reason:
            return {"type": "error", "name": "ContextRestarting", "value": kernel.kill_reason,
                    "traceback": ""}, True
        return {"type": "error", "name": "KernelDied",
                "value": f"the {kernel.language} kernel exited with status {payload}",
                "traceback": "The kernel exited during the run; the next run starts a new one"
                             " (the context's state is lost)."}, True
    kind = payload.get("type")
    if kind == "done":
        return None, True
    if kind == "count":
        return {"type": "number_of_executions", "execution_count": payload.get("n")}, False
    if kind == "result":
        result = dict(payload.get("result") or {})
        text = result.get("text")
        if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] == "'":
            result["text"] = text[1:-1]  # a string value reads as itself, as in E2B
        return {"type": "result", **result, "is_main_result": bool(payload.get("main"))}, False
    if kind == "error":
        return {"type": "error", "name": str(payload.get("name", "Error")),
                "value": str(payload.get("value", "")),
                "traceback": str(payload.get("traceback", ""))}, False
    return None, False


async def stream_run(conn, events, ctx, kernel, msg):
    """Runs one cell and streams its events until the kernel is done with it.

    If the client goes away, the cell is interrupted (the kernel's output is then read
    and dropped); if it is still running INTERRUPT_GRACE seconds later, the kernel is
    killed and replaced: its state is lost, but the context works again.
    """
    loop = asyncio.get_running_loop()
    queue = await kernel.begin(msg)
    deadline = next_sigint = None
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            if deadline is None:
                await asyncio.wait({getter, conn.gone}, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.wait({getter}, timeout=max(0, min(deadline, next_sigint) - loop.time()))
            if getter.done():
                event, final = to_event(kernel, getter.result())
                if event is not None and deadline is None:
                    try:
                        await events.send(event)
                    except ConnectionError:
                        pass  # noticed below
                if final:
                    break
            else:
                getter.cancel()
            now = loop.time()
            if deadline is None and (conn.gone.done() or conn.writer.transport.is_closing()):
                conn.keep_alive = False
                kernel.interrupt()
                deadline, next_sigint = now + INTERRUPT_GRACE, now + INTERRUPT_REPEAT
            elif deadline is not None and now >= deadline:
                log(f"context {ctx.id}: the cell ignored the interrupt, restarting its kernel")
                if ctx.kernel is kernel:  # (not already replaced by a restart)
                    ctx.restart("the kernel was restarted: its cell did not stop when interrupted")
                return
            elif deadline is not None and now >= next_sigint:
                kernel.interrupt()  # the first may have landed before the cell started
                next_sigint = now + INTERRUPT_REPEAT
    finally:
        kernel.end(queue)
    if deadline is None:
        await events.send({"type": "end_of_execution"})
        await events.finish()


async def acquire(lock, gone):
    """Waits for the lock unless the client goes away first; True if it is held."""
    acquiring = asyncio.ensure_future(lock.acquire())
    await asyncio.wait({acquiring, gone}, return_when=asyncio.FIRST_COMPLETED)
    if not acquiring.done():
        acquiring.cancel()
        try:
            await acquiring
        except asyncio.CancelledError:
            return False
    if gone.done():
        lock.release()
        return False
    return True


# -- routes ----------------------------------------------------------------------------

async def post_execute(conn, req):
    body = req.json()
    code = body.get("code")
    if not isinstance(code, str):
        raise HttpError(400, "code must be a string")
    context_id = body.get("context_id") or None
    language = body.get("language") or None
    env_run = check_env(body.get("env_vars"), "env_vars")
    if context_id and language:
        raise HttpError(400, "only one of context_id and language can be given")
    if context_id:
        ctx = CONTEXTS.all.get(context_id)
        if ctx is None:
            raise HttpError(404, f"context {context_id} not found")
    else:
        ctx = CONTEXTS.default(normalize_language(language))
    envs = await fetch_envs(req.headers.get("x-access-token"))
    conn.watch()
    if not await acquire(ctx.lock, conn.gone):
        conn.keep_alive = False
        return
    try:
        if ctx.closed:
            raise HttpError(404, f"context {ctx.id} not found")
        kernel = await ctx.ensure_kernel()
        # Agent envs < context env_vars < request env_vars. The agent's are sent when
        # they change, so a cell that sets one of them keeps its value until then.
        env = {k: v for k, v in (envs or {}).items()
               if k not in ctx.env_vars and kernel.applied_env.get(k) != v}
        kernel.applied_env.update(env)
        events = EventStream(conn, req.version)
        await events.start()
        await stream_run(conn, events, ctx, kernel,
                         {"type": "execute", "code": code, "env": env, "env_run": env_run})
    finally:
        ctx.lock.release()
        conn.unwatch()


def context_of(path):
    """The context of /contexts/{id}[/...]."""
    ctx_id = path.split("/")[2]
    ctx = CONTEXTS.all.get(ctx_id)
    if ctx is None:
        raise HttpError(404, f"context {ctx_id} not found")
    return ctx


async def route(conn, req):
    path = req.path.rstrip("/") or "/"
    if path == "/health":
        allowed = {"GET"}
        if req.method == "GET":
            return await conn.send_json(200, "OK")
    elif path == "/execute":
        allowed = {"POST"}
        if req.method == "POST":
            return await post_execute(conn, req)
    elif path == "/contexts":
        allowed = {"GET", "POST"}
        if req.method == "GET":
            return await conn.send_json(200, [c.info() for c in CONTEXTS.all.values()])
        if req.method == "POST":
            body = req.json()
            language = normalize_language(body.get("language") or None)
            cwd = body.get("cwd") or default_cwd()
            if not isinstance(cwd, str) or not os.path.isdir(cwd):
                raise HttpError(400, f"cwd {cwd!r} is not a directory")
            ctx = CONTEXTS.create(language, cwd, check_env(body.get("env_vars"), "env_vars"))
            try:
                await ctx.ensure_kernel()
            except KernelError:
                CONTEXTS.remove(ctx)
                raise
            return await conn.send_json(200, ctx.info())
    elif path.startswith("/contexts/") and path.endswith("/restart") and path.count("/") == 3:
        allowed = {"POST"}
        if req.method == "POST":
            ctx = context_of(path)
            ctx.restart("the context was restarted")
            await ctx.ensure_kernel()
            return await conn.send_json(204)
    elif path.startswith("/contexts/") and path.count("/") == 2:
        allowed = {"DELETE"}
        if req.method == "DELETE":
            CONTEXTS.remove(context_of(path))
            return await conn.send_json(204)
    else:
        raise HttpError(404, f"no route {req.path}")
    raise HttpError(405, f"{req.method} is not allowed on {req.path} (allowed: {', '.join(sorted(allowed))})")


# -- main ------------------------------------------------------------------------------

async def main():
    async def on_connect(reader, writer):
        await Connection(reader, writer).serve()

    server = await asyncio.start_server(on_connect, "0.0.0.0", PORT, limit=64 << 10)
    log(f"listening on 0.0.0.0:{PORT}")
    # Warm the default Python context in the background: the first run is then fast.
    CONTEXTS.default("python")

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    CONTEXTS.kill_all()


if __name__ == "__main__":
    asyncio.run(main())
