"""Small fitted codebook quantizers shared by the E-step, dead-centroid and soft-assignment tests."""
import torch

from compresskit.quantizers.pq import PQ
from compresskit.quantizers.vq import VQ

CASES = [
    ("pq-pool", lambda: PQ(bits=2, k=16, share=1, pool=True, pool_size=32), (64, 24)),
    ("pq-share4-pad", lambda: PQ(bits=2, k=16, share=4, pool=False), (32, 22)),
    ("vq-groups-pad", lambda: VQ(bits=2, d=2, k=16, row_groups=2), (48, 23)),
    ("pq-rowscale-pool", lambda: PQ(bits=2, k=16, share=1, pool=True, pool_size=32, row_scale=True), (64, 24)),
    ("vq-rowscale-pad", lambda: VQ(bits=2, d=2, k=16, row_scale=True), (48, 23)),
]
IDS = [c[0] for c in CASES]


def fitted(case):
    _, make, shape = case
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, generator=gen)
    W = W * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=gen).mul(3).add(0.2)  # rows of unequal size
    return make().fit(W), W
