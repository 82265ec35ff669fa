"""The comparison problems under their former name: they now live in :mod:`mtlzoo.harness.problems`.

Kept so that ``from mtlzoo.problems import Metric, Problem`` (a plugin's problem) keeps working;
new code imports from :mod:`mtlzoo.harness.problems`.
"""

from mtlzoo.harness.problems import *  # noqa: F403
from mtlzoo.harness.problems import __all__  # noqa: F401
