"""The package as pip sees it: every extra the README, the docs and the tools name is
one the installed metadata provides, spelled exactly as it spells it, since pips before
23.3 (the one Python 3.11's venv ships is 23.2.1) match extra names without normalising
them: ``[open_clip]`` there installs nothing, with a warning."""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

from tokenmerge.libraries import LIBRARIES, install_command

ROOT = Path(__file__).resolve().parents[1]
#: ``tokenmerge[a,b]`` or ``".[a]"``, and a bare ``[extra]`` in backticks beside them.
EXTRAS = re.compile(r"""(?:tokenmerge|["']\.)\[([A-Za-z0-9_,\- ]+)\]|`\[([A-Za-z][A-Za-z0-9_\-]*)\]`""")


def provided() -> set[str]:
    return set(metadata.metadata("tokenmerge").get_all("Provides-Extra") or [])


def documented_extras() -> set[str]:
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "pyproject.toml"]
    names = set()
    for path in texts:
        if path.exists():
            for listed, bare in EXTRAS.findall(path.read_text()):
                names.update(name.strip() for name in (listed or bare).split(","))
    return names


def test_the_metadata_provides_the_extras_of_pyproject_in_their_normalised_spelling():
    declared = re.search(r"\[project\.optional-dependencies\]\n(.*?)\n\[", (ROOT / "pyproject.toml").read_text(),
                         re.S).group(1)
    names = {line.split("=")[0].strip() for line in declared.splitlines() if "=" in line}
    if not names <= provided():
        pytest.skip("the installed metadata is older than pyproject.toml: reinstall with pip install -e .")
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name) for name in names), names


def test_every_documented_extra_is_provided_as_spelled():
    names = documented_extras()
    assert {"transformers", "open-clip", "torchvision", "all", "dev"} <= names
    assert names <= provided(), names - provided()


@pytest.mark.parametrize("name", sorted(name for name, entry in LIBRARIES.items() if entry.extra))
def test_the_install_hint_of_every_library_names_a_provided_extra(name):
    extra = LIBRARIES[name].extra
    assert extra in provided()
    assert f"[{extra}]" in install_command(extra)
