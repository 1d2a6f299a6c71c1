"""Input builders and error measures shared by the tests."""

from dataclasses import dataclass, replace
from typing import Optional

import torch


@dataclass(frozen=True)
class Case:
    B: int = 1
    T: int = 37
    Hq: int = 4
    Hk: int = 2
    D: int = 16
    L: int = 3
    chunk: int = 1
    causal: bool = True
    seq: bool = True  # False: depth-only

    def but(self, **kw) -> "Case":
        return replace(self, **kw)

    def __str__(self) -> str:
        kind = "seq+depth" if self.seq else "depth-only"
        return (f"B{self.B}-T{self.T}-Hq{self.Hq}-Hk{self.Hk}-D{self.D}-L{self.L}-C{self.chunk}-"
                f"{'causal' if self.causal else 'full'}-{kind}")


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed: int = 0, depth_slots: Optional[int] = None):
    """Fresh random q, k, v, depth_k, depth_v (k/v None for depth-only).

    With ``depth_slots`` > L the depth tensors are strided views ``buf[:, :, :L]`` of a larger
    preallocated buffer, as a depth stream passes them.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    q = rand(case.B, case.T, case.Hq, case.D)
    k = rand(case.B, case.T, case.Hk, case.D) if case.seq else None
    v = rand(case.B, case.T, case.Hk, case.D) if case.seq else None
    slots = depth_slots or case.L
    dk = rand(case.B, case.T, slots, case.Hk, case.D)[:, :, : case.L]
    dv = rand(case.B, case.T, slots, case.Hk, case.D)[:, :, : case.L]
    return q, k, v, dk, dv


def rel_err(x: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> float:
    """Relative L2 error; NaN anywhere counts as failure."""
    if x is None and ref is None:
        return 0.0
    x, ref = x.double().cpu(), ref.double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm().item()
    return (x - ref).norm().item() / max(denom, 1e-30)


def as_double(tensors):
    return [None if t is None else t.detach().double() for t in tensors]
