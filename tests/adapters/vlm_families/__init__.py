"""Every family the VLM tests run: those of :mod:`tests.adapters.vlm_models`, and one
module here per further family, each defining ``FAMILIES`` (a list of
:class:`tests.adapters.vlm_models.Family`) with its tiny model builders."""
import importlib
import pkgutil

from tests.adapters.vlm_models import FAMILIES as FIRST_FAMILIES

ALL = list(FIRST_FAMILIES)
for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    ALL.extend(importlib.import_module(f"{__name__}.{_module}").FAMILIES)
