"""Synthetic packed projections for tests and benchmarks (speed does not depend on what P̃ holds)."""

from __future__ import annotations

import torch

from .packing import LayerLayout, PackedProjection, pack_codes


def random_projection(sizes, n: int, bits: int, seed: int = 0, dyadic: bool = False,
                      device="cpu") -> PackedProjection:
    """A packed P̃ with uniformly random codes; the unused tail bits of each layer are zero as the
    packer leaves them. ``dyadic``: scale 2^-4 and zeros on the 2^-4 grid, so that with small-integer
    inputs every product and sum a kernel forms is exact in fp32."""
    gen = torch.Generator().manual_seed(seed)
    lay = LayerLayout(tuple(sizes), n, bits)
    words = torch.empty(lay.num_words, dtype=torch.int32)
    offs = lay.word_offsets.tolist()
    for l, size in enumerate(sizes):
        codes = torch.randint(0, 2**bits, (size * n,), generator=gen, dtype=torch.uint8)
        words[offs[l]:offs[l + 1]] = pack_codes(codes, bits)
    L = len(sizes)
    if dyadic:
        scale = torch.full((L, n), 2.0**-4)
        zero = torch.randint(-16, 16, (L, n), generator=gen).float() * 2.0**-4
    else:
        scale = torch.rand(L, n, generator=gen) * 0.1
        zero = torch.randn(L, n, generator=gen) * 0.1
    return PackedProjection(lay, scale, zero, words).to(device)


def layer_sizes_like_a_cnn(total: int, num_layers: int = 161) -> tuple[int, ...]:
    """``num_layers`` sizes summing to ``total``: a few large weight tensors and many small ones
    (biases, norms), roughly as in a ResNet-50, including one-element layers."""
    big = num_layers // 3
    small = num_layers - big
    small_sizes = [1 if i % 10 == 0 else 64 * (1 + i % 8) for i in range(small)]
    rest = total - sum(small_sizes)
    weights = torch.linspace(1.0, 4.0, big) ** 2
    big_sizes = (weights / weights.sum() * rest).long().tolist()
    big_sizes[-1] += rest - sum(big_sizes)
    return tuple(int(s) for s in big_sizes + small_sizes)


def synthetic_subspace(model, n: int, bits: int | None, shard: str | None = None, process_group=None,
                       seed: int = 0):
    """A Subspace for ``model`` with random codes and no checkpoints behind it, built (per rank, when
    ``shard`` is given) at any size in the time it takes to draw the codes: for cost benchmarks."""
    import torch.distributed as dist

    from .distributed import Shard, group_or_world, local_ranges
    from .subspace import Subspace, trainable_parameters

    named = trainable_parameters(model)
    sizes = tuple(p.numel() for _, p in named)
    plan = None
    if shard is not None:
        process_group = group_or_world(process_group)
        plan = Shard.plan(shard, sum(sizes), n, dist.get_world_size(process_group), dist.get_rank(process_group))
    local = [b - a for a, b in local_ranges(sizes, plan)]
    n_local = plan.col_stop - plan.col_start if plan is not None and plan.mode == "columns" else n
    if bits is None:
        lay = LayerLayout(tuple(local), n_local, None)
        gen = torch.Generator().manual_seed(seed)
        proj = PackedProjection(lay, torch.zeros(len(sizes), n_local), torch.zeros(len(sizes), n_local),
                                dense_rows=torch.randn(lay.numel, n_local, generator=gen) * 1e-3)
    else:
        proj = random_projection(local, n_local, bits, seed=seed)
    gscale = torch.full((len(sizes), n), 1e-3)
    cols = slice(plan.col_start, plan.col_stop) if plan is not None and plan.mode == "columns" else slice(None)
    proj.scale, proj.zero = gscale[:, cols].contiguous(), torch.zeros(len(sizes), n_local)
    center = torch.cat([p.detach().reshape(-1).float() for _, p in named])
    if plan is not None and plan.mode == "rows":
        center = center[plan.row_start:plan.row_stop].clone()
    return Subspace(names=[nm for nm, _ in named], shapes=[tuple(p.shape) for _, p in named], layers="param",
                    decouple="center", scale="layer", center=center, projection=proj,
                    col_norms=torch.ones(len(sizes), n, dtype=torch.float64), transform=None,
                    frozen=torch.zeros(len(sizes), dtype=torch.bool), layer_sizes=sizes, global_scale=gscale,
                    global_zero=torch.zeros(len(sizes), n), shard=plan, process_group=process_group)
