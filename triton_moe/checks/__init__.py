"""One checker module per chapter; importing this package registers every exercise in
:data:`triton_moe.checking.REGISTRY`. A new chapter adds ``chNN_*.py`` here and nothing else."""
import importlib
import pkgutil

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name.startswith("ch"):
        importlib.import_module(f"{__name__}.{_m.name}")
