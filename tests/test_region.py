"""Region: a sealed memfd nobody can resize, a file that is created exactly or adopted only if it matches,
writes that stay inside the region, and the text layout the seed's guest reads."""

from __future__ import annotations

import errno
import fcntl
import grp
import hashlib
import os
import pwd
import stat
import uuid

import pytest

from shmguard.errors import RegionError
from shmguard.policy import RegionPolicy
from shmguard.region import Region, create_file, create_memfd, text_payload

SIZE = 1 << 16
IVSHMEM_GID = grp.getgrnam("ivshmem").gr_gid
NOBODY_UID = pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def memfd_region():
    region = create_memfd(SIZE)
    yield region
    region.close()


def assert_eperm(action) -> None:
    with pytest.raises(PermissionError) as error:
        action()
    assert error.value.errno == errno.EPERM


# --- the sealed memfd ----------------------------------------------------------------------------------------


def test_the_memfd_is_sealed_against_shrinking_growing_and_new_seals(memfd_region):
    assert memfd_region.seals() == {"shrink", "grow", "seal"}
    assert memfd_region.sealed and memfd_region.backend == "memfd" and memfd_region.path is None
    assert memfd_region.state().size == SIZE


def test_nobody_can_resize_the_sealed_memfd_not_even_root(memfd_region):
    assert os.geteuid() == 0, "this test proves that root cannot resize the region: run it as root"
    proc_path = f"/proc/self/fd/{memfd_region.fd}"
    assert_eperm(lambda: os.ftruncate(memfd_region.fd, 0))
    assert_eperm(lambda: os.ftruncate(memfd_region.fd, SIZE * 2))
    assert_eperm(lambda: os.truncate(proc_path, 0))
    assert_eperm(lambda: os.open(proc_path, os.O_RDWR | os.O_TRUNC))
    assert_eperm(lambda: fcntl.fcntl(memfd_region.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE))
    assert os.fstat(memfd_region.fd).st_size == SIZE


def test_in_place_writes_still_work_on_the_sealed_memfd(memfd_region):
    memfd_region.write(100, b"through the mapping")
    fd = os.open(f"/proc/self/fd/{memfd_region.fd}", os.O_RDWR)  # the way `dd conv=notrunc` writes
    try:
        os.pwrite(fd, b"through a file", 200)
    finally:
        os.close(fd)
    assert memfd_region.read(100, 19) == b"through the mapping"
    assert memfd_region.read(200, 14) == b"through a file"


@pytest.mark.parametrize("size", [3000, 12288, 0, 2048])
def test_a_memfd_of_a_size_qemu_cannot_map_is_never_created(size):
    with pytest.raises(ValueError, match="power of two|minimum"):
        create_memfd(size)


# --- bounded writes and reads --------------------------------------------------------------------------------


@pytest.mark.parametrize("offset, length", [(-1, 1), (0, SIZE + 1), (SIZE, 1), (SIZE - 10, 11), (SIZE + 100, 0)])
def test_a_write_outside_the_region_is_refused_and_writes_nothing(memfd_region, offset, length):
    before = memfd_region.snapshot()
    with pytest.raises(RegionError, match="do not fit|must not be negative"):
        memfd_region.write(offset, b"x" * length)
    assert memfd_region.snapshot() == before


def test_writes_up_to_the_last_byte_fit(memfd_region):
    memfd_region.write(SIZE - 4, b"tail")
    memfd_region.write(0, b"x" * SIZE)
    memfd_region.write(SIZE, b"")
    assert memfd_region.read(SIZE - 4) == b"xxxx"


@pytest.mark.parametrize("offset, length", [(-1, 4), (0, -1), (SIZE - 1, 2)])
def test_a_read_outside_the_region_is_refused(memfd_region, offset, length):
    with pytest.raises(RegionError):
        memfd_region.read(offset, length)


def test_the_error_says_how_much_fits_there(memfd_region):
    with pytest.raises(RegionError, match=f"20 bytes at offset {SIZE - 10} do not fit.*at most 10 bytes fit"):
        memfd_region.write(SIZE - 10, b"y" * 20)


# --- the file backend ----------------------------------------------------------------------------------------


@pytest.fixture
def shm_path():
    path = f"/dev/shm/shmguard-test-{uuid.uuid4().hex[:8]}"
    yield path
    if os.path.isdir(path) and not os.path.islink(path):
        os.rmdir(path)
    elif os.path.lexists(path):
        os.unlink(path)


def create_standard(path: str, size: int = SIZE) -> Region:
    return create_file(path, size, 0, IVSHMEM_GID, 0o660)


def test_a_new_file_gets_the_policys_owner_group_mode_and_size(shm_path):
    region = create_file(shm_path, SIZE, NOBODY_UID, IVSHMEM_GID, 0o640)
    try:
        st = os.lstat(shm_path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        assert (st.st_uid, st.st_gid, st.st_size) == (NOBODY_UID, IVSHMEM_GID, SIZE)
        assert (region.backend, region.path, region.size) == ("file", shm_path, SIZE)
        assert not region.sealed  # a file in /dev/shm cannot be sealed: the guard repairs it instead
    finally:
        region.close()


def test_region_create_follows_the_policy(shm_path):
    policy = RegionPolicy(backend="file", path=shm_path, size=8192, owner=0, group=IVSHMEM_GID, mode=0o600)
    with_file = Region.create(policy)
    with_memfd = Region.create(RegionPolicy(backend="memfd", size=8192))
    try:
        assert (with_file.backend, os.stat(shm_path).st_size, stat.S_IMODE(os.stat(shm_path).st_mode)) == \
            ("file", 8192, 0o600)
        assert with_memfd.backend == "memfd" and with_memfd.sealed
    finally:
        with_file.close()
        with_memfd.close()


def test_an_existing_file_that_matches_is_adopted_with_its_contents(shm_path):
    create_standard(shm_path).close()
    with open(shm_path, "r+b") as f:
        f.write(b"kept across restarts")
    region = create_standard(shm_path)
    try:
        assert region.read(0, 20) == b"kept across restarts"  # adopted, never truncated
    finally:
        region.close()


def fingerprint(path: str) -> tuple:
    """Everything about a path that a refusal must leave as it was."""
    st = os.lstat(path)
    content = None
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            content = hashlib.sha256(f.read()).hexdigest()
    return st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_ino, st.st_mtime_ns, content


def existing_file(path: str, size: int = SIZE, uid: int = 0, gid: int = IVSHMEM_GID, mode: int = 0o660) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.write(fd, b"someone else's data")
    os.ftruncate(fd, size)
    os.fchown(fd, uid, gid)
    os.fchmod(fd, mode)
    os.close(fd)


MISMATCHES = {
    "wrong mode": (lambda p: existing_file(p, mode=0o666), "mode is 0666 (policy: 0660)"),
    "wrong owner": (lambda p: existing_file(p, uid=NOBODY_UID), f"owner is {NOBODY_UID} (policy: 0)"),
    "wrong group": (lambda p: existing_file(p, gid=0), f"group is 0 (policy: {IVSHMEM_GID})"),
    "wrong size": (lambda p: existing_file(p, size=4096), f"size is 4096 (policy: {SIZE})"),
    "empty": (lambda p: existing_file(p, size=0), f"size is 0 (policy: {SIZE})"),
    "a directory": (lambda p: os.mkdir(p, 0o700), "is a directory, not a regular file"),
    "a FIFO": (lambda p: os.mkfifo(p, 0o660), "is a FIFO, not a regular file"),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_an_existing_path_that_does_not_match_is_refused_and_left_untouched(shm_path, case):
    make, difference = MISMATCHES[case]
    make(shm_path)
    before = fingerprint(shm_path)
    with pytest.raises(RegionError) as error:
        create_standard(shm_path)
    assert str(error.value).startswith(f"{shm_path}: ") and difference in str(error.value)
    assert "\n" not in str(error.value)
    assert fingerprint(shm_path) == before


def test_every_difference_is_named_at_once(shm_path):
    existing_file(shm_path, size=4096, uid=NOBODY_UID, mode=0o644)
    with pytest.raises(RegionError) as error:
        create_standard(shm_path)
    for difference in (f"owner is {NOBODY_UID}", "mode is 0644", "size is 4096"):
        assert difference in str(error.value)


def test_a_symlink_is_refused_and_neither_it_nor_its_target_is_touched(shm_path, tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"must not be truncated")
    os.symlink(target, shm_path)
    before, target_before = fingerprint(shm_path), fingerprint(str(target))
    with pytest.raises(RegionError, match="symbolic link"):
        create_standard(shm_path)
    assert fingerprint(shm_path) == before and fingerprint(str(target)) == target_before


def test_a_symlink_to_a_matching_file_is_still_refused(shm_path):
    real = shm_path + "-real"
    create_standard(real).close()
    os.symlink(real, shm_path)
    try:
        with pytest.raises(RegionError, match="symbolic link"):
            create_standard(shm_path)
    finally:
        os.unlink(real)


def test_a_file_backend_region_that_was_truncated_refuses_writes_until_restored(shm_path):
    region = create_standard(shm_path)
    try:
        region.write(0, b"hello")
        snapshot = region.snapshot()
        os.truncate(shm_path, 0)  # a mapped write now would be SIGBUS: the region must refuse instead
        with pytest.raises(RegionError, match="region is 0 bytes instead of 65536"):
            region.write(0, b"x")
        assert region.read(0, 5) == b""  # pread past the end reads nothing and never faults
        region.restore(snapshot)
        assert os.stat(shm_path).st_size == SIZE and region.read(0, 5) == b"hello"
        region.write(0, b"again")
    finally:
        region.close()


# --- text messages, as the seed's guest reads them -----------------------------------------------------------


def test_a_text_message_is_followed_by_nul_padding_to_the_end_of_the_region():
    assert text_payload(b"hello", 0, 16) == b"hello" + bytes(11)
    assert text_payload(b"hi", 10, 16) == b"hi" + bytes(4)
    assert text_payload(b"", 0, 8) == bytes(8)


def test_a_message_that_leaves_no_room_for_its_nul_needs_allow_unterminated():
    with pytest.raises(RegionError, match="leaves no room for its NUL terminator.*at most 15 bytes"):
        text_payload(b"x" * 16, 0, 16)
    assert text_payload(b"x" * 16, 0, 16, allow_unterminated=True) == b"x" * 16
    assert text_payload(b"x" * 15, 0, 16) == b"x" * 15 + b"\0"


@pytest.mark.parametrize("message, offset, reason", [
    (b"x" * 17, 0, "does not fit at offset 0: the region has 16 bytes"),
    (b"abc", 14, "does not fit at offset 14"),
    (b"a", 16, "offset 16 is outside the 16-byte region"),
    (b"a", -1, "offset -1 is outside"),
])
def test_a_text_message_that_does_not_fit_is_refused(message, offset, reason):
    with pytest.raises(RegionError, match=reason):
        text_payload(message, offset, 16, allow_unterminated=True)


@pytest.mark.parametrize("size", [0, 1, 100, 4095, 4096, 4097, 65535, 65536, 65537, 200000, (1 << 18) - 1, 1 << 18,
                                  (1 << 18) + 1, 1 << 20, (4 << 20) - 4352])
def test_is_zero_finds_a_single_non_zero_byte_anywhere(size):
    """is_zero compares in pieces, the last one overlapping the one before: every byte is still looked at."""
    from shmguard.region import is_zero

    buffer = bytearray(size)
    assert is_zero(memoryview(buffer))
    for at in sorted({0, size - 1, size // 2, 4095, 4096, 65535, 65536, (1 << 18) - 1, 1 << 18} & set(range(size))):
        buffer[at] = 0x80
        assert not is_zero(memoryview(buffer)), at
        buffer[at] = 0
