"""Imported only by the merge fork server (as a preload): it dies when the DPM server dies.

Never import this module anywhere else: importing it sets the death signal of the importing
process. `merge_runner` starts the fork server from the server's main thread; see there.
"""

from __future__ import annotations

import os

from servers.dpm.merge_runner import die_with_parent

die_with_parent()
if os.getppid() == 1:  # the server died before the guard was in place
    os._exit(1)
