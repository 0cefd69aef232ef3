"""Imported only by the merge fork server (as a preload): it dies when the DPM server dies.

Never import this module anywhere else: importing it sets the death signal of the importing
process. `merge_runner` starts the fork server from the server's main thread; see there.
"""

from __future__ import annotations

import os

from servers.dpm.merge_runner import SERVER_PID_VARIABLE, die_with_parent

die_with_parent()
# The server may have died before the guard was in place: then the parent is already another.
if os.environ.get(SERVER_PID_VARIABLE) != str(os.getppid()):
    os._exit(1)

FORKSERVER_PID = os.getpid()
"""Forked merge processes inherit this: their parent must still be this process."""
