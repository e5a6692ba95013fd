"""Support for drivers written by users in Python: the ``nbdkit`` module plugins import
(``nbdkit.py``) and loading a script (``loader.py``)."""
