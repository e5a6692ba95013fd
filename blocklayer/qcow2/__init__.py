"""Helpers of the qcow2 format driver (``blocklayer/drivers/qcow2.py``): the on-disk header
(``header``), the metadata caches (``cache``), compressed-cluster decoding (``compress``) and
the small coroutine runtime the driver's request paths are written in (``co``)."""
