"""The disk-tier checks, run for real: a ramfs refuses fallocate(2) and O_DIRECT, /dev/shm (tmpfs)
and the tmp dir accept both; the fallback variables turn each failure into a note."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from doctor_support import base_env, run

from dynkv.doctor import Status

pytestmark = [pytest.mark.integration, pytest.mark.needs_root]


def test_ramfs_refuses_fallocate_and_o_direct_with_the_variable_to_set(tmp_path, ramfs):
    res = run(base_env(tmp_path, DYN_KVBM_DISK_CACHE_DIR=str(ramfs / "g3")))
    assert res["disk.dir"].status is Status.OK
    falloc, direct = res["disk.fallocate"], res["disk.o_direct"]
    assert (
        falloc.status is Status.FAIL and "EOPNOTSUPP" in falloc.detail and "ramfs" in falloc.detail
    )
    assert falloc.fix.startswith("export DYN_KVBM_DISK_ZEROFILL_FALLBACK=true")
    assert direct.status is Status.FAIL and "EINVAL" in direct.detail
    assert direct.fix.startswith("export DYN_KVBM_DISK_DISABLE_O_DIRECT=true")
    assert res["disk.space"].status is Status.WARN  # ramfs has no size: it is RAM
    assert os.listdir(ramfs / "g3") == []  # the probes clean up after themselves


def test_ramfs_with_the_fallbacks_set_passes_with_a_note(tmp_path, ramfs):
    env = base_env(
        tmp_path,
        DYN_KVBM_DISK_CACHE_DIR=str(ramfs),
        DYN_KVBM_DISK_ZEROFILL_FALLBACK="true",
        DYN_KVBM_DISK_DISABLE_O_DIRECT="1",
    )
    res = run(env)
    assert res["disk.fallocate"].status is Status.OK
    assert "fallback in use: DYN_KVBM_DISK_ZEROFILL_FALLBACK=true" in res["disk.fallocate"].detail
    assert res["disk.o_direct"].status is Status.OK
    assert "fallback in use: DYN_KVBM_DISK_DISABLE_O_DIRECT=true" in res["disk.o_direct"].detail


def test_fallback_variable_set_to_false_means_false(tmp_path, ramfs):
    env = base_env(
        tmp_path, DYN_KVBM_DISK_CACHE_DIR=str(ramfs), DYN_KVBM_DISK_ZEROFILL_FALLBACK="false"
    )
    assert run(env)["disk.fallocate"].status is Status.FAIL


def test_tmpfs_accepts_both(tmp_path):
    target = "/dev/shm/dynkv-doctor-test-" + str(os.getpid())
    try:
        res = run(base_env(tmp_path, DYN_KVBM_DISK_CACHE_DIR=target))
        assert res["disk.fallocate"].status is Status.OK and "tmpfs" in res["disk.fallocate"].detail
        assert res["disk.o_direct"].status is Status.OK
        assert (
            res["disk.space"].status is Status.WARN
            and "keeps G3 in RAM" in res["disk.space"].detail
        )
    finally:
        os.rmdir(target)


def test_directory_is_created_private(tmp_path):
    target = tmp_path / "deep" / "g3"
    res = run(base_env(tmp_path, DYN_KVBM_DISK_CACHE_DIR=str(target)))
    assert res["disk.dir"].status is Status.OK and "created" in res["disk.dir"].detail
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    for check in ("disk.space", "disk.fallocate", "disk.o_direct"):
        assert res[check].status is Status.OK, res[check]


def test_directory_open_to_others_warns(tmp_path):
    target = tmp_path / "g3"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    check = run(base_env(tmp_path, DYN_KVBM_DISK_CACHE_DIR=str(target)))["disk.dir"]
    assert check.status is Status.WARN and check.fix == f"chmod 700 {target}"


def test_uncreatable_directory_fails_and_skips_the_probes(tmp_path, mounted):
    readonly = mounted("tmpfs", "ro,size=1m")
    res = run(base_env(tmp_path, DYN_KVBM_DISK_CACHE_DIR=str(readonly / "g3")))
    assert (
        res["disk.dir"].status is Status.FAIL and "DYN_KVBM_DISK_CACHE_DIR" in res["disk.dir"].fix
    )
    assert not {"disk.space", "disk.fallocate", "disk.o_direct"} & set(res)


def test_a_directory_name_too_long_fails_with_its_fix_not_a_crash(tmp_path):
    # Path.is_dir raises ENAMETOOLONG on Python 3.11: the check crashed ("a dynkv bug")
    res = run(base_env(tmp_path, DYN_KVBM_DISK_CACHE_DIR=str(tmp_path / ("g" * 300))))
    check = res["disk.dir"]
    assert check.status is Status.FAIL and "too long" in check.detail, check
    assert "DYN_KVBM_DISK_CACHE_DIR" in check.fix
    assert not {"disk.space", "disk.fallocate", "disk.o_direct"} & set(res)


def test_not_enough_free_space_fails(tmp_path, mounted):
    small = mounted("tmpfs", "size=8m")
    check = run(base_env(tmp_path, DYN_KVBM_DISK_CACHE_DIR=str(small), DYN_KVBM_DISK_CACHE_GB="1"))[
        "disk.space"
    ]
    assert check.status is Status.FAIL and check.fix.startswith("export DYN_KVBM_DISK_CACHE_GB=0.")


def test_disabled_ssd_filter_warns(tmp_path):
    env = base_env(tmp_path, DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER="true")
    check = run(env)["disk.filter"]
    assert check.status is Status.WARN and check.fix == "unset DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER"
    assert run(base_env(tmp_path))["disk.filter"].status is Status.OK


def test_no_disk_tier_no_disk_checks(tmp_path):
    res = run(base_env(tmp_path, DYN_KVBM_DISK_CACHE_GB="0"), profile="gpu-cpu")
    assert not [k for k in res if k.startswith("disk.")]


def test_hf_cache_on_a_read_only_filesystem(tmp_path, mounted):
    readonly = mounted("tmpfs", "ro,size=1m")
    env = base_env(tmp_path, HF_HOME=str(readonly), DYNKV_MODEL="org/absent")
    check = run(env)["model.hf_cache"]
    assert check.status is Status.FAIL  # a Hub model needs the cache
    assert "HF_HOME" in check.fix


def test_a_directory_another_user_owns_fails_before_anything_is_written(tmp_path):
    """docs/security.md, Shared paths: the preflight refuses it, so `up` starts nothing."""
    target = tmp_path / "g3"
    target.mkdir(mode=0o755)
    os.chown(target, 65534, 65534)
    check = run(base_env(tmp_path, DYN_KVBM_DISK_CACHE_DIR=str(target)))["disk.dir"]
    assert check.status is Status.FAIL and "owned by" in check.detail and "65534" in check.detail
    assert check.fix == "export DYN_KVBM_DISK_CACHE_DIR=<a directory of your own>"
    assert os.listdir(target) == []


def test_the_disagg_handoff_pool_of_another_user_fails(tmp_path):
    name = f"t{os.getpid()}x{tmp_path.name[-6:]}".lower()
    pool = Path("/dev/shm") / f"dynkv-{name}"
    pool.mkdir(mode=0o700)
    try:
        os.chown(pool, 65534, 65534)
        env = base_env(tmp_path, DYNKV_TOPOLOGY="disagg", DYNKV_NAME=name)
        check = run(env)["memory.shm"]
        assert check.status is Status.FAIL and str(pool) in check.detail
        assert "65534" in check.detail and "--name" in check.fix
        os.chown(pool, os.getuid(), os.getgid())
        assert run(env)["memory.shm"].status is not Status.FAIL  # ours: reused
    finally:
        shutil.rmtree(pool, ignore_errors=True)
