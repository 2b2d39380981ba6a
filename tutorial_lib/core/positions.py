r"""Position information: absolute sinusoidal embeddings and rotary embeddings (RoPE).

Sinusoidal (Vaswani et al., 2017), for position :math:`p` and channel pair :math:`i`:

.. math:: \mathrm{PE}(p, 2i) = \sin(p\,\omega_i),\quad \mathrm{PE}(p, 2i+1) = \cos(p\,\omega_i),
          \quad \omega_i = 10000^{-2i/d}.

RoPE (Su et al., 2021) rotates each pair of query/key channels by the angle
:math:`p\,\theta_i`, :math:`\theta_i = b^{-2i/d}` (base :math:`b` = 10000), so that
:math:`\langle R_m q, R_n k\rangle` depends on the positions only through
:math:`m - n`. Which channels form a pair is a convention the paper leaves to
the implementation:

* ``"half"`` pairs channel :math:`i` with :math:`i + d/2` (GPT-NeoX, Hugging Face
  LLaMA); the default here;
* ``"interleaved"`` pairs :math:`2i` with :math:`2i+1` (the RoFormer paper's
  equation 34, GPT-J, Mesh-TensorFlow).

The two are the same rotation up to a fixed permutation of channels, so a model
trained with one cannot load weights trained with the other unless the q/k
projections are permuted. Positions may be fractional (random or evenly spaced
positions, chapter 5). NTK-aware scaling of the base and ReRoPE, which build on
this module, live in :mod:`tutorial_lib.techniques.extrapolation`.
"""

from __future__ import annotations

import torch

from tutorial_lib.core.attention import AttentionContext, AttentionPlugin

PAIRINGS = ("half", "interleaved")


def sinusoidal_embedding(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(..., length) positions -> (..., length, dim), sin in even and cos in odd channels."""
    if dim % 2:
        raise ValueError(f"dim must be even for sinusoidal embeddings, got {dim}")
    exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
    frequencies = (base ** -exponent).to(torch.float32)  # (dim/2,)
    angles = positions.to(torch.float32)[..., None] * frequencies  # (..., length, dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


class RotaryEmbedding(AttentionPlugin):
    """RoPE as a rotation of queries and keys (an attention plugin)."""

    def __init__(self, head_dim: int, base: float = 10000.0, pairing: str = "half"):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        self.head_dim = head_dim
        self.base = float(base)
        self.pairing = pairing
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        self.register_buffer("inv_freq", (self.base ** -exponent).float(), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch or 1, length) positions -> cos, sin of shape (batch or 1, 1, length, d/2)."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        angles = angles[:, None]  # broadcast over heads
        return angles.cos(), angles.sin()

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x (batch, heads, length, head_dim) channel pair by channel pair."""
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if self.pairing == "half":
            first, second = x.chunk(2, dim=-1)
            return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
        first, second = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((first * cos - second * sin, first * sin + second * cos), dim=-1)
        return rotated.flatten(-2)

    def query_key_angles(self, ctx: AttentionContext):
        """``((q_cos, q_sin), (k_cos, k_sin))`` for the context's positions, cached."""
        # Every layer rotates by the same angles: compute them once per forward pass.
        key = ("rotary", id(self))
        if key not in ctx.cache:
            ctx.cache[key] = (self.cos_sin(ctx.query_positions), self.cos_sin(ctx.key_positions))
        return ctx.cache[key]

    def transform_qk(self, attn, q, k, ctx: AttentionContext):
        (q_cos, q_sin), (k_cos, k_sin) = self.query_key_angles(ctx)
        return self.rotate(q, q_cos, q_sin), self.rotate(k, k_cos, k_sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, pairing={self.pairing!r}"
