"""Predictable paths (the handoff pool, the G3 pool dir, the state dir) are used only when ours.

Real directories and files; "another user" is uid 65534 (nobody), made with chown (the suite runs
as root, which could otherwise write anywhere). docs/security.md, "Shared paths".
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dynkv.kvbm.disk import DiskPool
from dynkv.kvbm.errors import KvbmConfigError
from dynkv.kvbm.handoff import HandoffPool
from dynkv.private_deployment import dynkv_cli, without_settings
from dynkv.settings.errors import SettingsError
from dynkv.supervisor.state import DeploymentState, StateStore, UnsafeStateDir
from dynkv.supervisor.teardown import _remove_inside

NOBODY = 65534
STRIDE = 4096

needs_chown = pytest.mark.skipif(os.getuid() != 0, reason="making another user's file needs root")


@pytest.fixture
def shm() -> Iterator[Path]:
    """A scratch dir in /dev/shm (the handoff pool's home, world-writable and sticky)."""
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="dynkv-test-paths-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _handoff(directory: Path) -> None:
    HandoffPool(directory, STRIDE, slots=2).close()


def _disk(directory: Path) -> None:
    DiskPool(directory, slots=2, stride=STRIDE, o_direct=False, zerofill_fallback=True).close()


def _state(directory: Path) -> None:
    store = StateStore(directory)
    with store.lock():
        store.write(DeploymentState(name=directory.name, instance="i", infra="native"))


# (open the path as its owner would, the error it must raise, the pool file inside the dir)
KINDS: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "handoff": (_handoff, KvbmConfigError, "handoff.bin"),
    "disk": (_disk, KvbmConfigError, "blocks.bin"),
    "state": (_state, UnsafeStateDir, "state.json"),
}


@pytest.fixture(params=sorted(KINDS))
def kind(request):
    return KINDS[request.param]


@needs_chown
def test_a_directory_another_user_made_first_is_refused(kind, shm):
    open_it, error, pool_file = kind
    target = shm / "dynkv-victim"
    target.mkdir(mode=0o700)
    os.chown(target, NOBODY, NOBODY)
    with pytest.raises(error) as info:
        open_it(target)
    assert str(target) in info.value.cause
    assert "65534" in info.value.cause
    assert "remove it" in info.value.fix
    assert not (target / pool_file).exists()  # nothing written into the other user's dir
    assert os.stat(target).st_uid == NOBODY


def test_a_directory_others_can_write_is_refused(kind, shm):
    open_it, error, pool_file = kind
    target = shm / "dynkv-open"
    target.mkdir()
    os.chmod(target, 0o777)
    with pytest.raises(error, match="writable by other users") as info:
        open_it(target)
    assert str(target) in info.value.cause
    assert not (target / pool_file).exists()
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o777  # not "fixed" behind the user's back


def test_a_symlinked_directory_is_refused(kind, shm):
    open_it, error, pool_file = kind
    real = shm / "elsewhere"
    real.mkdir(mode=0o700)
    link = shm / "dynkv-link"
    link.symlink_to(real)
    with pytest.raises(error, match="symbolic link"):
        open_it(link)
    assert not (real / pool_file).exists()


def test_a_symlink_planted_where_the_pool_file_goes_is_refused(kind, shm):
    open_it, error, pool_file = kind
    target = shm / "dynkv-planted"
    target.mkdir(mode=0o700)
    victim = shm / "victim.txt"
    victim.write_bytes(b"precious")
    (target / pool_file).symlink_to(victim)
    with pytest.raises(error, match="symbolic link") as info:
        open_it(target)
    assert pool_file in info.value.cause
    assert victim.read_bytes() == b"precious"
    assert (target / pool_file).is_symlink()


@needs_chown
def test_a_pool_file_another_user_owns_is_refused(kind, shm):
    open_it, error, pool_file = kind
    target = shm / "dynkv-theirs"
    target.mkdir(mode=0o700)
    (target / pool_file).write_bytes(b"theirs")
    os.chown(target / pool_file, NOBODY, NOBODY)
    with pytest.raises(error, match="owned by"):
        open_it(target)
    assert (target / pool_file).read_bytes() == b"theirs"


def test_the_owner_reuses_its_own_directory(kind, shm):
    open_it, _error, pool_file = kind
    target = shm / "dynkv-mine"
    open_it(target)
    open_it(target)  # second start: same dir, same pool file
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(target / pool_file).st_mode) == 0o600


def test_a_decode_worker_does_not_attach_to_a_planted_pool(shm):
    target = shm / "dynkv-attach"
    target.mkdir(mode=0o700)
    victim = shm / "their-pool"
    victim.write_bytes(bytes(2 * (STRIDE + 32)))
    (target / "handoff.bin").symlink_to(victim)
    with pytest.raises(KvbmConfigError, match="symbolic link"):
        HandoffPool(target, STRIDE)  # consumer: attaches, creates nothing


def test_a_state_file_planted_as_a_symlink_is_not_read(shm):
    store = StateStore(shm / "dynkv-read")
    store.ensure()
    victim = shm / "their.json"
    victim.write_text('{"name": "x", "instance": "i", "infra": "native"}')
    store.path.symlink_to(victim)
    with pytest.raises(UnsafeStateDir, match="symbolic link"):
        store.read()


def test_an_unsafe_state_dir_is_a_cause_and_fix_error():
    assert issubclass(UnsafeStateDir, SettingsError)  # the CLI prints cause + fix, exit 2


@needs_chown
def test_status_names_the_owner_of_a_foreign_state_dir(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    (state_dir / "x").mkdir(mode=0o700)
    os.chown(state_dir / "x", NOBODY, NOBODY)
    env = without_settings(os.environ) | {"DYNKV_STATE_DIR": str(state_dir)}
    proc = dynkv_cli("status", "--name", "x", env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = " ".join((proc.stdout + proc.stderr).split())
    assert "65534" in text
    assert "DYNKV_STATE_DIR" in text
    assert "Traceback" not in text


@needs_chown
def test_teardown_leaves_another_users_shm_pool_alone(tmp_path):
    pool = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="dynkv-test-foreign-"))
    try:
        (pool / "handoff.bin").write_bytes(b"theirs")
        os.chown(pool, NOBODY, NOBODY)
        _remove_inside(pool, tmp_path)
        assert (pool / "handoff.bin").read_bytes() == b"theirs"
        os.chown(pool, os.getuid(), os.getgid())
        _remove_inside(pool, tmp_path)  # ours: removed as before
        assert not pool.exists()
    finally:
        shutil.rmtree(pool, ignore_errors=True)


@needs_chown
def test_a_g3_pool_inside_another_users_directory_is_refused(shm):
    """DYN_KVBM_DISK_CACHE_DIR=/tmp/dynkv-g3 made first by someone else: each worker's pool dir
    below it could be swapped by them after our check, so it is refused too."""
    theirs = shm / "dynkv-g3"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(KvbmConfigError, match="owned by") as info:
        _disk(theirs / "default-agg")
    assert str(theirs) in info.value.cause
    assert not (theirs / "default-agg").exists()


def test_a_pool_dir_inside_a_non_sticky_open_directory_is_refused(shm):
    open_parent = shm / "open"
    open_parent.mkdir()
    os.chmod(open_parent, 0o777)
    with pytest.raises(KvbmConfigError, match="writable by other users"):
        _handoff(open_parent / "dynkv-x")


def test_the_handoff_pool_directly_in_dev_shm_is_fine():
    """/dev/shm is world-writable but sticky: nobody can rename our dynkv-<name> there."""
    path = Path(tempfile.mktemp(dir="/dev/shm", prefix="dynkv-test-direct-"))
    try:
        _handoff(path)
        _handoff(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    finally:
        shutil.rmtree(path, ignore_errors=True)
