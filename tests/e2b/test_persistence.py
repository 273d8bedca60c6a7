"""Pause and resume as E2B means them, through the official Python SDK: a pause that
keeps memory (the container is frozen) and one that keeps only the filesystem (the
container stops, so its memory is freed; a resume starts it again), the lifecycle
options of ``Sandbox.create`` (``on_timeout: pause`` and ``auto_resume``), and a
``connect`` that resumes. The engine is asked what became of the container
(conftest.container_state). A server SIGKILL while sandboxes are paused is tested by
tests/tests/persistence.rs, which owns the server process.

Coverage (test -> behaviour)
  test_pause_keeps_memory_or_only_the_filesystem   pause() (frozen, processes go on),
                                                   pause(keep_memory=False) (stopped,
                                                   files kept, processes gone),
                                                   connect() resumes both,
                                                   connect(on_resume="reboot") where
                                                   the SDK has it
  test_on_timeout_pause_then_auto_resume           lifecycle={"on_timeout": "pause",
                                                   "auto_resume": True}: paused at the
                                                   deadline, get_info().lifecycle, the
                                                   next command resumes it
  test_filesystem_auto_pause_needs_connect         on_timeout {"action": "pause",
                                                   filesystem only}: stopped at the
                                                   deadline, connect() boots it again
  test_snapshot_create_list_delete                 create_snapshot(name) (the source runs
                                                   on), Sandbox.create(snapshot_id) has
                                                   its files, list_snapshots (instance
                                                   and class), delete_snapshot
  test_fork_of_three                               fork(count=3, timeout): three
                                                   sandboxes with the source's files and
                                                   metadata, processes not carried over
"""

from __future__ import annotations

import inspect
import uuid

from e2b import Sandbox, SandboxState

from conftest import container_state
from test_sdk import wait_until


def is_paused(sandbox_id: str) -> bool:
    return Sandbox.get_info(sandbox_id).state == SandboxState.PAUSED


def test_pause_keeps_memory_or_only_the_filesystem(new_sandbox):
    s = new_sandbox()
    s.files.write("/home/user/kept.txt", "kept")
    bg = s.commands.run("sleep 4242", background=True, timeout=0)
    bg.disconnect()

    # With memory: frozen; its processes are where they were after the resume.
    assert s.pause() is True
    assert container_state(s.sandbox_id) == "paused"
    assert is_paused(s.sandbox_id)
    s.connect()
    assert any(p.pid == bg.pid for p in s.commands.list())

    # Only the filesystem: the container stops (its memory is freed).
    assert s.pause(keep_memory=False) is True
    assert container_state(s.sandbox_id) in ("exited", "stopped")
    assert is_paused(s.sandbox_id)
    assert s.pause(keep_memory=False) is False, "paused twice: 409"
    resumed = Sandbox.connect(s.sandbox_id, timeout=120)
    assert container_state(s.sandbox_id) == "running"
    assert resumed.files.read("/home/user/kept.txt") == "kept"
    assert all(p.pid != bg.pid for p in resumed.commands.list()), "processes restart"
    assert resumed.commands.run("whoami").stdout.strip() == "user"

    # `on_resume="reboot"` (newer SDKs): a frozen sandbox starts from its filesystem.
    if "on_resume" in inspect.signature(Sandbox.connect).parameters:
        bg = resumed.commands.run("sleep 4244", background=True, timeout=0)
        bg.disconnect()
        assert resumed.pause() is True
        rebooted = Sandbox.connect(s.sandbox_id, on_resume="reboot")
        assert all(p.pid != bg.pid for p in rebooted.commands.list())
        assert rebooted.files.read("/home/user/kept.txt") == "kept"


def test_on_timeout_pause_then_auto_resume():
    group = uuid.uuid4().hex[:8]
    s = Sandbox.create(
        "base",
        timeout=3,
        metadata={"persistence": group},
        lifecycle={"on_timeout": "pause", "auto_resume": True},
    )
    try:
        lifecycle = Sandbox.get_info(s.sandbox_id).lifecycle
        assert lifecycle is not None
        assert lifecycle["on_timeout"] == "pause" and lifecycle["auto_resume"] is True
        s.files.write("/home/user/f.txt", "before")
        wait_until(lambda: is_paused(s.sandbox_id), "paused at the deadline", timeout=60)
        assert container_state(s.sandbox_id) == "paused"
        # The next request resumes it; the client sees no error.
        assert s.commands.run("cat /home/user/f.txt").stdout == "before"
        assert Sandbox.get_info(s.sandbox_id).state == SandboxState.RUNNING
    finally:
        Sandbox.kill(s.sandbox_id)


def test_filesystem_auto_pause_needs_connect():
    s = Sandbox.create(
        "base",
        timeout=3,
        lifecycle={"on_timeout": {"action": "pause", "keep_memory": False}},
    )
    try:
        s.files.write("/home/user/f.txt", "on disk")
        wait_until(lambda: is_paused(s.sandbox_id), "paused at the deadline", timeout=60)
        assert container_state(s.sandbox_id) in ("exited", "stopped")
        resumed = Sandbox.connect(s.sandbox_id, timeout=60)
        assert resumed.files.read("/home/user/f.txt") == "on disk"
        assert Sandbox.get_info(s.sandbox_id).state == SandboxState.RUNNING
    finally:
        Sandbox.kill(s.sandbox_id)


def test_snapshot_create_list_delete(new_sandbox):
    s = new_sandbox()
    s.files.write("/home/user/snap.txt", "snapped")
    name = f"snap-{uuid.uuid4().hex[:8]}"
    snap = s.create_snapshot(name=name)
    assert snap.names == [name]
    assert Sandbox.get_info(s.sandbox_id).state == SandboxState.RUNNING
    assert [x.snapshot_id for x in s.list_snapshots().next_items()] == [snap.snapshot_id]
    assert snap.snapshot_id in [x.snapshot_id for x in Sandbox.list_snapshots().next_items()]
    child = Sandbox.create(snap.snapshot_id, timeout=120)
    try:
        assert child.files.read("/home/user/snap.txt") == "snapped"
    finally:
        child.kill()
    assert Sandbox.delete_snapshot(snap.snapshot_id) is True
    assert Sandbox.delete_snapshot(snap.snapshot_id) is False, "a second delete: 404"
    assert s.list_snapshots().next_items() == []


def test_fork_of_three(new_sandbox):
    group = uuid.uuid4().hex[:8]
    s = new_sandbox(metadata={"fork": group})
    s.files.write("/home/user/forked.txt", "forked")
    bg = s.commands.run("sleep 4245", background=True, timeout=0)
    bg.disconnect()
    forks = s.fork(count=3, timeout=120)
    try:
        assert len(forks) == 3
        for f in forks:
            assert isinstance(f, Sandbox), f
            assert f.sandbox_id != s.sandbox_id
            assert f.files.read("/home/user/forked.txt") == "forked"
            assert Sandbox.get_info(f.sandbox_id).metadata.get("fork") == group
            assert all(p.cmd != "sleep" or "4245" not in p.args for p in f.commands.list())
        assert len({f.sandbox_id for f in forks}) == 3
    finally:
        for f in forks:
            if isinstance(f, Sandbox):
                f.kill()
