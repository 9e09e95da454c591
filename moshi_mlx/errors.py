"""The one error type meant for users.

Every problem a user can fix (a wrong checkpoint, a bad config value, an unknown repo id, a
WAV file that cannot be read, a sound device that is missing) raises ``MoshiError`` or a
subclass, with a one-line message naming the problem and the fix. The command line prints
those as one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MoshiError(ValueError):
    """A problem with the input, the configuration or the environment, not with the code."""


class MoshiWarning(UserWarning):
    """Something the user should know that does not stop the work (e.g. checkpoint parts that
    are ignored); the command line prints each as one line."""
