"""The package's named logger (``lynx_compile``): one INFO line per compiled graph."""

import logging

log = logging.getLogger("lynx_compile")
