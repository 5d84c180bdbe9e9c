"""Files the project writes: whole or not at all, with the permissions the user's umask gives new files."""

import os
import stat

import pytest

from tcnn_fx.files import atomic_write


@pytest.fixture
def umask():
    def set_umask(value):
        previous = os.umask(value)
        restore.append(previous)

    restore = []
    yield set_umask
    for previous in reversed(restore):
        os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    with atomic_write(tmp_path / "out.json") as temporary:
        with open(temporary, "w") as handle:
            handle.write("{}")
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == mode


def test_a_replaced_file_keeps_its_mode_and_a_failed_write_leaves_nothing(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "out.json"
    target.write_text("old")
    target.chmod(0o640)
    with atomic_write(target) as temporary:
        with open(temporary, "w") as handle:
            handle.write("new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    with pytest.raises(RuntimeError), atomic_write(target) as temporary:
        with open(temporary, "w") as handle:
            handle.write("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
