"""Speed lever: the two intra towers' SANBs of a step in one batched matmul, against the module's loop.

    OMP_NUM_THREADS=1 python benchmarks/sanb_batched.py [--items 500,3000,12000] [--repeats 20]

IISANVS's two intra towers have equal shapes (here MiniLM's: 4 rows x 384, bottleneck 64), so
step j of both can run as one ``baddbmm`` over stacked weights instead of two ``nn.Linear``
pairs. Prints CPU milliseconds of forward + backward over ``M`` items (the distinct items of a
training batch) for the loop (``model/layers.IntraTower``, what the model runs) and the batched
form on the same parameters, their ratio, and the largest output difference.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from recbole_iisan.model.layers import SideNetwork, SideNetworkConfig  # noqa: E402


def intra_pair_batched(ta, tb, ha: torch.Tensor, hb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both intra towers, step by step, each step one ``baddbmm`` pair over ``[2, M, D]``."""
    h = torch.stack([ha, hb])
    g = torch.stack([ta.gates(), tb.gates()])
    z = torch.zeros_like(h[:, :, 0])
    for j in range(h.size(2)):
        a, b = ta.blocks[j], tb.blocks[j]
        wd = torch.stack([a.down.weight.t(), b.down.weight.t()])
        wu = torch.stack([a.up.weight.t(), b.up.weight.t()])
        bd = torch.stack([a.down.bias, b.down.bias])[:, None]
        bu = torch.stack([a.up.bias, b.up.bias])[:, None]
        gj = g[:, j].view(2, 1, 1)
        u = gj * h[:, :, j] + (1 - gj) * z
        z = u + torch.baddbmm(bu, torch.relu(torch.baddbmm(bd, u, wd)), wu)
    return z[0], z[1]


def cpu_ms(net, f, repeats: int) -> float:
    f()  # warm-up
    t0 = time.process_time()
    for _ in range(repeats):
        net.zero_grad()
        a, b = f()
        (a.sum() + b.sum()).backward()
    return (time.process_time() - t0) / repeats * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--items", default="500,3000,12000")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    n, dim, r = 4, 384, 64
    net = SideNetwork(SideNetworkConfig(dim_a=dim, n_a=n, dim_b=dim, n_b=n, embedding_size=64, sanb_size=r,
                                        inter_sanb_size=None, sanb_activation="relu", head_type="symmetric",
                                        modality="intra_inter", fusion="gated", frozen_backbone=False))
    print(f"{torch.get_num_threads()} torch threads; intra towers of {n} rows x {dim}, bottleneck {r}")
    print("| items M | loop ms | batched ms | batched / loop | max |diff| |")
    print("|---|---|---|---|---|")
    for m in [int(x) for x in args.items.split(",")]:
        ha, hb = torch.randn(m, n, dim), torch.randn(m, n, dim)
        loop = lambda: (net.intra_a(ha), net.intra_b(hb))  # noqa: E731
        batched = lambda: intra_pair_batched(net.intra_a, net.intra_b, ha, hb)  # noqa: E731
        with torch.no_grad():
            diff = max(float((x - y).abs().max()) for x, y in zip(loop(), batched()))
        t_loop = min(cpu_ms(net, loop, args.repeats) for _ in range(2))
        t_batched = min(cpu_ms(net, batched, args.repeats) for _ in range(2))
        print(f"| {m} | {t_loop:.1f} | {t_batched:.1f} | {t_batched / t_loop:.2f} | {diff:.2g} |")


if __name__ == "__main__":
    main()
