"""Built-in passes. Importing this package registers them."""

from effc.passes.cleanup import Cleanup
from effc.passes.fuse import Fuse

__all__ = ["Cleanup", "Fuse"]
