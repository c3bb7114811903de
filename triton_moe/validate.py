"""Input validation for every public host function: bad input gets a ``ValueError`` that names the
argument, never a silent wrong answer or a crash inside a kernel."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device: torch.device | str | None = None,
           contiguous: bool = True, shape: tuple | None = None, nonempty: bool = False) -> torch.Tensor:
    """Check one tensor argument. ``shape`` entries of None match any size."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in ({', '.join(str(d) for d in dtypes)}), got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device}, but the other inputs are on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() on it first)")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass at least one token")
    return t


def same_dtype(**tensors) -> torch.dtype:
    names = list(tensors)
    first = tensors[names[0]].dtype
    for n in names[1:]:
        if tensors[n].dtype != first:
            raise ValueError(f"{n} has dtype {tensors[n].dtype}, but {names[0]} has {first}: they must match")
    return first


def top_k(value, experts: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"top_k must be an int, got {type(value).__name__}")
    if not 1 <= value <= experts:
        raise ValueError(f"top_k must be between 1 and the number of experts ({experts}), got {value}")
    return value
