"""Which errors are the user's (one line) and which are bugs (a traceback), and how an OS error
on a path the user gave names its flag. The commands' own cases are in tests/test_cli.py."""

import errno
import json

import pytest

from nemo_tst.errors import MissingExtra, PathError, RunFailed, is_user_error, user_paths


def _raised(make):
    try:
        make()
    except Exception as err:
        return err
    raise AssertionError("nothing raised")


def test_our_refusals_are_the_users_and_a_bug_is_not():
    from nemo_tst.core.settings import TSTSettings

    assert is_user_error(_raised(lambda: TSTSettings(bag_size=0)))  # nemo-tst's own check
    assert is_user_error(RunFailed("phase 1 crashed"))
    assert is_user_error(MissingExtra("pip install 'nemo-tst[hf]'"))
    assert not is_user_error(_raised(lambda: json.loads("{")))  # a library's ValueError
    assert not is_user_error(RuntimeError("an internal invariant broke"))
    assert not is_user_error(KeyError("x"))


def test_a_full_disk_names_the_one_path_given(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(PathError) as caught:
        with user_paths({"--out": out}):
            raise OSError(errno.ENOSPC, "No space left on device")  # write() names no file
    assert str(caught.value) == f"--out {out}: No space left on device"
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)


def test_the_closest_flag_is_named_and_an_unrelated_error_passes(tmp_path):
    save, log = tmp_path / "run", tmp_path / "run" / "train.log"
    denied = PermissionError(errno.EACCES, "Permission denied", str(log))
    with pytest.raises(PathError, match=f"^--log-file {log}: Permission denied$"):
        with user_paths({"--save": save, "--log-file": log}):
            raise denied
    elsewhere = FileNotFoundError(errno.ENOENT, "No such file or directory", "/elsewhere/x")
    with pytest.raises(FileNotFoundError) as caught:
        with user_paths({"--save": save, "--log-file": log}):
            raise elsewhere
    assert caught.value is elsewhere
    with pytest.raises(PathError, match="--output-prefix .*corpus: Permission denied: .*corpus_train.bin"):
        with user_paths({"--output-prefix": tmp_path / "corpus", "--input": [tmp_path / "docs"]}):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "corpus_train.bin"))
