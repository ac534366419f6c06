"""The model libraries tokenmerge supports, one entry each: where its adapter lives,
the extra that installs the versions it supports, and the function the command-line
tools build its models with. Adding a library is one entry here, an adapter module
and a loader.

Nothing here imports a library: entries name modules, imported on first use.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from typing import Optional


@dataclass(frozen=True)
class Library:
    """``name`` is the top-level package its model classes come from; ``extra`` the
    tokenmerge extra that installs it (None: installed with tokenmerge), spelled as the
    package metadata spells it (lower case, ``-`` for ``_``), which is what pips
    before 23.3 match exactly; ``adapter``
    the module that defines its ``ADAPTER``; ``loader`` the ``module:function`` that
    builds one of its models by name for the tools."""

    name: str
    extra: Optional[str]
    adapter: str
    loader: str


LIBRARIES: dict[str, Library] = {
    library.name: library
    for library in (
        Library("timm", None, "tokenmerge.adapters.timm", "tokenmerge.tools.models:timm_model"),
        Library("transformers", "transformers", "tokenmerge.adapters.transformers",
                "tokenmerge.tools.models:transformers_model"),
        Library("torchvision", "torchvision", "tokenmerge.adapters.torchvision",
                "tokenmerge.tools.models:torchvision_model"),
        Library("open_clip", "open-clip", "tokenmerge.adapters.open_clip", "tokenmerge.tools.models:open_clip_model"),
    )
}


def library(name: str) -> Library:
    """The entry of library ``name``; an error naming the known ones otherwise."""
    if name not in LIBRARIES:
        raise ValueError(f"unknown library {name!r}; known: {', '.join(LIBRARIES)}")
    return LIBRARIES[name]


def install_command(extra: Optional[str] = None) -> str:
    """The pip command that installs tokenmerge ``[extra]`` the way this copy of
    tokenmerge was installed: from its folder (editable or not) when it was installed
    from a clone, from the package index otherwise."""
    suffix = f"[{extra}]" if extra else ""
    origin = _install_origin()
    if origin is None:
        return f'pip install "tokenmerge{suffix}"'
    folder, editable = origin
    return f'pip install {"-e " if editable else ""}"{folder}{suffix}"'


def _install_origin() -> Optional[tuple[str, bool]]:
    """(folder, editable) when tokenmerge was installed from a local folder, else None."""
    texts = [d.read_text("direct_url.json") for d in metadata.distributions(name="tokenmerge")]
    text = next((text for text in texts if text), None)  # (a source folder's egg-info has none)
    if text is None:
        return None
    origin = json.loads(text)
    url = origin.get("url", "")
    if not url.startswith("file://"):
        return None
    from urllib.parse import unquote, urlparse

    return unquote(urlparse(url).path), bool(origin.get("dir_info", {}).get("editable"))
