"""Feature shift for simulation (issue 27): every client sees its images through its own
transform, a member of one family (`partition.shift`) drawn for that client from the keyed
streams, so that domain shift can be studied apart from or together with label skew (FEAL's
setting: sites whose scanners differ). The transform is applied once, to the uint8 train
images of the client's pool, when the federation is built: training, querying and every
model output see the same shifted view. The test set stays as it is unless
`partition.shift_test` is set; then each test image takes the transform of a client drawn
uniformly for it.

Families, with s = `partition.shift_strength` in (0, 1] and u_k the client's draws:

* rotate: a rotation by θ_k = 180° · s · u_k, u_k ~ U(−1, 1) (bilinear, zeros outside; in
  normalised coordinates, so a rotation proper on square images only);
* color: per channel x ↦ g_{k,c} (x − 128) + 128 + 64 s v_{k,c}, g ~ 1 + s U(−1, 1),
  v ~ U(−1, 1) (contrast and brightness; per channel on RGB: a colour cast);
* noise: additive Gaussian noise of σ_k = 64 s u_k grey levels, u_k ~ U(0.5, 1), fixed
  per image (drawn once);
* blur: a Gaussian blur of σ_k = 2 s u_k pixels, u_k ~ U(0.5, 1) (reflect padding).

The results are rounded and clipped to 0..255.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from falkit.seeding import rng, torch_generator

SHIFTS = ("none", "rotate", "color", "noise", "blur")


def client_params(kind: str, strength: float, seed: int, k: int, channels: int
                  ) -> dict[str, object]:
    """Client k's transform of family `kind`: its parameters, from stream
    ("feature_shift", kind, k) of `seed`."""
    g = rng(seed, "feature_shift", kind, k)
    s = float(strength)
    if kind == "rotate":
        return {"degrees": 180.0 * s * float(g.uniform(-1, 1))}
    if kind == "color":
        return {"gain": (1 + s * g.uniform(-1, 1, channels)).tolist(),
                "offset": (64 * s * g.uniform(-1, 1, channels)).tolist()}
    if kind == "noise":
        return {"sigma": 64 * s * float(g.uniform(0.5, 1))}
    if kind == "blur":
        return {"sigma": 2 * s * float(g.uniform(0.5, 1))}
    raise ValueError(f"unknown feature shift {kind!r}; choose one of {', '.join(SHIFTS)}")


def apply(x: torch.Tensor, kind: str, params: dict[str, object],
          gen: torch.Generator | None = None) -> torch.Tensor:
    """uint8 N×C×H×W images through one transform (`gen`: the noise's draws)."""
    if kind == "none" or len(x) == 0:
        return x.clone()
    f = x.float()
    if kind == "rotate":
        t = math.radians(float(params["degrees"]))  # type: ignore[arg-type]
        theta = torch.tensor([[math.cos(t), -math.sin(t), 0.0],
                              [math.sin(t), math.cos(t), 0.0]]).expand(len(f), 2, 3)
        grid = F.affine_grid(theta, list(f.shape), align_corners=False)
        f = F.grid_sample(f, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    elif kind == "color":
        gain = torch.tensor(params["gain"]).view(1, -1, 1, 1)  # type: ignore[arg-type]
        offset = torch.tensor(params["offset"]).view(1, -1, 1, 1)  # type: ignore[arg-type]
        f = gain * (f - 128) + 128 + offset
    elif kind == "noise":
        f = f + float(params["sigma"]) * torch.randn(f.shape, generator=gen)  # type: ignore
    elif kind == "blur":
        sigma = float(params["sigma"])  # type: ignore[arg-type]
        r = max(1, math.ceil(3 * sigma))
        r = min(r, (min(f.shape[2:]) - 1))  # reflect padding needs r < size
        if sigma > 0 and r > 0:
            w = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
            w = w / w.sum()
            c = f.shape[1]
            f = F.pad(f, (r, r, r, r), mode="reflect")
            f = F.conv2d(f, w.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
            f = F.conv2d(f, w.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    else:
        raise ValueError(f"unknown feature shift {kind!r}; choose one of {', '.join(SHIFTS)}")
    return f.round().clamp(0, 255).to(torch.uint8)


def shift_clients(x_train: torch.Tensor, clients: list[np.ndarray], kind: str,
                  strength: float, seed: int) -> tuple[torch.Tensor, list[dict[str, object]]]:
    """The train images with each client's pool through its transform, and the transforms'
    parameters by client."""
    out = x_train.clone()
    params = []
    for k, pool in enumerate(clients):
        p = client_params(kind, strength, seed, k, int(x_train.shape[1]))
        idx = torch.as_tensor(pool, dtype=torch.long)
        out[idx] = apply(x_train[idx], kind, p, torch_generator(seed, "feature_shift_noise", k))
        params.append(p)
    return out.contiguous(), params


def shift_test(x_test: torch.Tensor, params: list[dict[str, object]], kind: str, seed: int
               ) -> torch.Tensor:
    """The test images, each through the transform of a client drawn uniformly for it."""
    who = rng(seed, "feature_shift_test").integers(0, len(params), len(x_test))
    out = x_test.clone()
    for k, p in enumerate(params):
        idx = torch.as_tensor(np.flatnonzero(who == k), dtype=torch.long)
        if len(idx):
            out[idx] = apply(x_test[idx], kind, p,
                             torch_generator(seed, "feature_shift_test_noise", k))
    return out.contiguous()
