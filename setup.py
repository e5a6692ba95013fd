# The cffi extension (libvhost-user + our C glue) is declared here: setuptools' pyproject
# metadata has no field for cffi_modules.
from setuptools import setup

setup(cffi_modules=["vhost/_build.py:make_ffi"])
