"""envd parity of the filesystem, through the official E2B Python SDK (PyPI ``e2b``).

What real envd does and the SDKs (and their users) rely on, one test per behaviour:

  test_list_depth_2_is_a_lexical_depth_first_walk    files.list(depth=2) order
  test_symlink_reports_target_type_and_resolved_path files.get_info / list on symlinks
  test_expired_signed_url_says_signature_is_already_expired   upload/download_url + httpx
  test_write_creates_root_only_parents_owned_by_the_user      files.write("/0/x")
  test_early_error_on_a_20_mib_upload_is_the_agents_answer    files.write, big bodies
  test_metadata_round_trip_and_replace_on_overwrite  files.write(metadata=), get_info,
                                                      list, watch_dir(include_entry=True)
  test_sandbox_reports_envd_0_6_4                     get_info().envd_version

Only the SDK's public API is used, plus httpx where a user would use it (signed URLs).
Features a pinned SDK lacks (metadata, include_entry, is_symlink) are feature-detected
(inspect.signature, the protobuf's fields) and skipped with the reason; where the older
SDK shows the same wire answer differently (a symlink's type), the test asserts what
that SDK shows.

One sandbox serves the whole module (the tests use distinct paths); it carries the
parity suites' tag (conftest.PARITY_TAG) and is killed at the end of the module.
"""

import inspect
import io
import time
import uuid

import httpx
import pytest
from packaging.version import Version

from conftest import PARITY_TAG, PARITY_TEMPLATE, require_e2b_environment

HOME = "/home/user"


@pytest.fixture(scope="module")
def sbx():
    """One sandbox for the module (``new_sandbox`` is per test), killed at its end."""
    require_e2b_environment()
    from e2b import Sandbox

    sandbox = Sandbox.create(PARITY_TEMPLATE, timeout=600, metadata={"suite": PARITY_TAG})
    try:
        yield sandbox
    finally:
        try:
            Sandbox.kill(sandbox.sandbox_id)
        except Exception:
            pass


@pytest.fixture
def tmpdir_in_sandbox(sbx):
    """A fresh directory under the user's home, for one test."""
    path = f"{HOME}/parity-{uuid.uuid4().hex[:8]}"
    sbx.files.make_dir(path)
    return path


def _has_kwarg(fn, name):
    return name in inspect.signature(fn).parameters


def _sdk_reads_is_symlink():
    """True when the SDK's protobuf has EntryInfo.is_symlink (it then shows links as
    SYMLINK); older SDKs show the target's type that envd sends."""
    from e2b.envd.filesystem import filesystem_pb

    return "is_symlink" in getattr(filesystem_pb.EntryInfo, "__slots__", ())


def test_list_depth_2_is_a_lexical_depth_first_walk(sbx, tmpdir_in_sandbox):
    d = tmpdir_in_sandbox
    # Made in reverse order, so neither creation order nor inode order is lexical.
    for sub in ("b/b1", "a/a1"):
        sbx.files.make_dir(f"{d}/{sub}")
    entries = sbx.files.list(d, depth=2)
    assert [e.path[len(d) + 1 :] for e in entries] == ["a", "a/a1", "b", "b/b1"]
    assert [e.name for e in entries] == ["a", "a1", "b", "b1"]


def test_symlink_reports_target_type_and_resolved_path(sbx, tmpdir_in_sandbox):
    from e2b import FileType

    d = tmpdir_in_sandbox
    sbx.files.write(f"{d}/real/file.txt", "content")
    # A relative link, a chain, a link to a directory and a broken one.
    sbx.commands.run(
        f"cd {d} && ln -s real/file.txt to_file && ln -s to_file to_chain"
        " && ln -s real to_dir && ln -s missing broken"
    )
    newer = _sdk_reads_is_symlink()
    for name, target, target_type in (
        ("to_file", f"{d}/real/file.txt", FileType.FILE),
        ("to_chain", f"{d}/real/file.txt", FileType.FILE),
        ("to_dir", f"{d}/real", FileType.DIR),
    ):
        info = sbx.files.get_info(f"{d}/{name}")
        assert info.symlink_target == target, name
        # Newer SDKs mark the link itself (isSymlink); older ones show the target's type.
        assert info.type == (FileType.SYMLINK if newer else target_type), name
        assert info.permissions.startswith("l"), info.permissions
    broken = sbx.files.get_info(f"{d}/broken")
    assert broken.symlink_target is None
    assert broken.type == (FileType.SYMLINK if newer else None)
    # ListDir describes them the same way.
    listed = {e.name: e for e in sbx.files.list(d)}
    assert listed["to_dir"].symlink_target == f"{d}/real"
    assert listed["to_dir"].type == (FileType.SYMLINK if newer else FileType.DIR)
    assert listed["real"].type == FileType.DIR and listed["real"].symlink_target is None


def test_expired_signed_url_says_signature_is_already_expired(sbx, tmpdir_in_sandbox):
    path = f"{tmpdir_in_sandbox}/signed.txt"
    sbx.files.write(path, "original")
    download = sbx.download_url(path, use_signature_expiration=1)
    upload = sbx.upload_url(path, use_signature_expiration=1)
    # The URL carries an expiration one second ahead, in whole seconds.
    time.sleep(2.5)
    r = httpx.get(download, timeout=30)
    assert r.status_code == 401
    assert r.json() == {"code": 401, "message": "signature is already expired"}
    r = httpx.post(upload, files={"file": ("signed.txt", b"changed")}, timeout=30)
    assert r.status_code == 401
    assert r.json()["message"] == "signature is already expired"
    assert sbx.files.read(path) == "original"


def test_write_creates_root_only_parents_owned_by_the_user(sbx):
    # Only root may create /0; envd makes it and hands it to the writing user.
    info = sbx.files.write("/0/x", "written by user", user="user")
    assert info.path == "/0/x"
    assert sbx.files.read("/0/x") == "written by user"
    deep = sbx.files.write("/0/deeper/still/y", "y", user="user")
    assert deep.path == "/0/deeper/still/y"
    owners = sbx.commands.run(
        "stat -c '%U:%G %n' / /0 /0/x /0/deeper /0/deeper/still /0/deeper/still/y",
        user="root",
    ).stdout.splitlines()
    assert owners == [
        "root:root /",
        "user:user /0",
        "user:user /0/x",
        "user:user /0/deeper",
        "user:user /0/deeper/still",
        "user:user /0/deeper/still/y",
    ]


def test_early_error_on_a_20_mib_upload_is_the_agents_answer(sbx):
    from e2b import AuthenticationException, FileNotFoundException

    big = b"x" * (20 << 20)
    # The writer fails before reading the body (multipart, as bytes are sent).
    with pytest.raises(FileNotFoundException) as e:
        sbx.files.write("/proc/nope/x", big)
    assert "/proc/nope" in str(e.value) and "Broken pipe" not in str(e.value)
    # The same as a raw octet-stream upload.
    if _has_kwarg(sbx.files.write, "use_octet_stream"):
        with pytest.raises(FileNotFoundException) as e:
            sbx.files.write("/proc/nope/x", io.BytesIO(big), use_octet_stream=True)
        assert "/proc/nope" in str(e.value)
    # Refused before the upload starts at all: a user the sandbox does not have.
    with pytest.raises(AuthenticationException) as e:
        sbx.files.write(f"{HOME}/never.bin", big, user="no-such-user")
    assert "no-such-user" in str(e.value) and "Broken pipe" not in str(e.value)
    assert not sbx.files.exists(f"{HOME}/never.bin")


def test_metadata_round_trip_and_replace_on_overwrite(sbx, tmpdir_in_sandbox):
    if not _has_kwarg(sbx.files.write, "metadata"):
        pytest.skip("this SDK has no files.write(metadata=) (envd 0.6.2 file metadata)")
    d = tmpdir_in_sandbox
    path = f"{d}/md.txt"
    watch = None
    if _has_kwarg(sbx.files.watch_dir, "include_entry"):
        watch = sbx.files.watch_dir(d, include_entry=True)
    try:
        info = sbx.files.write(path, "one", metadata={"Author": "mish", "purpose": "up load"})
        want = {"author": "mish", "purpose": "up load"}  # keys are lowercased
        assert info.metadata == want
        assert sbx.files.get_info(path).metadata == want
        assert {e.name: e.metadata for e in sbx.files.list(d)}["md.txt"] == want
        # Stored where envd keeps it: user.e2b.* extended attributes.
        attrs = sbx.commands.run(
            f"python3 -c \"import os; print(sorted(os.listxattr('{path}')))\""
        ).stdout.strip()
        assert attrs == "['user.e2b.author', 'user.e2b.purpose']"
        if watch is not None:
            events = []
            deadline = time.time() + 20
            while time.time() < deadline:
                events += watch.get_new_events()
                with_entry = [ev for ev in events if ev.name == "md.txt" and ev.entry]
                if with_entry:
                    break
                time.sleep(0.2)
            assert with_entry, events
            assert with_entry[0].entry.path == path
            assert with_entry[0].entry.metadata == want
        # An overwrite replaces the whole set...
        info = sbx.files.write(path, "two", metadata={"author": "alice"})
        assert info.metadata == {"author": "alice"}
        assert sbx.files.get_info(path).metadata == {"author": "alice"}
        # ...also when it carries none.
        info = sbx.files.write(path, "three")
        assert info.metadata is None
        assert sbx.files.get_info(path).metadata is None
        assert sbx.files.read(path) == "three"
    finally:
        if watch is not None:
            watch.stop()
    if watch is None:
        pytest.skip("this SDK has no watch_dir(include_entry=) (envd 0.6.3): rest checked")


def test_sandbox_reports_envd_0_6_4(sbx):
    info = sbx.get_info()
    assert Version(info.envd_version) >= Version("0.6.4"), info.envd_version
