"""Offline check that the installed `e2b` SDK has every public call test_sdk.py makes,
with the keyword arguments it passes (inspect.signature), and the result fields it reads.

    python tests/e2b/check_sdk_api.py      # exit 1 and a list of what is missing

Run by deploy/e2b-tests.sh in each SDK virtualenv before the suite, so an SDK bump that
renames something fails with a clear message instead of an obscure test error. Calls the
suite only makes when present (feature-detected) are listed under OPTIONAL and reported
without failing.
"""

import dataclasses
import inspect
import sys
from importlib.metadata import version

import e2b
from e2b.sandbox_async.commands.command import Commands as AsyncCommands
from e2b.sandbox_async.commands.pty import Pty as AsyncPty
from e2b.sandbox_async.filesystem.filesystem import Filesystem as AsyncFilesystem
from e2b.sandbox_sync.commands.command import Commands
from e2b.sandbox_sync.commands.pty import Pty
from e2b.sandbox_sync.filesystem.filesystem import Filesystem

# (owner, attribute, keyword arguments the suite passes by name)
REQUIRED = [
    (e2b.Sandbox, "create", ["template", "timeout", "metadata", "envs", "secure", "api_key"]),
    (e2b.Sandbox, "connect", ["timeout"]),
    (e2b.Sandbox, "kill", []),
    (e2b.Sandbox, "get_info", []),
    (e2b.Sandbox, "get_metrics", []),
    (e2b.Sandbox, "set_timeout", ["timeout"]),
    (e2b.Sandbox, "list", ["query", "limit", "next_token"]),
    (e2b.Sandbox, "is_running", []),
    (e2b.Sandbox, "get_host", ["port"]),
    (e2b.Sandbox, "upload_url", ["path", "user", "use_signature_expiration"]),
    (e2b.Sandbox, "download_url", ["path", "user", "use_signature_expiration"]),
    (e2b.Sandbox, "sandbox_id", None),
    (e2b.Sandbox, "commands", None),
    (e2b.Sandbox, "files", None),
    (e2b.Sandbox, "pty", None),
    (e2b.AsyncSandbox, "create", ["template", "timeout", "metadata"]),
    (e2b.AsyncSandbox, "kill", []),
    (e2b.AsyncSandbox, "is_running", []),
    (e2b.SandboxPaginator, "next_items", []),
    (e2b.SandboxPaginator, "has_next", None),
    (e2b.SandboxPaginator, "next_token", None),
    (Commands, "run", ["background", "envs", "user", "cwd", "on_stdout", "on_stderr", "stdin", "timeout"]),
    (Commands, "list", []),
    (Commands, "kill", ["pid"]),
    (Commands, "send_stdin", ["pid", "data"]),
    (Commands, "close_stdin", ["pid"]),
    (Commands, "connect", ["pid", "timeout"]),
    (AsyncCommands, "run", ["background", "on_stdout", "on_stderr"]),
    (AsyncCommands, "connect", ["pid", "on_stdout"]),
    (e2b.CommandHandle, "pid", None),
    (e2b.CommandHandle, "wait", ["on_stdout", "on_pty"]),
    (e2b.CommandHandle, "kill", []),
    (e2b.CommandHandle, "send_stdin", ["data"]),
    (e2b.CommandHandle, "close_stdin", []),
    (e2b.CommandHandle, "disconnect", []),
    (e2b.AsyncCommandHandle, "wait", []),
    (e2b.AsyncCommandHandle, "disconnect", []),
    (e2b.AsyncCommandHandle, "pid", None),
    (Filesystem, "read", ["path", "format", "user", "gzip"]),
    (Filesystem, "write", ["path", "data", "user", "gzip"]),
    (Filesystem, "write_files", ["files", "gzip"]),
    (Filesystem, "list", ["path", "depth"]),
    (Filesystem, "exists", ["path"]),
    (Filesystem, "get_info", ["path"]),
    (Filesystem, "remove", ["path"]),
    (Filesystem, "rename", ["old_path", "new_path"]),
    (Filesystem, "make_dir", ["path"]),
    (Filesystem, "watch_dir", ["path"]),
    (e2b.WatchHandle, "get_new_events", []),
    (e2b.WatchHandle, "stop", []),
    (AsyncFilesystem, "watch_dir", ["path", "on_event", "recursive"]),
    (AsyncFilesystem, "write", ["path", "data"]),
    (AsyncFilesystem, "make_dir", ["path"]),
    (e2b.AsyncWatchHandle, "stop", []),
    (Pty, "create", ["size"]),
    (Pty, "resize", ["pid", "size"]),
    (Pty, "send_stdin", ["pid", "data"]),
    (Pty, "kill", ["pid"]),
    (AsyncPty, "create", ["size", "on_data", "user", "cwd", "envs"]),
    (AsyncPty, "connect", ["pid", "on_data"]),
    (AsyncPty, "resize", ["pid", "size"]),
    (AsyncPty, "send_stdin", ["pid", "data"]),
    (AsyncPty, "kill", ["pid"]),
]

# Feature-detected in the suite (skipped with a reason where absent).
OPTIONAL = [
    (e2b.Sandbox, "pause", []),
    (e2b.Sandbox, "beta_pause", []),
    (e2b.Sandbox, "resume", []),
    (Commands, "stream_input", ["pid", "data"]),
]

# Dataclass fields the suite reads.
FIELDS = {
    e2b.CommandResult: ["stdout", "stderr", "exit_code", "error"],
    e2b.CommandExitException: ["stdout", "stderr", "exit_code"],
    e2b.ProcessInfo: ["pid", "cmd", "args", "envs"],
    e2b.EntryInfo: ["name", "type", "path", "size", "permissions", "owner", "modified_time"],
    e2b.WriteInfo: ["name", "path"],
    e2b.SandboxInfo: [
        "sandbox_id", "template_id", "name", "metadata", "started_at", "end_at", "state",
        "cpu_count", "memory_mb", "envd_version",
    ],
    e2b.SandboxMetrics: [
        "cpu_count", "cpu_used_pct", "mem_used", "mem_total", "mem_cache", "disk_used",
        "disk_total", "timestamp",
    ],
    e2b.FilesystemEvent: ["name", "type"],
    e2b.PtySize: ["rows", "cols"],
    e2b.SandboxQuery: ["metadata", "state"],
}

NAMES = [
    "Sandbox", "AsyncSandbox", "SandboxQuery", "SandboxState", "CommandExitException",
    "TimeoutException", "NotFoundException", "SandboxNotFoundException",
    "AuthenticationException", "SandboxException", "FileType", "FilesystemEventType", "PtySize",
]
ENUM_MEMBERS = {
    "SandboxState": ["RUNNING", "PAUSED"],
    "FileType": ["FILE", "DIR"],
    "FilesystemEventType": ["CREATE", "WRITE", "REMOVE", "RENAME"],
}


def check(owner, attr, kwargs):
    if not hasattr(owner, attr):
        return f"{owner.__name__}.{attr} is missing"
    if kwargs is None:
        return None
    try:
        params = inspect.signature(getattr(owner, attr)).parameters
    except (TypeError, ValueError):
        return f"{owner.__name__}.{attr}: no signature"
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    missing = [k for k in kwargs if k not in params and not (has_var_kw and k == "api_key")]
    if missing:
        return f"{owner.__name__}.{attr}() lacks keyword(s) {missing}"
    return None


def main() -> int:
    problems = []
    for name in NAMES:
        if not hasattr(e2b, name):
            problems.append(f"e2b.{name} is missing")
    for enum, members in ENUM_MEMBERS.items():
        for m in members:
            if not hasattr(getattr(e2b, enum, None), m):
                problems.append(f"e2b.{enum}.{m} is missing")
    for owner, attr, kwargs in REQUIRED:
        p = check(owner, attr, kwargs)
        if p:
            problems.append(p)
    for cls, fields in FIELDS.items():
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(dir(cls))
        for f in fields:
            if f not in names:
                problems.append(f"{cls.__name__}.{f} field is missing")
    absent = [f"{o.__name__}.{a}" for o, a, k in OPTIONAL if check(o, a, k)]
    # api_key travels in **opts (ApiParams); make sure the TypedDict knows it.
    if "api_key" not in e2b.ApiParams.__annotations__:
        problems.append("ApiParams has no api_key")

    print(f"e2b {version('e2b')}: {len(REQUIRED)} calls, {len(FIELDS)} result types checked")
    if absent:
        print("optional, absent (the suite skips them with a reason): " + ", ".join(absent))
    for p in problems:
        print("MISSING: " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
