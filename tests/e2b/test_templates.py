"""E2B's template-build API through the official Python SDK (PyPI ``e2b``), unchanged.

Run by ``deploy/e2b-tests.sh`` with test_sdk.py, once per pinned SDK version (2.63.0 and
2.45.1: both have every Template call used here, so nothing is skipped by version). By
hand, with a server running on port P::

    eval "$(target/debug/colima-e2b env --port P)"
    python -m pytest -q tests/e2b/test_templates.py

Only the SDK's public API builds and uses templates (``e2b.Template`` and its builder,
``Template.build`` / ``build_in_background`` / ``get_build_status`` / ``exists`` /
``assign_tags`` / ``remove_tags`` / ``get_tags``, ``Sandbox.create(<template>)``). Raw HTTP
(httpx, with X-API-KEY) is used where the SDK has no call: deleting templates (the SDK
has none; E2B's CLI uses DELETE /templates/{id}) and reading the ``step`` of status log
entries (the SDK's LogEntry drops it).

Every template gets a name unique to the run (``t-<token>-...``) and is deleted by a
module finalizer; every sandbox carries ``metadata={"suite": RUN_TAG}`` and is killed.

Coverage (test -> what it checks)
---------------------------------
test_full_template_sandbox     from_base_image, run_cmd (default user, and user="root"),
                               copy(file, user="root", mode=0o750), copy(directory),
                               set_envs, set_workdir, set_user, set_start_cmd with
                               wait_for_url; on_build_logs (SDK, step and RUN output
                               lines), status log entries' steps; Sandbox.create(name):
                               files, owners, modes, envs, cwd, user, start command
                               running in the workdir as the user with the envs
test_rebuild_is_cached         same template and name again: same template ID, new build,
                               uploads skipped, every step "cached", no RUN output;
                               Sandbox.create(template ID); skip_cache=True rebuilds
test_failing_run_step          run_cmd exiting 3 as step 2: BuildException naming the step
                               and exit code, traceback at the run_cmd line,
                               get_build_status -> error with reason.step "2", the step's
                               output in the logs, no sandbox from the template
test_names_and_tags            build "name:v1" with tags=["stable"], exists(), create by
                               tag, build_in_background + get_build_status polling,
                               get_tags, assign_tags, remove_tags, newest build for the
                               bare name, DELETE -> exists() False
test_template_resources        build(cpu_count, memory_mb) -> the sandbox's cpu_count, memory_mb
test_from_template_and_ready   from_template(first) inherits files, envs, user, workdir;
                               a ready command gates Sandbox.create
test_ready_cmd_never_passes    a ready command that never passes fails Sandbox.create
                               after the server's ready timeout (default 120 s) with the
                               command's output; no sandbox is left behind
"""

from __future__ import annotations

import inspect
import os
import re
import time
import uuid
from pathlib import Path
from typing import List, Optional

import httpx
import pytest

from conftest import readme_python_blocks, require_e2b_environment

from e2b import (
    BuildException,
    BuildInfo,
    LogEntry,
    Sandbox,
    SandboxException,
    SandboxQuery,
    Template,
    TemplateBuildStatus,
    wait_for_file,
    wait_for_url,
)

TOKEN = uuid.uuid4().hex[:8]
RUN_TAG = f"e2b-templates-{TOKEN}"
SANDBOX_TIMEOUT = 600
# The server's builds.ready_timeout: deploy/e2b-tests.sh starts it with 15 s and says so
# here (the default is 120 s).
READY_TIMEOUT = int(os.environ.get("E2B_TEST_READY_TIMEOUT", "120"))

# Steps of full_template() (1-based, as the status endpoint numbers them).
FULL_STEPS = 7


# --------------------------------------------------------------------------- helpers


def api(method: str, path: str, **kwargs) -> httpx.Response:
    """A control-plane request as E2B's CLI sends it (X-API-KEY), for calls the SDK lacks."""
    url = os.environ["E2B_API_URL"].rstrip("/") + path
    headers = {"X-API-KEY": os.environ["E2B_API_KEY"]}
    with httpx.Client(trust_env=False, timeout=60) as client:
        return client.request(method, url, headers=headers, **kwargs)


def raw_log_entries(template_id: str, build_id: str) -> List[dict]:
    """Every status log entry of a build, with its `step` (which the SDK's LogEntry drops)."""
    entries: List[dict] = []
    while True:
        r = api(
            "GET",
            f"/templates/{template_id}/builds/{build_id}/status",
            params={"logsOffset": len(entries)},
        )
        assert r.status_code == 200, (r.status_code, r.text)
        got = r.json()["logEntries"]
        if not got:
            return entries
        entries.extend(got)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain(message: str) -> str:
    """A raw entry's text as the SDK shows it: without terminal color codes (Docker's
    builder colors a step's stderr; the SDKs' LogEntry strips such codes)."""
    return _ANSI.sub("", message)


def steps_of(entries: List[dict]) -> set:
    return {e.get("step") for e in entries if e.get("step") is not None}


def messages(logs: List[LogEntry]) -> List[str]:
    return [entry.message for entry in logs]


def kill_quietly(sandbox_id: str) -> None:
    try:
        Sandbox.kill(sandbox_id)
    except Exception:
        pass


def list_tagged(extra: Optional[dict] = None) -> list:
    paginator = Sandbox.list(query=SandboxQuery(metadata={"suite": RUN_TAG, **(extra or {})}))
    items = []
    while paginator.has_next:
        items.extend(paginator.next_items())
    return items


def run(sbx: Sandbox, cmd: str, **kwargs) -> str:
    """stdout of a command that must succeed, stripped."""
    r = sbx.commands.run(cmd, **kwargs)
    assert r.exit_code == 0, (cmd, r.exit_code, r.stdout, r.stderr)
    return r.stdout.strip()


def build_ids_from_logs(logs: List[LogEntry]):
    """(template ID, build ID) from the SDK's own "Template created with ID: ..." entry."""
    for m in messages(logs):
        if m.startswith("Template created with ID: "):
            rest = m[len("Template created with ID: ") :]
            template_id, _, build_id = rest.partition(", Build ID: ")
            return template_id.strip(), build_id.strip()
    raise AssertionError(f"no 'Template created' entry in {messages(logs)}")


class Templates:
    """Template IDs and names this module created, deleted at the end."""

    def __init__(self):
        self.ids: List[str] = []  # in creation order
        self.names: set = set()

    def name(self, suffix: str) -> str:
        n = f"t-{TOKEN}-{suffix}"
        self.names.add(n)
        return n

    def track(self, template_id: str) -> None:
        if template_id not in self.ids:
            self.ids.append(template_id)

    def cleanup(self) -> None:
        for n in self.names:
            try:
                r = api("GET", f"/templates/aliases/{n}")
                if r.status_code == 200:
                    self.track(r.json()["templateID"])
            except Exception:
                pass
        # Newest first: a template built from another goes before its base.
        for tid in reversed(self.ids):
            try:
                api("DELETE", f"/templates/{tid}")
            except Exception:
                pass


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def e2b_environment():
    require_e2b_environment()
    yield
    try:
        for info in list_tagged():
            kill_quietly(info.sandbox_id)
    except Exception:
        pass


@pytest.fixture(scope="module")
def templates(e2b_environment):
    t = Templates()
    yield t
    t.cleanup()


@pytest.fixture
def make_sandbox(request):
    """Sandbox.create(template, ...) tagged with the run; killed when the test ends."""

    def make(template: str, **kwargs) -> Sandbox:
        kwargs.setdefault("timeout", SANDBOX_TIMEOUT)
        kwargs["metadata"] = {"suite": RUN_TAG, **(kwargs.get("metadata") or {})}
        sandbox = Sandbox.create(template, **kwargs)
        request.addfinalizer(lambda: kill_quietly(sandbox.sandbox_id))
        return sandbox

    return make


def write_context(ctx: Path) -> None:
    # The token makes the files new to the server (its upload cache is by content).
    (ctx / "run.sh").write_text(f"#!/bin/sh\necho tool-ok-{TOKEN}\n")
    (ctx / "assets" / "sub").mkdir(parents=True)
    (ctx / "assets" / "a.txt").write_text(f"alpha-{TOKEN}\n")
    (ctx / "assets" / "sub" / "b.txt").write_text("beta\n")


def full_template(ctx: Path):
    """The template of test_full_template_sandbox (a new builder each call)."""
    return (
        Template(file_context_path=str(ctx))
        .from_base_image()
        # 1: as the default user; the token keeps the engine's layer cache of earlier
        # runs out of it, and its output must reach the build logs.
        .run_cmd(f"echo marker-{TOKEN}-$(whoami) | tee /tmp/marker")
        # 2, 3
        .copy("run.sh", "/opt/tool/", user="root", mode=0o750)
        .copy("assets", "/app/assets/")
        # 4
        .set_envs({"GREETING": "hello", "TPL_SPACES": "two words"})
        # 5
        .set_workdir("/app")
        # 6: as root, in the workdir, with the envs
        .run_cmd('{ whoami; pwd; echo "$GREETING"; } > build-info.txt', user="root")
        # 7
        .set_user("user")
        .set_start_cmd(
            "python3 -m http.server 8080 --bind 127.0.0.1 > /tmp/http.log 2>&1",
            wait_for_url("http://localhost:8080/"),
        )
    )


class FullBuild:
    def __init__(self, name: str, ctx: Path, info: BuildInfo, logs: List[LogEntry]):
        self.name, self.ctx, self.info, self.logs = name, ctx, info, logs


@pytest.fixture(scope="module")
def full_build(templates, tmp_path_factory) -> FullBuild:
    ctx = tmp_path_factory.mktemp("full-context")
    write_context(ctx)
    name = templates.name("full")
    logs: List[LogEntry] = []
    try:
        info = Template.build(full_template(ctx), name, on_build_logs=logs.append)
    except BaseException:
        print("\n".join(str(entry) for entry in logs))
        raise
    templates.track(info.template_id)
    return FullBuild(name, ctx, info, logs)


# --------------------------------------------------------------------------- tests


def test_full_template_sandbox(full_build, make_sandbox):
    info, logs = full_build.info, full_build.logs
    assert info.name == full_build.name
    assert info.template_id and info.build_id
    uuid.UUID(info.build_id)  # E2B's build IDs are UUIDs
    assert "default" in info.tags, info.tags  # a build without a tag gets "default"

    # The SDK's own entries, and what the server sent through the status polling.
    text = messages(logs)
    assert f"Requesting build for template: {full_build.name}" in text
    assert "Uploaded 'run.sh'" in text and "Uploaded 'assets'" in text, text
    assert f"marker-{TOKEN}-user" in text, text  # step 1's output line
    assert not any(entry.level == "error" for entry in logs), [str(e) for e in logs]
    status = Template.get_build_status(info, logs_offset=0)
    assert status.status == TemplateBuildStatus.READY
    assert status.reason is None
    assert status.build_id == info.build_id and status.template_id == info.template_id
    assert status.log_entries and all(isinstance(e, LogEntry) for e in status.log_entries)
    entries = raw_log_entries(info.template_id, info.build_id)
    want_steps = {"base", "finalize", *(str(n) for n in range(1, FULL_STEPS + 1))}
    assert want_steps <= steps_of(entries), sorted(steps_of(entries))
    marker_steps = {
        e.get("step") for e in entries if plain(e["message"]) == f"marker-{TOKEN}-user"
    }
    assert marker_steps == {"1"}, marker_steps

    s = make_sandbox(full_build.name)
    # Step 1 ran as the default user `user`.
    assert run(s, "cat /tmp/marker") == f"marker-{TOKEN}-user"
    # Step 2: one file, owner root, mode 0750: not readable by `user`.
    assert run(s, "stat -c '%U %a' /opt/tool/run.sh") == "root 750"
    assert run(s, "cat /opt/tool/run.sh", user="root") == f"#!/bin/sh\necho tool-ok-{TOKEN}"
    assert run(s, "/opt/tool/run.sh", user="root") == f"tool-ok-{TOKEN}"
    assert s.commands.run("test -r /opt/tool/run.sh || echo unreadable").stdout.strip() == (
        "unreadable"
    )
    # Step 3: a directory, its tree, owned by the user current at that step.
    assert run(s, "cat /app/assets/a.txt /app/assets/sub/b.txt") == f"alpha-{TOKEN}\nbeta"
    assert run(s, "stat -c %U /app/assets/a.txt /app/assets/sub/b.txt") == "user\nuser"
    # Steps 4-6: envs, workdir, a RUN as root in the workdir with the envs.
    assert run(s, 'echo "$GREETING|$TPL_SPACES"') == "hello|two words"
    assert run(s, "cat /app/build-info.txt") == "root\n/app\nhello"
    assert run(s, "stat -c %U /app/build-info.txt") == "root"
    # The template's user and workdir are the commands' defaults.
    assert run(s, "whoami") == "user"
    assert run(s, "pwd") == "/app"
    # The start command runs (the ready command passed before create returned), as the
    # template's user, in its workdir (http.server lists the current directory), with
    # the template's envs.
    listing = run(s, "curl -sf http://127.0.0.1:8080/")
    assert "assets/" in listing and "build-info.txt" in listing, listing
    # ([h] keeps the shell running pgrep from matching its own command line)
    pid = run(s, "pgrep -o -f '^python3 -m [h]ttp[.]server 8080'")
    assert pid.isdigit(), pid
    assert run(s, f"ps -o user= -p {pid}") == "user"
    assert run(s, f"readlink /proc/{pid}/cwd") == "/app"
    environ = run(s, f"tr '\\0' '\\n' < /proc/{pid}/environ")
    assert "GREETING=hello" in environ.splitlines(), environ
    # E2B's sandbox info: templateID is the template's ID, the name is its alias.
    sinfo = s.get_info()
    assert sinfo.template_id == info.template_id, (sinfo.template_id, sinfo.name)


def test_rebuild_is_cached(full_build, templates, make_sandbox):
    logs: List[LogEntry] = []
    info = Template.build(full_template(full_build.ctx), full_build.name, on_build_logs=logs.append)
    templates.track(info.template_id)
    # The same name is the same template, with a new build.
    assert info.template_id == full_build.info.template_id
    assert info.build_id != full_build.info.build_id

    text = messages(logs)
    assert "Skipping upload of 'run.sh', already cached" in text, text
    assert "Skipping upload of 'assets', already cached" in text, text
    assert not any(m.startswith("Uploaded '") for m in text), text
    cached = [e for e in logs if e.message == "cached"]
    assert cached and all(e.level == "debug" for e in cached), [str(e) for e in cached]
    # Nothing ran again: step 1's output (not its description) is not in this build's log.
    assert f"marker-{TOKEN}-user" not in text, text
    entries = raw_log_entries(info.template_id, info.build_id)
    cached_steps = {
        e.get("step")
        for e in entries
        if plain(e["message"]) == "cached" and e["level"] == "debug"
    }
    want = {str(n) for n in range(1, FULL_STEPS + 1)}
    assert want <= cached_steps, f"steps without a cached entry: {sorted(want - cached_steps)}"

    # A sandbox by template ID gets the new (cached) build's image.
    s = make_sandbox(info.template_id)
    assert run(s, "cat /tmp/marker") == f"marker-{TOKEN}-user"
    assert run(s, "curl -sf -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/") == "200"

    # skip_cache=True: every step runs again.
    forced: List[LogEntry] = []
    info3 = Template.build(
        full_template(full_build.ctx), full_build.name, skip_cache=True, on_build_logs=forced.append
    )
    assert info3.template_id == info.template_id and info3.build_id != info.build_id
    text = messages(forced)
    assert f"marker-{TOKEN}-user" in text, text
    entries = raw_log_entries(info3.template_id, info3.build_id)
    recached = {e.get("step") for e in entries if plain(e["message"]) == "cached"} & want
    assert not recached, f"steps cached despite skip_cache: {sorted(recached)}"


def test_failing_run_step(templates, make_sandbox, tmp_path):
    name = templates.name("fails")
    t = Template(file_context_path=str(tmp_path)).from_base_image()
    t = t.run_cmd("echo before-the-failure")  # step 1
    # The pause: Podman 4.3's build endpoint can drop output written in the instant
    # before a step fails (README, Building templates).
    failing_line = inspect.currentframe().f_lineno + 1
    t = t.run_cmd("echo about-to-fail >&2; sleep 1; exit 3")  # step 2
    t = t.run_cmd("echo never-runs")  # step 3
    logs: List[LogEntry] = []
    with pytest.raises(BuildException) as exc_info:
        Template.build(t, name, on_build_logs=logs.append)
    template_id, build_id = build_ids_from_logs(logs)
    templates.track(template_id)

    message = str(exc_info.value)
    assert "step 2" in message and "exit code 3" in message, message
    # The SDK points the exception's traceback at the failing step's builder call (it
    # maps reason.step to the stack trace it collected for that step).
    last = exc_info.tb
    while last.tb_next is not None:
        last = last.tb_next
    assert (last.tb_frame.f_code.co_filename, last.tb_lineno) == (__file__, failing_line), (
        last.tb_frame.f_code.co_filename,
        last.tb_lineno,
    )

    text = messages(logs)
    assert "about-to-fail" in text, text  # the step's stderr line
    assert "never-runs" not in text, text  # step 3 did not run
    assert any(e.level == "error" for e in logs), [str(e) for e in logs]

    status = Template.get_build_status(
        BuildInfo(template_id=template_id, build_id=build_id, name=name, alias=name),
        logs_offset=0,
    )
    assert status.status == TemplateBuildStatus.ERROR
    assert status.reason is not None and status.reason.step == "2", status.reason
    assert status.reason.message == message
    entries = raw_log_entries(template_id, build_id)
    failing = [e for e in entries if plain(e["message"]) == "about-to-fail"]
    assert failing and {e.get("step") for e in failing} == {"2"}, failing

    # No ready build: no sandbox from it.
    with pytest.raises(SandboxException):
        make_sandbox(name)


def test_names_and_tags(templates, make_sandbox, tmp_path):
    name = templates.name("tags")
    assert Template.exists(name) is False

    v1 = Template(file_context_path=str(tmp_path)).from_base_image().run_cmd(
        f"echo v1-{TOKEN} > /home/user/version"
    )
    info1 = Template.build(v1, f"{name}:v1", tags=["stable"])
    templates.track(info1.template_id)
    assert info1.name == f"{name}:v1"
    assert set(info1.tags) == {"v1", "stable"}, info1.tags

    assert Template.exists(name) is True
    assert Template.exists(f"t-{uuid.uuid4().hex[:8]}-nosuch") is False

    s = make_sandbox(f"{name}:v1")
    assert run(s, "cat /home/user/version") == f"v1-{TOKEN}"
    s.kill()
    s = make_sandbox(f"{name}:stable")
    assert run(s, "cat /home/user/version") == f"v1-{TOKEN}"
    s.kill()

    # In the background, polled with get_build_status until it ends.
    v2 = Template(file_context_path=str(tmp_path)).from_base_image().run_cmd(
        f"echo v2-{TOKEN} > /home/user/version"
    )
    info2 = Template.build_in_background(v2, f"{name}:v2")
    templates.track(info2.template_id)
    assert info2.template_id == info1.template_id and info2.build_id != info1.build_id
    assert "v2" in info2.tags, info2.tags
    seen: List[LogEntry] = []
    statuses = []
    deadline = time.monotonic() + 240
    while True:
        st = Template.get_build_status(info2, logs_offset=len(seen))
        statuses.append(st.status)
        seen.extend(st.log_entries)
        if st.status in (TemplateBuildStatus.READY, TemplateBuildStatus.ERROR):
            break
        assert time.monotonic() < deadline, f"build still {st.status} after 240 s"
        time.sleep(0.5)
    while True:  # the last entries may come after the final status (as the SDK does)
        more = Template.get_build_status(info2, logs_offset=len(seen)).log_entries
        if not more:
            break
        seen.extend(more)
    assert st.status == TemplateBuildStatus.READY, (st.reason, [str(e) for e in seen])
    assert all(
        x in (TemplateBuildStatus.WAITING, TemplateBuildStatus.BUILDING) for x in statuses[:-1]
    ), statuses
    # Offsets are absolute: paging with them read every entry exactly once.
    whole = Template.get_build_status(info2, logs_offset=0).log_entries
    assert [e.message for e in seen] == [e.message for e in whole]
    # (this build's step, described in its log)
    assert any(f"v2-{TOKEN}" in e.message for e in seen), [str(e) for e in seen]

    # Tags point at builds; a tag keeps its build when newer builds come.
    tags = {t.tag: t.build_id for t in Template.get_tags(name)}
    assert tags.get("v1") == info1.build_id and tags.get("stable") == info1.build_id, tags
    assert tags.get("v2") == info2.build_id, tags
    s = make_sandbox(f"{name}:v1")
    assert run(s, "cat /home/user/version") == f"v1-{TOKEN}"
    s.kill()
    s = make_sandbox(f"{name}:v2")
    assert run(s, "cat /home/user/version") == f"v2-{TOKEN}"
    s.kill()
    # The bare name: the newest ready build.
    s = make_sandbox(name)
    assert run(s, "cat /home/user/version") == f"v2-{TOKEN}"
    s.kill()

    assigned = Template.assign_tags(f"{name}:v2", "prod")
    assert assigned.build_id == info2.build_id and list(assigned.tags) == ["prod"], assigned
    assert {t.tag: t.build_id for t in Template.get_tags(name)}.get("prod") == info2.build_id
    s = make_sandbox(f"{name}:prod")
    assert run(s, "cat /home/user/version") == f"v2-{TOKEN}"
    s.kill()

    Template.remove_tags(name, ["stable"])
    left = {t.tag for t in Template.get_tags(name)}
    assert "stable" not in left and {"v1", "v2", "prod"} <= left, left
    with pytest.raises(SandboxException) as exc_info:
        make_sandbox(f"{name}:stable")
    assert "stable" in str(exc_info.value), str(exc_info.value)

    # Deleting the template removes the name.
    r = api("DELETE", f"/templates/{info1.template_id}")
    assert r.status_code == 204, (r.status_code, r.text)
    assert Template.exists(name) is False
    with pytest.raises(SandboxException):
        make_sandbox(f"{name}:v2")


def test_template_resources(templates, make_sandbox, tmp_path):
    # Not the server's sandbox defaults (1 CPU, 512 MB), nor 2.45.1's build defaults.
    name = templates.name("sized")
    t = Template(file_context_path=str(tmp_path)).from_base_image().run_cmd("true")
    info = Template.build(t, name, cpu_count=2, memory_mb=768)
    templates.track(info.template_id)
    s = make_sandbox(name)
    sinfo = s.get_info()
    # E2B's sandboxes get the CPU and memory their template was built with.
    assert (sinfo.cpu_count, sinfo.memory_mb) == (2, 768), (sinfo.cpu_count, sinfo.memory_mb)


def test_from_template_and_ready(full_build, templates, make_sandbox, tmp_path):
    name = templates.name("child")
    child = (
        Template(file_context_path=str(tmp_path))
        .from_template(full_build.name)
        .run_cmd("cat /tmp/marker > inherited-marker && whoami >> inherited-marker")
        .set_start_cmd(
            "sleep 3 && echo up > /tmp/child-ready && exec sleep 100000",
            wait_for_file("/tmp/child-ready"),
        )
    )
    logs: List[LogEntry] = []
    info = Template.build(child, name, on_build_logs=logs.append)
    templates.track(info.template_id)
    assert info.template_id != full_build.info.template_id

    s = make_sandbox(name)
    # The ready command passed before create returned: the file the start command writes
    # after 3 s is there at once.
    assert run(s, "cat /tmp/child-ready") == "up"
    # Inherited from the parent: files, owners, modes, envs, user, workdir.
    assert run(s, "cat /app/inherited-marker") == f"marker-{TOKEN}-user\nuser"
    assert run(s, "stat -c '%U %a' /opt/tool/run.sh") == "root 750"
    assert run(s, "cat /app/assets/sub/b.txt") == "beta"
    assert run(s, 'echo "$GREETING"') == "hello"
    assert run(s, "whoami") == "user"
    assert run(s, "pwd") == "/app"
    # The child's start command replaced the parent's.
    r = s.commands.run("pgrep -f '[h]ttp[.]server 8080' || echo none")
    assert r.stdout.strip() == "none", r.stdout


def test_ready_cmd_never_passes(templates, make_sandbox, tmp_path):
    name = templates.name("never")
    t = (
        Template(file_context_path=str(tmp_path))
        .from_base_image()
        .set_start_cmd("exec sleep 100000", f"echo not-ready-{TOKEN}; exit 1")
    )
    info = Template.build(t, name)
    templates.track(info.template_id)

    with pytest.raises(SandboxException) as exc_info:
        # The SDK's default request timeout (60 s) may be shorter than the server's wait.
        make_sandbox(name, metadata={"case": "never-ready"}, request_timeout=READY_TIMEOUT + 60)
    message = str(exc_info.value)
    assert f"not-ready-{TOKEN}" in message, message
    assert f"did not pass within {READY_TIMEOUT} s" in message, message
    assert list_tagged({"case": "never-ready"}) == [], "the failed sandbox was left running"


def readme_template_example() -> str:
    """The README's Python template example (E2B SDKs section), as written there."""
    found = readme_python_blocks("E2B SDKs", "Template.build(")
    assert len(found) == 1, f"one README example builds a template: {found}"
    return found[0]


def test_readme_template_example_runs_verbatim(templates, capsys):
    code = readme_template_example()
    # The example's name, tracked for cleanup (it is fixed in the README).
    templates.names.add("readme-web")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "built by the server\nhello\n<!DOCTYPE HTML>" in out, out
