"""Whether this process is held to file permissions: root (with its usual capabilities) reads and writes
anything, so a test of "permission denied" means nothing there and is skipped, saying why."""

from __future__ import annotations

import os
import tempfile


def permissions_enforced() -> bool:
    """True when a file with no permissions cannot be opened by this process (tried, not assumed from the
    user id: root without CAP_DAC_OVERRIDE is held to them too)."""
    with tempfile.TemporaryDirectory() as folder:
        probe = os.path.join(folder, "probe")
        with open(probe, "w") as f:
            f.write("x")
        os.chmod(probe, 0)
        try:
            with open(probe):
                return False
        except PermissionError:
            return True
        finally:
            os.chmod(probe, 0o600)


SKIP_REASON = "running as root (euid 0, permissions not enforced): every file is readable and every folder writable"
