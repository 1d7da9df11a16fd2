"""turbos: an open implementation of Hunyuan-TurboS (arXiv 2505.15431).

A hybrid Transformer-Mamba2 Mixture-of-Experts language model with its training, post-training
and serving stack, runnable end to end on a CPU at toy scale.

Importing turbos registers its model type with transformers' Auto classes (``AutoConfig``,
``AutoModelForCausalLM``: ``turbos.interop.auto``) when transformers is installed, lazily, since
transformers takes over a second to import and turbos itself never needs it: a finder first on
``sys.meta_path`` sees every ``transformers`` module being imported, and once
``transformers.models.auto.configuration_auto`` has loaded (any use of the Auto classes loads it)
and no transformers module is half-imported, it leaves ``sys.meta_path`` and imports
``turbos.interop.auto``, whose import registers the classes. If the Auto classes were loaded
before turbos, ``import turbos`` registers at once. Without transformers the finder never fires.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (10 ms)
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType

__version__ = "0.1.0"


class _RegisterWithTransformers:
    """The ``sys.meta_path`` finder that imports ``turbos.interop.auto`` when transformers' Auto
    classes have loaded (see the module docstring)."""

    def __init__(self) -> None:
        self.importing = 0  # transformers modules being executed, nested

    def find_spec(self, fullname: str, path: object, target: ModuleType | None = None) -> ModuleSpec | None:
        """The spec the other finders give a transformers module, with a loader that reports when
        the module has run; None (not ours) for any other module."""
        if fullname.partition(".")[0] != "transformers":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            run = getattr(spec.loader, "exec_module", None)
            if run is not None:

                def exec_module(module: ModuleType, run=run) -> None:  # noqa: ANN001 (a bound method)
                    self.importing += 1
                    try:
                        run(module)
                    finally:
                        self.importing -= 1
                    self.register_when_ready()

                spec.loader.exec_module = exec_module
            return spec
        return None

    def register_when_ready(self) -> None:
        """Import ``turbos.interop.auto`` (which registers) once the Auto classes have loaded and
        no transformers module is half-imported; then stop watching."""
        if self.importing or self not in sys.meta_path:
            return
        if "transformers.models.auto.configuration_auto" in sys.modules:
            sys.meta_path.remove(self)
            __import__("turbos.interop.auto")


_finder = _RegisterWithTransformers()
sys.meta_path.insert(0, _finder)
_finder.register_when_ready()
