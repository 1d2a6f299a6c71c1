"""A deliberately naive, loop-by-loop MoDA: the check on the vectorised reference."""

import math

import torch


def brute_moda(q, k, v, depth_k, depth_v, scale=None, causal=True, depth_chunk=1):
    B, T, Hq, D = q.shape
    Hk = k.shape[2] if k is not None else depth_k.shape[3]
    L = depth_k.shape[2] if depth_k is not None else 0
    G = Hq // Hk
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, T, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, T), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            j = h // G
            for t in range(T):
                keys, vals = [], []
                if k is not None:
                    for s in range(T):
                        if not causal or s <= t:
                            keys.append(k[b, s, j].double())
                            vals.append(v[b, s, j].double())
                for s in range(T):
                    if s // depth_chunk == t // depth_chunk and (not causal or s <= t):
                        for l in range(L):
                            keys.append(depth_k[b, s, l, j].double())
                            vals.append(depth_v[b, s, l, j].double())
                if not keys:
                    continue
                logits = torch.stack([q[b, t, h].double() @ key for key in keys]) * scale
                m = logits.max()
                w = torch.exp(logits - m)
                lse[b, h, t] = m + math.log(w.sum().item())
                out[b, t, h] = (w[:, None] * torch.stack(vals)).sum(0) / w.sum()
    return out, lse
