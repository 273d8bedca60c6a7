"""The official E2B Python SDK (PyPI ``e2b``), unchanged, against colima-e2b.

Run by ``deploy/e2b-tests.sh`` once per pinned SDK version (requirements-2.63.0.txt,
requirements-2.45.1.txt). By hand, with a server running on port P::

    eval "$(target/debug/colima-e2b env --port P)"   # E2B_API_URL, E2B_SANDBOX_URL,
    python -m pytest -q tests/e2b                    # E2B_DOMAIN, E2B_API_KEY

Only the SDK's public API is used (``e2b.Sandbox``, ``e2b.AsyncSandbox``, their
``commands`` / ``files`` / ``pty`` modules and handles, ``e2b`` exceptions). Version
differences are found by feature detection (hasattr / inspect.signature), never by
version string; a feature one pinned version lacks is skipped with the reason.
check_sdk_api.py verifies offline (inspect.signature) that the installed SDK has every call
and keyword argument used here.
Raw HTTP (httpx, urllib, websocket-client) appears only where an SDK user would use it
too: signed file URLs, ``get_host`` traffic, and checks that a secured sandbox refuses
requests without its access token.

Every sandbox carries ``metadata={"suite": RUN_TAG}`` and is killed by a finalizer; a
session finalizer kills whatever is still listed under the tag.

Coverage (test -> SDK calls)
----------------------------
Sandbox lifecycle
  test_create_template_timeout_metadata   Sandbox.create(template, timeout, metadata), get_info()
                                          (sandbox_id, template_id/name, metadata, state,
                                          started_at, end_at, cpu_count, memory_mb, envd_version)
  test_create_default_timeout             Sandbox.create() without timeout -> 300 s lifetime
  test_create_other_template              Sandbox.create("python")
  test_create_envs_visible_to_commands    Sandbox.create(envs=), commands.run
  test_create_secure_true                 Sandbox.create(secure=True), upload/download_url signed,
                                          server refuses envd calls without X-Access-Token
  test_create_secure_false                Sandbox.create(secure=False) (SDKs that honour it:
                                          unsigned download_url, envd open without a token)
  test_connect_by_id                      Sandbox.connect(sandbox_id), sandbox_id, commands, files
  test_is_running_and_kill_instance       is_running(), kill() (instance)
  test_kill_by_id                         Sandbox.kill(sandbox_id) -> True, then False
  test_set_timeout_and_expiry             set_timeout() (extend, then shorten to expire)
  test_get_info_classmethod               Sandbox.get_info(sandbox_id)
  test_get_metrics                        get_metrics(), Sandbox.get_metrics(sandbox_id)
  test_list_metadata_and_state_filters    Sandbox.list(query=SandboxQuery(metadata, state)),
                                          SandboxPaginator.next_items/has_next
  test_list_pagination                    Sandbox.list(limit=2), next_token, has_next,
                                          Sandbox.list(next_token=...)
  test_pause_resume                       pause() (-> True, then False: 409), beta_pause(),
                                          get_info().state, list(state=PAUSED/RUNNING),
                                          Sandbox.connect(id) / connect() resume, files and
                                          processes survive
  test_resume_method                      Sandbox.resume: in neither pinned SDK (skipped, reason)
Commands
  test_run_foreground_callbacks           commands.run(on_stdout, on_stderr) -> CommandResult
  test_run_background_wait                commands.run(background=True) -> CommandHandle.wait()
  test_run_cwd_envs_user                  commands.run(cwd, envs, user="root"), default user
  test_run_exit_exception                 CommandExitException(exit_code, stdout, stderr)
  test_run_timeout                        commands.run(timeout=) -> TimeoutException; process gone
  test_list_and_kill                      commands.list() -> ProcessInfo, commands.kill(pid),
                                          CommandHandle.kill()
  test_send_stdin                         commands.run(stdin=True), commands.send_stdin,
                                          CommandHandle.send_stdin
  test_close_stdin                        commands.close_stdin, CommandHandle.close_stdin
  test_stream_input                       commands.stream_input (2.63.0 only; skipped if absent)
  test_connect_running_command            commands.connect(pid) -> CommandHandle.wait()
  test_async_commands                     AsyncSandbox.create, commands.run (async callbacks),
                                          background + AsyncCommandHandle.wait, commands.connect
Files
  test_files_text_bytes_stream            files.write(str/bytes), files.read(format=text/bytes/stream)
  test_files_write_files                  files.write_files([WriteEntry...]) -> [WriteInfo]
  test_files_octet_stream_and_gzip        files.write(file-like -> octet-stream), write/read/
                                          write_files(gzip=True)
  test_files_large_roundtrip              5 MiB files.write / files.read(bytes) + sha256 (also
                                          checked inside the sandbox with sha256sum)
  test_files_list_depth                   files.list(path, depth=1|3) -> EntryInfo
  test_files_exists_get_info_remove       files.exists, files.get_info (type, size, path, name,
                                          permissions, owner), files.remove
  test_files_rename_make_dir              files.rename -> EntryInfo, files.make_dir -> True/False
  test_files_read_missing                 files.read on a missing path -> NotFoundException
  test_watch_dir_sync                     files.watch_dir -> WatchHandle.get_new_events(), stop()
  test_watch_dir_async                    AsyncSandbox files.watch_dir(on_event=...), stop()
  test_signed_urls                        upload_url / download_url (+use_signature_expiration)
                                          with plain httpx / urllib and no access token; a
                                          tampered signature is refused
PTY
  test_pty_async                          AsyncSandbox pty.create(size, on_data), send_stdin,
                                          resize, connect(pid, on_data), kill
  test_pty_sync                           Sandbox pty.create(size), send_stdin, resize,
                                          CommandHandle.wait(on_pty=)
get_host
  test_get_host_http                      get_host(8080) + `python3 -m http.server` listing
  test_get_host_websocket                 get_host(port) + stdlib websocket echo server,
                                          websocket-client through the proxy
Errors
  test_connect_unknown_id                 Sandbox.connect / get_info(unknown) ->
                                          SandboxNotFoundException; Sandbox.kill(unknown) -> False
  test_killed_sandbox_commands_raise      commands.run on a killed sandbox -> TimeoutException
                                          (SandboxNotRunningException where the SDK has it)
  test_bad_api_key                        create / list / connect with a wrong key ->
                                          AuthenticationException

Host names: ``get_host(port)`` returns ``<port>-<sandboxID>.localhost:P``. Where
``*.localhost`` does not resolve (glibc without nss-myhostname, as on the CI machine), the
tests connect to 127.0.0.1:P and send that name as the Host header, which is what the
server routes on.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import inspect
import io
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from typing import Callable, List, Optional

import httpx
import pytest

from conftest import require_e2b_environment

import e2b
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FilesystemEventType,
    FileType,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)

RUN_TAG = f"e2b-suite-{uuid.uuid4().hex[:12]}"
TEMPLATE = os.environ.get("E2B_TEST_TEMPLATE", "base")
# A syntactically valid key (e2b_ + hex) that the server never issued.
BAD_API_KEY = "e2b_" + "0123456789abcdef" * 2 + "deadbeef"
# Not a sandbox anywhere: matches ^[a-z0-9]+$ like real ids.
UNKNOWN_ID = "nosuchsandbox0" + uuid.uuid4().hex[:10]
SANDBOX_TIMEOUT = 900  # seconds, for sandboxes a test creates
SHARED_TIMEOUT = 3600  # the session's shared sandbox


# --------------------------------------------------------------------------- helpers


def wait_until(
    predicate: Callable[[], object],
    what: str,
    timeout: float = 60.0,
    interval: float = 0.25,
):
    """Polls until predicate() is truthy (returns it) or fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # keep polling; report the last error
            last_exc = e
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what() if callable(what) else what}"
                + (f" (last error: {last_exc!r})" if last_exc else "")
            )
        time.sleep(interval)


async def async_wait_until(predicate, what: str, timeout: float = 60.0, interval=0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            what = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


def run_async(coro_fn, *args):
    """Runs an async test body on a fresh event loop (no pytest-asyncio needed)."""
    return asyncio.run(coro_fn(*args))


def kill_quietly(sandbox_id: str) -> None:
    try:
        Sandbox.kill(sandbox_id)
    except Exception:
        pass


def tagged(extra: Optional[dict] = None) -> dict:
    meta = {"suite": RUN_TAG}
    meta.update(extra or {})
    return meta


def split_host(host: str):
    """`<port>-<id>.localhost:P` -> (name, port)."""
    name, sep, port = host.rpartition(":")
    if not sep or not port.isdigit():
        return host, 80
    return name, int(port)


def proxy_target(host: str):
    """Where to connect for a get_host() name, and the Host header to send.

    `*.localhost` may not resolve here (`getent hosts 3000-abc.localhost` fails without
    nss-myhostname): then connect to 127.0.0.1 on the same port and send the name as
    the Host header explicitly; the server routes on the Host header either way.
    """
    name, port = split_host(host)
    try:
        socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        return f"{name}:{port}", None
    except socket.gaierror:
        return f"127.0.0.1:{port}", host


def http_get_via_host(host: str, path: str = "/", timeout: float = 10.0) -> httpx.Response:
    target, host_header = proxy_target(host)
    headers = {"Host": host_header} if host_header else {}
    with httpx.Client(trust_env=False, timeout=timeout) as client:
        return client.get(f"http://{target}{path}", headers=headers)


def envd_base_url() -> str:
    return os.environ["E2B_SANDBOX_URL"].rstrip("/")


def raw_envd_get(sandbox_id: str, path: str, token: Optional[str] = None) -> httpx.Response:
    """A plain GET /files as an SDK user could send it, without going through the SDK."""
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"}
    if token:
        headers["X-Access-Token"] = token
    with httpx.Client(trust_env=False, timeout=30) as client:
        return client.get(f"{envd_base_url()}/files", params={"path": path}, headers=headers)


def pause_of(sbx):
    """The pause call this SDK offers: `pause` (newer) or `beta_pause` (older)."""
    if hasattr(sbx, "pause"):
        return sbx.pause
    if hasattr(sbx, "beta_pause"):
        return sbx.beta_pause
    pytest.skip("this SDK has neither Sandbox.pause nor Sandbox.beta_pause")


def ids_of(infos) -> set:
    return {i.sandbox_id for i in infos}


def list_all(query: SandboxQuery, limit: Optional[int] = None) -> list:
    paginator = Sandbox.list(query=query, limit=limit)
    items = []
    while paginator.has_next:
        items.extend(paginator.next_items())
    return items


def secure_is_honoured() -> bool:
    """2.45.1 sends `secure` (default True); newer SDKs deprecate it and always secure."""
    param = inspect.signature(Sandbox.create).parameters.get("secure")
    return param is not None and param.default is True


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session", autouse=True)
def e2b_environment():
    require_e2b_environment()
    yield
    # Whatever a failed test left behind under this run's tag.
    try:
        for info in list_all(SandboxQuery(metadata={"suite": RUN_TAG})):
            kill_quietly(info.sandbox_id)
    except Exception:
        pass


@pytest.fixture(scope="session")
def sbx(e2b_environment):
    """One shared sandbox for the tests that don't interfere with each other."""
    sandbox = Sandbox.create(TEMPLATE, timeout=SHARED_TIMEOUT, metadata=tagged({"role": "shared"}))
    yield sandbox
    kill_quietly(sandbox.sandbox_id)


@pytest.fixture
def make_sandbox(request):
    """Factory for a fresh sandbox; each one is killed when the test ends."""

    def make(**kwargs) -> Sandbox:
        kwargs.setdefault("timeout", SANDBOX_TIMEOUT)
        kwargs["metadata"] = tagged(kwargs.get("metadata"))
        template = kwargs.pop("template", TEMPLATE)
        sandbox = Sandbox.create(template, **kwargs)
        request.addfinalizer(lambda: kill_quietly(sandbox.sandbox_id))
        return sandbox

    return make


@pytest.fixture
def workdir(sbx):
    """A fresh directory in the shared sandbox's home."""
    path = f"/home/user/t-{uuid.uuid4().hex[:10]}"
    sbx.files.make_dir(path)
    yield path
    try:
        sbx.files.remove(path)
    except Exception:
        pass


# --------------------------------------------------------------------------- lifecycle


def test_create_template_timeout_metadata(make_sandbox):
    meta = {"purpose": "create-test", "owner": "suite"}
    before = datetime.now(timezone.utc)
    s = make_sandbox(timeout=240, metadata=meta)
    assert s.sandbox_id and s.sandbox_id.isalnum() and s.sandbox_id == s.sandbox_id.lower()

    info = s.get_info()
    assert info.sandbox_id == s.sandbox_id
    assert TEMPLATE in (info.template_id, info.name), (info.template_id, info.name)
    for k, v in tagged(meta).items():
        assert info.metadata.get(k) == v, info.metadata
    assert info.state == SandboxState.RUNNING
    assert isinstance(info.started_at, datetime) and isinstance(info.end_at, datetime)
    lifetime = (info.end_at - info.started_at).total_seconds()
    assert 200 <= lifetime <= 280, f"timeout=240 gave a lifetime of {lifetime}s"
    assert info.started_at >= before - timedelta(minutes=5)
    assert info.cpu_count >= 1 and info.memory_mb > 0
    assert info.envd_version
    assert s.is_running()
    r = s.commands.run("cat /etc/os-release; command -v bash python3")
    assert r.exit_code == 0 and "/bash" in r.stdout and "python3" in r.stdout


def test_create_default_timeout(make_sandbox):
    # 2.45.1 sends timeout=300 itself; newer SDKs omit `timeout` and rely on the API's
    # documented default of 300 s for POST /v2/sandboxes.
    s = make_sandbox(timeout=None)
    info = s.get_info()
    lifetime = (info.end_at - info.started_at).total_seconds()
    assert 250 <= lifetime <= 350, f"default timeout gave a lifetime of {lifetime}s"


def test_create_other_template(make_sandbox):
    s = make_sandbox(template="python")
    info = s.get_info()
    assert "python" in (info.template_id, info.name)
    assert s.commands.run("python3 -c 'print(6*7)'").stdout.strip() == "42"


def test_create_envs_visible_to_commands(make_sandbox):
    s = make_sandbox(envs={"SBX_LEVEL": "from-create", "SBX_OVERRIDE": "create"})
    r = s.commands.run('echo "$SBX_LEVEL|$SBX_OVERRIDE"')
    assert r.stdout.strip() == "from-create|create"
    # Per-command envs win over the sandbox's.
    r = s.commands.run('echo "$SBX_LEVEL|$SBX_OVERRIDE"', envs={"SBX_OVERRIDE": "cmd"})
    assert r.stdout.strip() == "from-create|cmd"
    # Also visible to a background command and a PTY-less shell as another user.
    h = s.commands.run("echo $SBX_LEVEL", background=True, user="root")
    assert h.wait().stdout.strip() == "from-create"


def test_create_secure_true(make_sandbox):
    s = make_sandbox(secure=True)
    s.files.write("/home/user/secret.txt", "top secret")
    assert s.files.read("/home/user/secret.txt") == "top secret"
    # The SDK got an access token, so its file URLs are signed ...
    assert "signature=" in s.download_url("/home/user/secret.txt")
    # ... and the server refuses envd calls that lack the token.
    r = raw_envd_get(s.sandbox_id, "/home/user/secret.txt")
    assert r.status_code == 401, (r.status_code, r.text)


def test_create_secure_false(make_sandbox):
    s = make_sandbox(secure=False)
    # Accepted by every SDK version (newer ones ignore it and secure anyway).
    assert s.commands.run("echo insecure-ok").stdout.strip() == "insecure-ok"
    s.files.write("/home/user/open.txt", "open data")
    assert s.files.read("/home/user/open.txt") == "open data"
    if not secure_is_honoured():
        pytest.skip(
            "this SDK deprecates `secure` and ignores it (every sandbox is secured, "
            "POST /v2/sandboxes has no `secure` field): nothing insecure to check"
        )
    # No access token: unsigned URLs, and envd answers without X-Access-Token.
    assert "signature" not in s.download_url("/home/user/open.txt")
    r = raw_envd_get(s.sandbox_id, "/home/user/open.txt")
    assert r.status_code == 200 and r.text == "open data", (r.status_code, r.text)


def test_burst_of_50_creates_all_succeed():
    """50 creates at once with the server's default admission settings: those beyond
    `max_concurrent_creates` wait for their turn instead of getting 429, and each
    sandbox (warm or cold) answers its first command with its own envs."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> str:
        s = Sandbox.create(
            TEMPLATE, timeout=SANDBOX_TIMEOUT, metadata=tagged({"burst": str(i)}),
            envs={"BURST_I": str(i)},
        )
        try:
            return s.commands.run("echo $BURST_I").stdout.strip()
        finally:
            kill_quietly(s.sandbox_id)

    with ThreadPoolExecutor(max_workers=50) as pool:
        outputs = list(pool.map(one, range(50)))
    assert outputs == [str(i) for i in range(50)]


def test_connect_by_id(sbx):
    sbx.files.write("/home/user/connect-marker.txt", "marker-" + RUN_TAG)
    other = Sandbox.connect(sbx.sandbox_id)
    assert other.sandbox_id == sbx.sandbox_id
    assert other.files.read("/home/user/connect-marker.txt") == "marker-" + RUN_TAG
    assert other.commands.run("cat /home/user/connect-marker.txt").stdout == "marker-" + RUN_TAG
    assert other.is_running()


def test_is_running_and_kill_instance(make_sandbox):
    s = make_sandbox()
    assert s.is_running() is True
    assert s.kill() is True
    wait_until(lambda: s.is_running() is False, "is_running() to turn False after kill()", 30)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(s.sandbox_id)


def test_kill_by_id(make_sandbox):
    s = make_sandbox()
    assert Sandbox.kill(s.sandbox_id) is True
    assert Sandbox.kill(s.sandbox_id) is False
    ids = ids_of(list_all(SandboxQuery(metadata={"suite": RUN_TAG})))
    assert s.sandbox_id not in ids


def test_set_timeout_and_expiry(make_sandbox):
    s = make_sandbox(timeout=120)
    s.set_timeout(1200)
    end = s.get_info().end_at
    remaining = (end - datetime.now(timezone.utc)).total_seconds()
    assert 1000 <= remaining <= 1300, f"set_timeout(1200) left {remaining}s"
    # Shortening is allowed too: the sandbox then expires on its own.
    s.set_timeout(3)
    wait_until(lambda: s.is_running() is False, "the sandbox to expire after set_timeout(3)", 90, 1)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(s.sandbox_id)


def test_get_info_classmethod(sbx):
    info = Sandbox.get_info(sbx.sandbox_id)
    assert info.sandbox_id == sbx.sandbox_id
    assert info.metadata.get("role") == "shared"
    assert info.state == SandboxState.RUNNING


def test_get_metrics(sbx):
    sbx.commands.run("head -c 2000000 /dev/urandom | sha256sum >/dev/null")
    metrics = wait_until(lambda: sbx.get_metrics(), "a non-empty get_metrics()", 60, 1)
    m = metrics[-1]
    assert m.cpu_count >= 1
    assert 0 <= m.cpu_used_pct <= 100 * m.cpu_count
    assert m.mem_total > 0 and 0 < m.mem_used <= m.mem_total
    assert m.mem_cache >= 0
    assert m.disk_total >= 0 and m.disk_used >= 0
    assert isinstance(m.timestamp, datetime)
    by_id = Sandbox.get_metrics(sbx.sandbox_id)
    assert isinstance(by_id, list) and by_id


def test_list_metadata_and_state_filters(make_sandbox):
    group = uuid.uuid4().hex[:8]
    odd = "a b&c=d/é"  # survives the SDK's double URL-encoding of `metadata`
    a = make_sandbox(metadata={"group": group, "odd": odd})
    b = make_sandbox(metadata={"group": group})
    found = list_all(SandboxQuery(metadata={"group": group}))
    assert ids_of(found) == {a.sandbox_id, b.sandbox_id}
    info = next(i for i in found if i.sandbox_id == a.sandbox_id)
    assert info.metadata.get("odd") == odd
    assert info.state == SandboxState.RUNNING
    assert info.started_at <= info.end_at
    # Two metadata keys AND-ed.
    assert ids_of(list_all(SandboxQuery(metadata={"group": group, "odd": odd}))) == {a.sandbox_id}
    running = list_all(SandboxQuery(metadata={"group": group}, state=[SandboxState.RUNNING]))
    assert ids_of(running) == {a.sandbox_id, b.sandbox_id}
    paused = list_all(SandboxQuery(metadata={"group": group}, state=[SandboxState.PAUSED]))
    assert paused == []
    assert list_all(SandboxQuery(metadata={"group": "no-such-" + group})) == []
    # Without a query the tag's sandboxes are there too.
    assert {a.sandbox_id, b.sandbox_id} <= ids_of(list_all(SandboxQuery(metadata={"suite": RUN_TAG})))


def test_list_pagination(make_sandbox):
    group = uuid.uuid4().hex[:8]
    created = {make_sandbox(metadata={"page": group}).sandbox_id for _ in range(3)}
    query = SandboxQuery(metadata={"page": group})

    paginator = Sandbox.list(query=query, limit=2)
    assert paginator.has_next
    first = paginator.next_items()
    assert len(first) == 2
    assert paginator.has_next is True
    token = paginator.next_token
    assert token
    second = paginator.next_items()
    assert len(second) == 1
    assert paginator.has_next is False
    assert not paginator.next_token
    assert ids_of(first) | ids_of(second) == created
    assert not (ids_of(first) & ids_of(second))

    # A paginator can start from a token handed over from elsewhere.
    resumed = Sandbox.list(query=query, limit=2, next_token=token)
    assert ids_of(resumed.next_items()) == ids_of(second)
    assert resumed.has_next is False


def test_pause_resume(make_sandbox):
    group = uuid.uuid4().hex[:8]
    s = make_sandbox(metadata={"pause": group})
    s.files.write("/home/user/before-pause.txt", "kept")
    bg = s.commands.run("sleep 600", background=True, timeout=0)
    bg.disconnect()  # no stream held open across the pause

    assert pause_of(s)() is True
    info = Sandbox.get_info(s.sandbox_id)
    assert info.state == SandboxState.PAUSED
    assert ids_of(list_all(SandboxQuery(metadata={"pause": group}, state=[SandboxState.PAUSED]))) == {
        s.sandbox_id
    }
    assert list_all(SandboxQuery(metadata={"pause": group}, state=[SandboxState.RUNNING])) == []
    # Pausing a paused sandbox is a 409, which the SDK reports as False.
    assert pause_of(s)() is False

    # Resume: no SDK pinned here has `resume`; connect resumes a paused sandbox.
    if hasattr(Sandbox, "resume"):
        Sandbox.resume(s.sandbox_id)
    resumed = Sandbox.connect(s.sandbox_id)
    assert Sandbox.get_info(s.sandbox_id).state == SandboxState.RUNNING
    assert resumed.files.read("/home/user/before-pause.txt") == "kept"
    assert resumed.commands.run("echo back").stdout.strip() == "back"
    # The sandbox kept its processes (the pause keeps memory).
    assert any(p.pid == bg.pid for p in resumed.commands.list())

    # Second cycle through the other spelling and the instance form of connect.
    if hasattr(s, "beta_pause"):
        assert s.beta_pause() is True
    else:
        assert s.pause() is True
    assert Sandbox.get_info(s.sandbox_id).state == SandboxState.PAUSED
    s.connect()
    assert Sandbox.get_info(s.sandbox_id).state == SandboxState.RUNNING
    assert s.commands.run("cat /home/user/before-pause.txt").stdout == "kept"


def test_resume_method():
    if not hasattr(Sandbox, "resume"):
        pytest.skip(
            "this SDK has no Sandbox.resume: a paused sandbox resumes through "
            "Sandbox.connect (covered by test_pause_resume)"
        )
    pytest.fail("Sandbox.resume exists in this SDK: add a test for it")  # pragma: no cover


# --------------------------------------------------------------------------- commands


def test_run_foreground_callbacks(sbx):
    out: List[str] = []
    err: List[str] = []
    r = sbx.commands.run(
        "echo out-1; echo err-1 >&2; sleep 0.2; echo out-2",
        on_stdout=out.append,
        on_stderr=err.append,
    )
    assert r.exit_code == 0
    assert not r.error
    assert r.stdout == "out-1\nout-2\n"
    assert r.stderr == "err-1\n"
    assert "".join(out) == "out-1\nout-2\n"
    assert "".join(err) == "err-1\n"


def test_run_background_wait(sbx):
    h = sbx.commands.run("sleep 1; echo bg-done; echo bg-err >&2", background=True)
    assert isinstance(h.pid, int) and h.pid > 0
    out: List[str] = []
    r = h.wait(on_stdout=out.append)
    assert r.exit_code == 0
    assert r.stdout == "bg-done\n" and r.stderr == "bg-err\n"
    assert "".join(out) == "bg-done\n"


def test_run_cwd_envs_user(sbx):
    assert sbx.commands.run("whoami").stdout.strip() == "user"
    assert sbx.commands.run("pwd").stdout.strip() == "/home/user"
    assert sbx.commands.run("echo $HOME").stdout.strip() == "/home/user"
    assert sbx.commands.run("whoami", user="root").stdout.strip() == "root"
    assert sbx.commands.run("whoami", user="user").stdout.strip() == "user"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout.strip() == "/tmp"
    r = sbx.commands.run('echo "$A-$B"', envs={"A": "alpha", "B": "beta gamma"})
    assert r.stdout.strip() == "alpha-beta gamma"
    r = sbx.commands.run("id -u; touch /root/x 2>/dev/null && echo can-write-root || echo denied")
    assert r.stdout.split() == ["1000", "denied"]
    # A cwd that does not exist is refused (invalid_argument).
    with pytest.raises(SandboxException):
        sbx.commands.run("pwd", cwd="/does/not/exist-" + RUN_TAG)


def test_run_exit_exception(sbx):
    with pytest.raises(CommandExitException) as ei:
        sbx.commands.run("echo partial; echo oops >&2; exit 3")
    e = ei.value
    assert e.exit_code == 3
    assert e.stdout == "partial\n"
    assert e.stderr == "oops\n"
    assert isinstance(e, SandboxException)
    h = sbx.commands.run("exit 7", background=True)
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code == 7


def test_run_timeout(sbx):
    marker = "timeout-" + uuid.uuid4().hex[:8]
    with pytest.raises(TimeoutException):
        sbx.commands.run(f"sleep 60 # {marker}", timeout=3)
    # The server kills the command at its deadline.
    wait_until(
        lambda: not any(marker in " ".join(p.args) for p in sbx.commands.list()),
        "the timed-out command to be gone from commands.list()",
        30,
    )
    # `[t]imeout-...` matches the sleep's command line but not this pgrep's own shell.
    check = sbx.commands.run(f"pgrep -f 'sleep 60 # [t]{marker[1:]}' || echo none")
    assert check.stdout.strip() == "none"


def test_list_and_kill(sbx):
    marker = "listkill-" + uuid.uuid4().hex[:8]
    h = sbx.commands.run(f"sleep 300 # {marker}", background=True)
    procs = sbx.commands.list()
    mine = [p for p in procs if p.pid == h.pid]
    assert mine, f"pid {h.pid} not in {procs}"
    p = mine[0]
    assert p.cmd == "/bin/bash"
    assert p.args[-1] == f"sleep 300 # {marker}"
    assert isinstance(p.envs, dict)
    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code != 0
    wait_until(lambda: all(p.pid != h.pid for p in sbx.commands.list()), "killed pid to vanish", 30)
    assert sbx.commands.kill(h.pid) is False
    # Kill through the handle too.
    h2 = sbx.commands.run(f"sleep 300 # {marker}-2", background=True)
    assert h2.kill() is True
    with pytest.raises(CommandExitException):
        h2.wait()


def test_send_stdin(sbx):
    h = sbx.commands.run("head -n 2", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "line one\n")
    h.send_stdin(b"line two\n")
    r = h.wait()
    assert r.stdout == "line one\nline two\n"
    # Without stdin=True, stdin is /dev/null: `cat` ends at once.
    assert sbx.commands.run("cat; echo eof").stdout == "eof\n"


def test_close_stdin(sbx):
    if not hasattr(sbx.commands, "close_stdin"):
        pytest.skip("this SDK has no commands.close_stdin")
    h = sbx.commands.run("wc -c", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "12345")
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout.strip() == "5"
    h2 = sbx.commands.run("cat", background=True, stdin=True)
    h2.send_stdin("via-handle")
    h2.close_stdin()
    assert h2.wait().stdout == "via-handle"


def test_stream_input(sbx):
    if not hasattr(sbx.commands, "stream_input"):
        pytest.skip("this SDK has no commands.stream_input (added after 2.45.1)")
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.stream_input(h.pid, [b"chunk-1 ", "chunk-2 ", b"chunk-3"])
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "chunk-1 chunk-2 chunk-3"


def test_connect_running_command(sbx, workdir):
    go = f"{workdir}/go"
    script = f"echo started; while [ ! -e {go} ]; do sleep 0.1; done; echo after-connect; exit 0"
    h = sbx.commands.run(script, background=True)
    pid = h.pid
    h.disconnect()  # leaves the command running
    assert any(p.pid == pid for p in sbx.commands.list())
    attached = sbx.commands.connect(pid)
    assert attached.pid == pid
    sbx.files.write(go, "")
    out: List[str] = []
    r = attached.wait(on_stdout=out.append)
    assert r.exit_code == 0
    assert "after-connect" in r.stdout
    assert "after-connect" in "".join(out)
    with pytest.raises(SandboxException):
        sbx.commands.connect(999999)


def test_async_commands():
    async def body():
        s = await AsyncSandbox.create(TEMPLATE, timeout=SANDBOX_TIMEOUT, metadata=tagged())
        try:
            assert await s.is_running()
            out: List[str] = []

            async def on_out(line):
                out.append(line)

            r = await s.commands.run("echo a1; echo a2", on_stdout=on_out)
            assert r.stdout == "a1\na2\n" and "".join(out) == "a1\na2\n"
            err: List[str] = []
            h = await s.commands.run(
                "sleep 0.5; echo bg >&2; exit 0", background=True, on_stderr=err.append
            )
            r = await h.wait()
            assert r.stderr == "bg\n" and "".join(err) == "bg\n"
            with pytest.raises(CommandExitException) as ei:
                await s.commands.run("exit 4")
            assert ei.value.exit_code == 4
            # Connect to a running command with callbacks.
            go = f"/tmp/async-go-{uuid.uuid4().hex[:8]}"
            h = await s.commands.run(
                f"while [ ! -e {go} ]; do sleep 0.1; done; echo async-after",
                background=True,
            )
            await h.disconnect()
            got: List[str] = []
            attached = await s.commands.connect(h.pid, on_stdout=got.append)
            await s.files.write(go, "")
            r = await attached.wait()
            assert "async-after" in r.stdout and "async-after" in "".join(got)
        finally:
            await s.kill()

    run_async(body)


# --------------------------------------------------------------------------- files


def test_files_text_bytes_stream(sbx, workdir):
    text = "héllo wörld\nsecond line\n"
    info = sbx.files.write(f"{workdir}/t.txt", text)
    assert info.path == f"{workdir}/t.txt" and info.name == "t.txt"
    assert sbx.files.read(f"{workdir}/t.txt") == text
    assert sbx.files.read(f"{workdir}/t.txt", format="text") == text

    blob = bytes(range(256)) * 64 + b"\xff\xfe\x00"
    sbx.files.write(f"{workdir}/b.bin", blob)
    got = sbx.files.read(f"{workdir}/b.bin", format="bytes")
    assert isinstance(got, (bytes, bytearray)) and bytes(got) == blob

    stream = sbx.files.read(f"{workdir}/b.bin", format="stream")
    chunks = [bytes(c) for c in stream]
    assert b"".join(chunks) == blob

    # Relative paths resolve against the user's home.
    sbx.files.write(f"{workdir[len('/home/user/'):]}/rel.txt", "relative")
    assert sbx.files.read(f"{workdir}/rel.txt") == "relative"
    # Overwrite, and parents are created.
    sbx.files.write(f"{workdir}/t.txt", "short")
    assert sbx.files.read(f"{workdir}/t.txt") == "short"
    sbx.files.write(f"{workdir}/deep/er/x.txt", "deep")
    assert sbx.commands.run(f"cat {workdir}/deep/er/x.txt").stdout == "deep"
    # Written as the default user.
    assert sbx.commands.run(f"stat -c %U {workdir}/deep/er/x.txt").stdout.strip() == "user"
    # As root, into a root-only place.
    sbx.files.write("/root/by-root.txt", "root data", user="root")
    assert sbx.files.read("/root/by-root.txt", user="root") == "root data"
    # Not readable as the default user (envd maps the permission error to some error
    # status; AuthenticationException is not a SandboxException subclass).
    with pytest.raises((SandboxException, AuthenticationException)):
        sbx.files.read("/root/by-root.txt")


def test_files_write_files(sbx, workdir):
    entries = [
        {"path": f"{workdir}/multi/a.txt", "data": "A"},
        {"path": f"{workdir}/multi/b.bin", "data": b"\x00\x01B"},
        {"path": f"{workdir}/multi/sub/c.txt", "data": "C" * 1000},
    ]
    infos = sbx.files.write_files(entries)
    assert sorted(i.path for i in infos) == sorted(e["path"] for e in entries)
    assert sbx.files.read(f"{workdir}/multi/a.txt") == "A"
    assert bytes(sbx.files.read(f"{workdir}/multi/b.bin", format="bytes")) == b"\x00\x01B"
    assert sbx.files.read(f"{workdir}/multi/sub/c.txt") == "C" * 1000
    assert sbx.files.write_files([]) == []


def test_files_octet_stream_and_gzip(sbx, workdir):
    data = os.urandom(256 * 1024) + b"compressible " * 20000
    # A file-like object goes up as application/octet-stream (envd >= 0.5.7).
    info = sbx.files.write(f"{workdir}/octet.bin", io.BytesIO(data))
    assert info.path == f"{workdir}/octet.bin"
    assert bytes(sbx.files.read(f"{workdir}/octet.bin", format="bytes")) == data
    # gzip: Content-Encoding: gzip up, Accept-Encoding: gzip down.
    sbx.files.write(f"{workdir}/gz.bin", data, gzip=True)
    digest = hashlib.sha256(data).hexdigest()
    assert sbx.commands.run(f"sha256sum {workdir}/gz.bin").stdout.split()[0] == digest
    assert bytes(sbx.files.read(f"{workdir}/gz.bin", format="bytes", gzip=True)) == data
    assert sbx.files.read(f"{workdir}/octet.bin", format="bytes", gzip=True) == data
    infos = sbx.files.write_files(
        [
            {"path": f"{workdir}/gzm/a.txt", "data": "A" * 5000},
            {"path": f"{workdir}/gzm/b.bin", "data": io.BytesIO(b"\x00B" * 3000)},
        ],
        gzip=True,
    )
    assert sorted(i.name for i in infos) == ["a.txt", "b.bin"]
    assert sbx.files.read(f"{workdir}/gzm/a.txt") == "A" * 5000
    assert bytes(sbx.files.read(f"{workdir}/gzm/b.bin", format="bytes")) == b"\x00B" * 3000


def test_files_large_roundtrip(sbx, workdir):
    data = os.urandom(5 * 1024 * 1024)
    digest = hashlib.sha256(data).hexdigest()
    path = f"{workdir}/large.bin"
    info = sbx.files.write(path, data)
    assert info.path == path
    assert sbx.commands.run(f"sha256sum {path}").stdout.split()[0] == digest
    assert sbx.files.get_info(path).size == len(data)
    got = sbx.files.read(path, format="bytes")
    assert len(got) == len(data) and hashlib.sha256(got).hexdigest() == digest
    h = hashlib.sha256()
    n = 0
    for chunk in sbx.files.read(path, format="stream"):
        h.update(chunk)
        n += len(chunk)
    assert n == len(data) and h.hexdigest() == digest


def test_files_list_depth(sbx, workdir):
    sbx.files.write(f"{workdir}/tree/a/b/c.txt", "c")
    sbx.files.write(f"{workdir}/tree/top.txt", "top")
    one = sbx.files.list(f"{workdir}/tree")
    assert {e.name for e in one} == {"a", "top.txt"}
    by_name = {e.name: e for e in one}
    assert by_name["a"].type == FileType.DIR
    assert by_name["top.txt"].type == FileType.FILE
    assert by_name["top.txt"].path == f"{workdir}/tree/top.txt"
    assert by_name["top.txt"].size == 3
    deep = sbx.files.list(f"{workdir}/tree", depth=3)
    paths = {e.path for e in deep}
    assert {
        f"{workdir}/tree/a",
        f"{workdir}/tree/a/b",
        f"{workdir}/tree/a/b/c.txt",
        f"{workdir}/tree/top.txt",
    } <= paths
    two = {e.path for e in sbx.files.list(f"{workdir}/tree", depth=2)}
    assert f"{workdir}/tree/a/b" in two and f"{workdir}/tree/a/b/c.txt" not in two
    with pytest.raises(NotFoundException):
        sbx.files.list(f"{workdir}/no-such-dir")


def test_files_exists_get_info_remove(sbx, workdir):
    path = f"{workdir}/info.txt"
    assert sbx.files.exists(path) is False
    sbx.files.write(path, "12345")
    assert sbx.files.exists(path) is True
    info = sbx.files.get_info(path)
    assert info.type == FileType.FILE
    assert info.size == 5
    assert info.path == path and info.name == "info.txt"
    assert info.permissions.startswith("-rw")
    assert info.owner == "user"
    assert isinstance(info.modified_time, datetime)
    dinfo = sbx.files.get_info(workdir)
    assert dinfo.type == FileType.DIR and dinfo.path == workdir
    sbx.files.remove(path)
    assert sbx.files.exists(path) is False
    with pytest.raises(NotFoundException):
        sbx.files.get_info(path)
    # Removing a directory is recursive.
    sbx.files.write(f"{workdir}/rmdir/x/y.txt", "y")
    sbx.files.remove(f"{workdir}/rmdir")
    assert sbx.files.exists(f"{workdir}/rmdir") is False


def test_files_rename_make_dir(sbx, workdir):
    assert sbx.files.make_dir(f"{workdir}/newdir/nested") is True
    assert sbx.files.make_dir(f"{workdir}/newdir/nested") is False
    assert sbx.files.get_info(f"{workdir}/newdir/nested").type == FileType.DIR
    sbx.files.write(f"{workdir}/old.txt", "moving")
    entry = sbx.files.rename(f"{workdir}/old.txt", f"{workdir}/newdir/new.txt")
    assert entry.path == f"{workdir}/newdir/new.txt" and entry.name == "new.txt"
    assert sbx.files.exists(f"{workdir}/old.txt") is False
    assert sbx.files.read(f"{workdir}/newdir/new.txt") == "moving"
    with pytest.raises(NotFoundException):
        sbx.files.rename(f"{workdir}/nope.txt", f"{workdir}/nope2.txt")


def test_files_read_missing(sbx, workdir):
    with pytest.raises(NotFoundException):
        sbx.files.read(f"{workdir}/missing.txt")


def test_watch_dir_sync(sbx, workdir):
    watched = f"{workdir}/watched"
    sbx.files.make_dir(watched)
    handle = sbx.files.watch_dir(watched)
    try:
        sbx.files.write(f"{watched}/created.txt", "hello")
        seen: list = []

        def got_create():
            seen.extend(handle.get_new_events())
            return any(
                e.name == "created.txt"
                and e.type in (FilesystemEventType.CREATE, FilesystemEventType.WRITE)
                for e in seen
            )

        wait_until(got_create, "a CREATE/WRITE event for created.txt", 30, 0.5)
        sbx.files.remove(f"{watched}/created.txt")
        wait_until(
            lambda: seen.extend(handle.get_new_events())
            or any(e.name == "created.txt" and e.type == FilesystemEventType.REMOVE for e in seen),
            "a REMOVE event for created.txt",
            30,
            0.5,
        )
    finally:
        handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()  # stopped watchers refuse


def test_watch_dir_async():
    async def body():
        s = await AsyncSandbox.create(TEMPLATE, timeout=SANDBOX_TIMEOUT, metadata=tagged())
        try:
            wd = f"/home/user/awatch-{uuid.uuid4().hex[:8]}"
            await s.files.make_dir(wd)
            events = []
            handle = await s.files.watch_dir(wd, on_event=events.append)
            try:
                await s.files.write(f"{wd}/a.txt", "x")
                await async_wait_until(
                    lambda: any(
                        e.name == "a.txt"
                        and e.type in (FilesystemEventType.CREATE, FilesystemEventType.WRITE)
                        for e in events
                    ),
                    lambda: f"a CREATE/WRITE event for a.txt (got {events})",
                    30,
                )
                await s.commands.run(f"mkdir {wd}/sub && mv {wd}/a.txt {wd}/b.txt")
                await async_wait_until(
                    lambda: any(e.name == "sub" and e.type == FilesystemEventType.CREATE for e in events)
                    and any(e.name == "b.txt" for e in events)
                    and any(e.name == "a.txt" and e.type == FilesystemEventType.RENAME for e in events),
                    lambda: f"CREATE sub, RENAME a.txt and an event for b.txt (got {events})",
                    30,
                )
            finally:
                await handle.stop()
            # Recursive watch sees nested changes.
            nested = []
            h2 = await s.files.watch_dir(wd, on_event=nested.append, recursive=True)
            try:
                await s.files.write(f"{wd}/sub/deep.txt", "d")
                await async_wait_until(
                    lambda: any(e.name.endswith("deep.txt") for e in nested),
                    "a recursive event for sub/deep.txt",
                    30,
                )
            finally:
                await h2.stop()
        finally:
            await s.kill()

    run_async(body)


def test_signed_urls(make_sandbox):
    s = make_sandbox(secure=True)
    payload = os.urandom(100_000)

    # Upload through the signed URL: multipart/form-data, no access token, no SDK.
    up = s.upload_url("/home/user/uploaded.bin")
    assert "signature=" in up
    with httpx.Client(trust_env=False, timeout=60) as client:
        r = client.post(up, files={"file": ("uploaded.bin", payload)})
    assert r.status_code == 200, (r.status_code, r.text)
    assert bytes(s.files.read("/home/user/uploaded.bin", format="bytes")) == payload

    # Download through the signed URL with urllib.
    down = s.download_url("/home/user/uploaded.bin")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(down, timeout=60) as resp:
        assert resp.status == 200
        assert resp.read() == payload

    # With an expiration, for another user.
    s.files.write("/root/root-only.txt", "for root", user="root")
    down_root = s.download_url("/root/root-only.txt", user="root", use_signature_expiration=300)
    assert "signature_expiration=" in down_root
    with opener.open(down_root, timeout=60) as resp:
        assert resp.read() == b"for root"
    up_exp = s.upload_url("/home/user/up-exp.txt", use_signature_expiration=300)
    with httpx.Client(trust_env=False, timeout=60) as client:
        r = client.post(up_exp, files={"file": ("up-exp.txt", b"expiring")})
    assert r.status_code == 200, (r.status_code, r.text)
    assert s.files.read("/home/user/up-exp.txt") == "expiring"

    # Tampering: a read signature does not allow writing, a wrong one does not read.
    parts = urllib.parse.urlsplit(down)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query["signature"] = "v1_" + base64.b64encode(b"x" * 32).decode().rstrip("=")
    forged = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    with pytest.raises(urllib.error.HTTPError) as ei:
        opener.open(forged, timeout=60)
    assert ei.value.code in (401, 403)
    with httpx.Client(trust_env=False, timeout=60) as client:
        r = client.post(down, files={"file": ("uploaded.bin", b"overwrite")})
    assert r.status_code in (401, 403), (r.status_code, r.text)
    assert bytes(s.files.read("/home/user/uploaded.bin", format="bytes")) == payload


# --------------------------------------------------------------------------- pty


def test_pty_async():
    async def body():
        s = await AsyncSandbox.create(TEMPLATE, timeout=SANDBOX_TIMEOUT, metadata=tagged())
        try:
            out = bytearray()
            h = await s.pty.create(PtySize(rows=24, cols=80), on_data=out.extend)
            assert h.pid > 0
            await s.pty.send_stdin(h.pid, b"echo pty-$((6*7)); stty size\n")
            await async_wait_until(lambda: b"pty-42" in out, "PTY output through on_data", 30)
            await async_wait_until(lambda: b"24 80" in out, "`stty size` = 24 80", 30)
            assert b"\r\n" in out  # a terminal: CRLF line endings

            await s.pty.resize(h.pid, PtySize(rows=40, cols=132))
            await s.pty.send_stdin(h.pid, b"stty size; tty\n")
            await async_wait_until(lambda: b"40 132" in out, "`stty size` = 40 132 after resize", 30)
            # `tty` prints after `stty size`; its output may still be on the way.
            await async_wait_until(lambda: b"/dev/pts/" in out, "`tty` naming a pts device", 30)

            # Reattach: a second stream on the same PTY sees new output.
            await h.disconnect()
            again = bytearray()
            h2 = await s.pty.connect(h.pid, on_data=again.extend)
            await s.pty.send_stdin(h.pid, b"echo reattached-$((1+1))\n")
            await async_wait_until(lambda: b"reattached-2" in again, "output after pty.connect", 30)

            assert await s.pty.kill(h.pid) is True
            with pytest.raises(CommandExitException):
                await h2.wait()
            assert await s.pty.kill(h.pid) is False
            # Run as root, with envs and cwd.
            root_out = bytearray()
            h3 = await s.pty.create(
                PtySize(rows=10, cols=50),
                on_data=root_out.extend,
                user="root",
                cwd="/tmp",
                envs={"PTY_VAR": "pv"},
            )
            await s.pty.send_stdin(h3.pid, b"echo $(whoami):$(pwd):$PTY_VAR:$TERM; exit\n")
            await h3.wait()
            assert b"root:/tmp:pv:xterm" in root_out
        finally:
            await s.kill()

    run_async(body)


def test_pty_sync(sbx):
    out = bytearray()
    h = sbx.pty.create(PtySize(rows=20, cols=70))
    sbx.pty.resize(h.pid, PtySize(rows=33, cols=99))
    sbx.pty.send_stdin(h.pid, b"stty size; echo sync-$((2+3)); exit 0\n")
    r = h.wait(on_pty=out.extend)
    assert r.exit_code == 0
    assert b"sync-5" in out and b"33 99" in out
    h2 = sbx.pty.create(PtySize(rows=20, cols=70))
    assert sbx.pty.kill(h2.pid) is True
    with pytest.raises(CommandExitException):
        h2.wait()


# --------------------------------------------------------------------------- get_host

WS_ECHO_SERVER = r'''
import base64, hashlib, socket, struct, sys, threading

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def recv_exact(conn, n):
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def send_frame(conn, opcode, payload):
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    conn.sendall(head + payload)


def handle(conn):
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        headers = {}
        for line in data.split(b"\r\n")[1:]:
            if b":" in line:
                k, v = line.split(b":", 1)
                headers[k.strip().lower()] = v.strip()
        accept = base64.b64encode(hashlib.sha1(headers[b"sec-websocket-key"] + GUID).digest())
        conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        while True:
            b1, b2 = recv_exact(conn, 2)
            opcode, n = b1 & 0x0F, b2 & 0x7F
            if n == 126:
                n = struct.unpack(">H", recv_exact(conn, 2))[0]
            elif n == 127:
                n = struct.unpack(">Q", recv_exact(conn, 8))[0]
            mask = recv_exact(conn, 4) if b2 & 0x80 else b"\0\0\0\0"
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(recv_exact(conn, n)))
            if opcode == 8:
                send_frame(conn, 8, payload[:2])
                return
            if opcode == 9:
                send_frame(conn, 10, payload)
            elif opcode in (1, 2):
                send_frame(conn, opcode, (b"echo:" if opcode == 1 else b"") + payload)
    except (EOFError, OSError, KeyError):
        pass
    finally:
        conn.close()


srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(16)
print("listening", flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
'''


def test_get_host_http(sbx, workdir):
    sbx.files.write(f"{workdir}/www/hello-e2b.txt", "served by the sandbox")
    server = sbx.commands.run(
        "python3 -m http.server 8080", background=True, cwd=f"{workdir}/www", timeout=0
    )
    try:
        host = sbx.get_host(8080)
        assert host.startswith(f"8080-{sbx.sandbox_id}.")
        domain = os.environ["E2B_DOMAIN"]
        assert host == f"8080-{sbx.sandbox_id}.{domain}"
        resp = wait_until(
            lambda: (lambda r: r if r.status_code == 200 else None)(http_get_via_host(host, "/")),
            "the sandbox's http.server to answer through get_host(8080)",
            60,
            0.5,
        )
        assert "hello-e2b.txt" in resp.text  # the directory listing
        file_resp = http_get_via_host(host, "/hello-e2b.txt")
        assert file_resp.status_code == 200 and file_resp.text == "served by the sandbox"
        # A port nobody listens on: the proxy answers 502, it does not hang.
        closed = http_get_via_host(sbx.get_host(8099), "/")
        assert closed.status_code == 502
    finally:
        server.kill()


def test_get_host_websocket(sbx, workdir):
    import websocket  # websocket-client

    port = 8765
    sbx.files.write(f"{workdir}/ws_echo.py", WS_ECHO_SERVER)
    server = sbx.commands.run(f"python3 {workdir}/ws_echo.py {port}", background=True, timeout=0)
    try:
        host = sbx.get_host(port)
        target, host_header = proxy_target(host)
        opts = {"timeout": 15}
        if host_header:
            opts["host"] = host_header  # *.localhost does not resolve here

        def connect():
            return websocket.create_connection(f"ws://{target}/echo", **opts)

        ws = wait_until(connect, "a WebSocket through get_host to the echo server", 60, 0.5)
        try:
            ws.send("ping-" + RUN_TAG)
            assert ws.recv() == "echo:ping-" + RUN_TAG
            ws.send_binary(b"\x00\x01\x02")
            assert ws.recv() == b"\x00\x01\x02"
            big = "x" * 70000
            ws.send(big)
            assert ws.recv() == "echo:" + big
        finally:
            ws.close()
    finally:
        server.kill()


# --------------------------------------------------------------------------- errors


def test_connect_unknown_id():
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(UNKNOWN_ID)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(UNKNOWN_ID)
    assert Sandbox.kill(UNKNOWN_ID) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(UNKNOWN_ID, 60)


def test_killed_sandbox_commands_raise(make_sandbox):
    s = make_sandbox()
    assert s.commands.run("echo alive").stdout.strip() == "alive"
    s.kill()
    with pytest.raises(SandboxException) as ei:
        s.commands.run("echo hi", timeout=30)
    # E2B's proxy answers 502 "sandbox ... was not found" for a gone sandbox; the SDK
    # maps it to TimeoutException (SandboxNotRunningException in newer SDKs).
    assert isinstance(ei.value, TimeoutException), repr(ei.value)
    if hasattr(e2b, "SandboxNotRunningException"):
        assert isinstance(ei.value, e2b.SandboxNotRunningException), repr(ei.value)
    with pytest.raises(SandboxException):
        s.files.read("/etc/hostname")
    assert s.is_running() is False


def test_bad_api_key(sbx):
    with pytest.raises(AuthenticationException):
        Sandbox.create(TEMPLATE, timeout=60, api_key=BAD_API_KEY, metadata=tagged())
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key=BAD_API_KEY).next_items()
    with pytest.raises(AuthenticationException):
        Sandbox.connect(sbx.sandbox_id, api_key=BAD_API_KEY)
    with pytest.raises(AuthenticationException):
        Sandbox.kill(sbx.sandbox_id, api_key=BAD_API_KEY)
    assert sbx.is_running()  # untouched
