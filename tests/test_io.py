"""gatekeeper._io: atomic files and folders, with the mode a plain open() would give."""

from __future__ import annotations

import os
import stat

import pytest

from gatekeeper._io import atomic_folder, atomic_write_text


def test_files_get_the_umask_mode_not_the_temp_files_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "r.json").symlink_to(victim)
    atomic_write_text(tmp_path / "r.json", "new")
    assert victim.read_text() == "keep" and not (tmp_path / "r.json").is_symlink()


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    dst = tmp_path / "model"
    with atomic_folder(dst) as tmp:
        (tmp / "a").write_text("1")
    assert (dst / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_folder(dst) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("half-way")
    assert sorted(p.name for p in dst.iterdir()) == ["a"]  # the old folder survives a failed rewrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folder left
