"""pkvm's exception hierarchy.

Every pkvm error derives from :class:`PkvmError`; each subclass also inherits the builtin it
refines, so ``except OSError`` / ``except AssertionError`` / ``except TypeError`` code keeps
working.
"""

from __future__ import annotations

import errno as _errno
import os


class PkvmError(Exception):
    """Base class of every error pkvm raises on purpose."""


class KvmError(PkvmError, OSError):
    """An ioctl-like call failed; ``.errno`` is the errno the kernel returns.

    >>> e = KvmError(_errno.EINVAL, "flags 0x1 are not 0")
    >>> (e.errno, e.strerror)
    (22, 'flags 0x1 are not 0')
    """

    errno: int  # always set (OSError's may be None)

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(errno, message)

    def __str__(self) -> str:
        # (errno.errorcode gives the last alias defined: EDEADLOCK for 35, where the kernel's
        # name, which the docs use, is EDEADLK)
        name = "EDEADLK" if self.errno == _errno.EDEADLK else _errno.errorcode.get(self.errno, str(self.errno))
        return f"[{name}] {self.strerror} ({os.strerror(self.errno)})"


class InternalInvariantError(PkvmError, AssertionError):
    """pkvm's own logic broke an invariant (KVM_BUG_ON, or a failed ``vm.check()``)."""


class PlatformRegistrationError(PkvmError, TypeError):
    """A platform op table is missing a mandatory op or has a non-callable one."""


class ConfigError(PkvmError, ValueError):
    """A configuration that cannot run as given, found only once the run builds it: the
    workload's options ask for more of the guest's memory than ``memory`` less the image
    leaves. A user error, like a value a :class:`pkvm.experiments.Config` refuses (the
    command line exits with status 2 for it)."""


class TracePlatformError(ConfigError):
    """A replay of a trace whose ``# pkvm`` header records a VM of another platform than the
    run's (the fault error codes mean different things per platform). ``path`` is the trace,
    ``recorded`` the header's platform (perhaps one pkvm does not simulate), ``platform`` the
    run's, ``advice`` what to change, worded by the caller the user called: the replay that
    finds the mismatch cannot know how the platform was chosen, so it raises this without
    advice; :func:`pkvm.experiments.run` adds the ``Config`` field, the command line its own
    options.

    >>> str(TracePlatformError("t.txt", "tdx", "snp", "replay it with Config(platform='tdx')"))
    "t.txt: the trace is from a tdx VM, not snp (replay it with Config(platform='tdx'))"
    """

    def __init__(self, path: str, recorded: str, platform: str, advice: str = "") -> None:
        # the arguments are the args: a copy (simpy's rethrow, a pickle from a cluster
        # worker) is built from them
        super().__init__(path, recorded, platform, advice)
        self.path = path
        self.recorded = recorded
        self.platform = platform
        self.advice = advice

    def __str__(self) -> str:
        text = f"{self.path}: the trace is from a {self.recorded} VM, not {self.platform}"
        return f"{text} ({self.advice})" if self.advice else text
