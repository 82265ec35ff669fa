"""The comparison harness under its former name: everything here now lives in :mod:`mtlzoo.harness`.

Kept so that ``from mtlzoo.compare import compare`` (and the other names of the harness) keeps
working; new code imports from :mod:`mtlzoo.harness`.
"""

from mtlzoo.harness import *  # noqa: F403
from mtlzoo.harness import __all__  # noqa: F401
