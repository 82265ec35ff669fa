"""The comparison harness under its former name, so that ``from mtlzoo.compare import compare`` (and the harness's
other names) keeps working; new code imports from :mod:`mtlzoo.harness`."""

from mtlzoo.harness import *  # noqa: F403
from mtlzoo.harness import __all__  # noqa: F401
