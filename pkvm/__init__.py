"""pkvm: a fast, faithful simulator of Linux KVM shared/private guest-memory conversion.

See ``README.md`` and ``docs/``. Users import ``pkvm``; ``pkvm._core`` is the private typed core.
"""

from pkvm._core import RangeMap

__version__ = "0.1.0"

__all__ = ["RangeMap", "__version__"]
