"""The block drivers: one module per driver (or filter), each registering itself with
``@bdrv_register``.  Every module in this package is imported here, so adding a driver is
adding one file.  A driver whose library is missing (librbd, libnbd) imports lazily in its
``__init__`` so the others still load."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
