"""Makes ``lm_eval --model gptkernels`` work with lm-eval releases that do not read entry points (0.4.13 and
earlier), without importing anything at Python start-up.

lm-eval up to 0.4.13 knows only the models named in ``lm_eval/models/__init__.py``; releases after it also
register every installed ``lm_eval.models`` entry point (gptkernels declares one in pyproject.toml). An install of
gptkernels puts ``gptkernels_lm_eval.pth`` in site-packages, which imports this module when Python starts. It only
adds a finder to ``sys.meta_path`` that waits for ``lm_eval.models`` to be imported (lm-eval imports it when it
first looks a model up); right after that import it adds ``gptkernels`` to lm-eval's model registry, as a lazy
``"module:Class"`` placeholder like lm-eval's own entries, so torch and gptkernels are imported only when the
model is used. Then the finder removes itself.

It does nothing when lm-eval registers entry points itself (``load_plugins``), when ``gptkernels`` is already
registered, or when the registry is not the one it knows. It never raises and never prints: a failure here must
not break Python start-up or lm-eval. Only the standard library's ``sys`` is imported, at start-up.
"""

import sys

MODEL = "gptkernels"
TARGET = "gptkernels.evaluation.lm_eval_model:GPTKernelsLM"
TRIGGER = "lm_eval.models"  # lm-eval registers its own models when this package is imported


def register(registry_module) -> bool:
    """Add the ``gptkernels`` placeholder to ``registry_module.model_registry`` (``lm_eval.api.registry``).
    Returns whether it did; False where lm-eval discovers entry points itself, already knows the name, or has
    another registry API."""
    if hasattr(registry_module, "load_plugins"):  # lm-eval > 0.4.13: the entry point is found without us
        return False
    registry = getattr(registry_module, "model_registry", None)
    if registry is None or not callable(getattr(registry, "register", None)) or MODEL in registry:
        return False
    registry.register(MODEL, target=TARGET)
    return True


def _after_import() -> None:
    try:
        import importlib

        register(importlib.import_module("lm_eval.api.registry"))
    except Exception:  # noqa: BLE001 - an unexpected lm-eval: leave it as it is
        pass


class _RegisteringLoader:
    """Runs lm_eval.models' own loader, then registers the model; anything else goes to the wrapped loader."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _after_import()

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _Finder:
    """A ``sys.meta_path`` finder that answers only for ``lm_eval.models``, with the spec the other finders give
    and its loader wrapped."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != TRIGGER:
            return None
        uninstall()  # once is enough, and the search below must not find this finder again
        try:
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                spec = find_spec(fullname, path, target) if find_spec is not None else None
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _RegisteringLoader(spec.loader)
                    return spec
        except Exception:  # noqa: BLE001 - let the import system search as if this finder were absent
            pass
        return None


def install() -> None:
    """Register now if lm-eval's models are already imported, else add the finder (once)."""
    try:
        if TRIGGER in sys.modules:
            _after_import()
        elif _Finder not in sys.meta_path:
            sys.meta_path.insert(0, _Finder)
    except Exception:  # noqa: BLE001
        pass


def uninstall() -> None:
    try:
        while _Finder in sys.meta_path:
            sys.meta_path.remove(_Finder)
    except Exception:  # noqa: BLE001
        pass


install()
