"""Volumes through the official Python SDK: ``Volume.create`` / ``list`` / ``get_info`` /
``connect`` / ``destroy`` on the control plane, ``volume_mounts`` at
``Sandbox.create``, and the volume content API (``E2B_VOLUME_API_URL``, the volume's
bearer token). The engine is asked whether the engine volume exists
(``volume_exists``). A server SIGKILL with volumes is tested by
tests/tests/persistence.rs, which owns the server process.

Coverage (test -> behaviour)
  test_volume_shared_by_two_sandboxes_outlives_them   two sandboxes mount one volume
                                                      (by Volume and by name) and see
                                                      each other's writes; the files
                                                      outlive both; a mounted volume
                                                      refuses destroy (409); destroy
                                                      after the kills frees the engine
                                                      volume
  test_content_api                                    write_file (parents made, uid/gid/
                                                      mode), read_file text/bytes,
                                                      list depth, get_info, exists,
                                                      make_dir, update_metadata, remove;
                                                      writes reach a mounted sandbox and
                                                      its default user may change them
  test_content_api_refuses_other_tokens_and_escapes   a wrong token is refused, a path
                                                      cannot leave the volume, a symlink
                                                      out of it is not followed
  test_names_and_mounts_are_checked                   duplicate names (409), bad names,
                                                      unknown volumes and system mount
                                                      paths (400)
  test_readme_volume_example_runs_verbatim            the README's volume example
"""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
from e2b import Sandbox, Volume

from conftest import readme_python_blocks, require_e2b_environment


def engine_cli():
    engine = os.environ.get("COLIMA_E2B_TEST_BACKEND")
    if not engine:
        pytest.fail("COLIMA_E2B_TEST_BACKEND is not set (deploy/e2b-tests.sh sets it)")
    cli = [engine]
    if engine == "podman":
        cli += ["--remote", "--url", "unix:///run/podman/podman.sock"]
    return cli


def volume_exists(volume_id: str) -> bool:
    out = subprocess.run(
        engine_cli() + ["volume", "inspect", f"colima-e2b-vol-{volume_id}"],
        capture_output=True,
        text=True,
    )
    return out.returncode == 0


@pytest.fixture
def new_volume(request):
    """Factory: ``new_volume()`` -> a fresh ``Volume``, destroyed at the end of the test."""
    require_e2b_environment()

    def make():
        vol = Volume.create(f"test-{uuid.uuid4().hex[:12]}")

        def destroy():
            try:
                Volume.destroy(vol.volume_id)
            except Exception:
                pass

        request.addfinalizer(destroy)
        return vol

    return make


def test_volume_shared_by_two_sandboxes_outlives_them(new_volume, new_sandbox):
    vol = new_volume()
    assert vol.volume_id and vol.token
    assert volume_exists(vol.volume_id)
    listed = {v.volume_id: v.name for v in Volume.list()}
    assert listed.get(vol.volume_id) == vol.name
    info = Volume.get_info(vol.volume_id)
    assert (info.name, info.token) == (vol.name, vol.token)

    a = new_sandbox(volume_mounts={"/mnt/data": vol})
    b = new_sandbox(volume_mounts={"/home/user/shared": vol.name})
    assert a.get_info().volume_mounts == [{"name": vol.name, "path": "/mnt/data"}]
    # The sandbox's default user writes at the top of a new volume.
    a.commands.run("echo from-a > /mnt/data/a.txt && mkdir -p /mnt/data/dir")
    assert b.commands.run("cat /home/user/shared/a.txt").stdout == "from-a\n"
    b.commands.run("echo from-b > /home/user/shared/dir/b.txt")
    assert a.commands.run("cat /mnt/data/dir/b.txt").stdout == "from-b\n"

    # Mounted: the volume cannot go.
    with pytest.raises(Exception) as refused:
        Volume.destroy(vol.volume_id)
    assert "409" in str(refused.value) or "mounted" in str(refused.value)

    a.kill()
    b.kill()
    c = new_sandbox(volume_mounts={"/data": vol})
    assert c.commands.run("cat /data/a.txt /data/dir/b.txt").stdout == "from-a\nfrom-b\n"
    c.kill()
    assert Volume.connect(vol.volume_id).read_file("dir/b.txt") == "from-b\n"

    assert Volume.destroy(vol.volume_id) is True
    assert not volume_exists(vol.volume_id)
    assert vol.volume_id not in {v.volume_id for v in Volume.list()}
    assert Volume.destroy(vol.volume_id) is False


def test_content_api(new_volume, new_sandbox):
    vol = new_volume()
    written = vol.write_file("deep/er/file.txt", "hello volume")
    assert (written.name, written.path, written.size) == ("file.txt", "/deep/er/file.txt", 12)
    # What the content API makes belongs to the sandboxes' default user (uid 1000).
    assert (written.uid, written.gid) == (1000, 1000)
    assert vol.read_file("deep/er/file.txt") == "hello volume"
    assert vol.read_file("/deep/er/file.txt", format="bytes") == b"hello volume"

    blob = bytes(range(256)) * 4096
    vol.write_file("bin/blob", blob, uid=0, gid=0, mode=0o600)
    stat = vol.get_info("bin/blob")
    assert (stat.size, stat.uid, stat.gid, stat.mode & 0o777) == (len(blob), 0, 0, 0o600)
    assert vol.read_file("bin/blob", format="bytes") == blob

    made = vol.make_dir("a/b/c", force=True)
    assert made.type.value == "directory" and made.path == "/a/b/c"
    assert vol.exists("a/b") and not vol.exists("nope")
    top = {e.path: e.type.value for e in vol.list("/")}
    assert top == {"/a": "directory", "/bin": "directory", "/deep": "directory"}
    deep = [e.path for e in vol.list("/", depth=3)]
    assert "/deep/er/file.txt" in deep and "/a/b/c" in deep and "/bin/blob" in deep

    changed = vol.update_metadata("deep/er/file.txt", mode=0o640)
    assert changed.mode & 0o777 == 0o640

    # The content API and a mounted sandbox see the same files, both ways.
    s = new_sandbox(volume_mounts={"/mnt/v": vol})
    assert s.commands.run("cat /mnt/v/deep/er/file.txt").stdout == "hello volume"
    s.commands.run("echo more >> /mnt/v/deep/er/file.txt")  # as the default user
    assert vol.read_file("deep/er/file.txt") == "hello volumemore\n"
    s.commands.run("echo x > /mnt/v/from-sandbox")
    assert vol.read_file("from-sandbox") == "x\n"

    vol.remove("a")
    assert not vol.exists("a/b/c")
    assert s.commands.run("test -e /mnt/v/a || echo gone").stdout == "gone\n"
    with pytest.raises(Exception):
        vol.read_file("a/b/c/missing")


def test_content_api_refuses_other_tokens_and_escapes(new_volume, new_sandbox):
    vol = new_volume()
    other = new_volume()
    vol.write_file("mine.txt", "secret")
    # The other volume's token does not open this one.
    stranger = Volume(vol.volume_id, vol.name, token=other.token)
    with pytest.raises(Exception) as refused:
        stranger.read_file("mine.txt")
    assert "401" in str(refused.value) or "token" in str(refused.value).lower()

    # `..` never climbs above the volume's root.
    vol.write_file("../../../../escaped.txt", "inside")
    assert vol.read_file("escaped.txt") == "inside"
    # A symlink a sandbox plants pointing out of the volume is not followed.
    s = new_sandbox(volume_mounts={"/mnt/v": vol})
    s.commands.run("ln -s /etc /mnt/v/etc-link && ln -s /etc/hostname /mnt/v/host-link")
    for path in ("etc-link/passwd", "host-link"):
        with pytest.raises(Exception):
            vol.read_file(path)
    with pytest.raises(Exception):
        vol.write_file("etc-link/planted", "x")
    link = vol.get_info("host-link")
    assert link.type.value == "symlink" and link.target == "/etc/hostname"


def test_names_and_mounts_are_checked(new_volume, new_sandbox):
    vol = new_volume()
    with pytest.raises(Exception) as taken:
        Volume.create(vol.name)
    assert "409" in str(taken.value) or "exists" in str(taken.value)
    for bad in ("", "a/b", "has space"):
        with pytest.raises(Exception):
            Volume.create(bad)
    with pytest.raises(Exception) as unknown:
        new_sandbox(volume_mounts={"/mnt/x": f"no-such-{uuid.uuid4().hex[:8]}"})
    assert "no volume" in str(unknown.value)
    for path in ("relative", "/proc/x", "/etc"):
        with pytest.raises(Exception):
            new_sandbox(volume_mounts={path: vol})


def readme_volume_example() -> str:
    """The README's Python volume example (E2B SDKs section), as written there."""
    found = readme_python_blocks("E2B SDKs", "Volume.create(")
    assert len(found) == 1, f"one README example creates a volume: {found}"
    return found[0]


def test_readme_volume_example_runs_verbatim(capsys):
    require_e2b_environment()
    code = readme_volume_example()
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    finally:
        # The example's name is fixed in the README: never leave it behind.
        for v in Volume.list():
            if v.name == "readme-datasets":
                Volume.destroy(v.volume_id)
    assert capsys.readouterr().out == "42\n\n42\n\n"
