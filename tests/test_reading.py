"""Reading the files a user names: one check and one kind of error for every reader."""
import pytest

from tokenmerge.reading import MissingFile, check_file, read_text


def test_a_missing_file_is_a_value_error_and_a_file_not_found_error(tmp_path):
    with pytest.raises(MissingFile, match="class map .*missing.txt does not exist; give one") as error:
        read_text(tmp_path / "missing.txt", "class map", "give one")
    assert isinstance(error.value, ValueError) and isinstance(error.value, FileNotFoundError)


def test_a_folder_is_not_a_file(tmp_path):
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path} is a folder; give a file"):
        check_file(tmp_path, "checkpoint", "give a file")


def test_text_that_is_not_utf8_says_where(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes(b"cat\n\xff")
    with pytest.raises(ValueError, match="classes.txt is not UTF-8 text \\(invalid start byte at byte 4\\); fix it"):
        read_text(path, "class map", "fix it")


def test_a_file_larger_than_the_limit_is_refused_unread(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("x" * 11)
    assert read_text(path, "class map", "", limit=11) == "x" * 11
    with pytest.raises(ValueError, match="big.txt is larger than"):
        read_text(path, "class map", "", limit=10)
