"""Synthetic packed projections for tests and benchmarks (speed does not depend on what P̃ holds)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .packing import LayerLayout, PackedProjection, pack_codes
from .placement import fsdp_placement, group_or_world, is_dtensor, plan
from .parts import SubspaceParts
from .subspace import Subspace


def random_projection(sizes, n: int, bits: int | None, seed: int = 0, dyadic: bool = False,
                      device="cpu") -> PackedProjection:
    """A packed P̃ with uniformly random codes; the unused tail bits of each layer are zero as the
    packer leaves them. ``dyadic``: scale 2^-4 and zeros on the 2^-4 grid, so that with small-integer
    inputs every product and sum a kernel forms is exact in fp32. On a CUDA ``device`` the words are
    drawn there directly (uniform codes, random tail bits), which benchmark-sized P̃ needs.
    ``bits=None``: a dense fp32 P (entries of about 0.01), drawn on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    lay = LayerLayout(tuple(sizes), n, bits)
    if bits is None:
        rows = torch.randn(lay.numel, n, generator=torch.Generator(device=device).manual_seed(seed),
                           device=device) * 0.01
        zeros = torch.zeros(len(sizes), n, device=device)
        return PackedProjection(lay, zeros, zeros, dense_rows=rows)
    if torch.device(device).type == "cuda":
        words = _random_words_on(lay.num_words, torch.device(device), seed)
    else:
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


def _random_words_on(num_words: int, device: torch.device, seed: int, chunk: int = 1 << 26) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    words = torch.empty(num_words, dtype=torch.int32, device=device)
    for start in range(0, num_words, chunk):  # int64 draws in chunks: all 32 bits uniform
        part = words[start:start + chunk]
        part.copy_(torch.randint(-(2**31), 2**31, part.shape, generator=gen, device=device))
    return words


def layer_sizes_like_a_cnn(total: int, num_layers: int = 161) -> tuple[int, ...]:
    """``num_layers`` sizes summing to ``total``: a few large weight tensors and many small ones
    (biases, norms), roughly as in a ResNet-50, including one-element layers."""
    if total < num_layers:
        raise ValueError(f"cannot split {total} parameters into {num_layers} non-empty layers")
    if total < 4 * num_layers:  # too few to shape: as even a split as possible
        base, extra = divmod(total, num_layers)
        return tuple(base + (i < extra) for i in range(num_layers))
    big = num_layers // 3
    small = num_layers - big
    small_sizes = [1 if i % 10 == 0 else 64 * (1 + i % 8) for i in range(small)]
    budget = total // 4  # small tensors hold at most a quarter of the parameters
    if sum(small_sizes) > budget:
        factor = budget / sum(small_sizes)
        small_sizes = [max(1, int(x * factor)) for x in small_sizes]
    rest = total - sum(small_sizes)
    weights = torch.linspace(1.0, 4.0, big, dtype=torch.float64) ** 2
    big_sizes = [max(1, int(x)) for x in (weights / weights.sum() * rest).tolist()]
    big_sizes[-1] += rest - sum(big_sizes)
    sizes = tuple(int(x) for x in big_sizes + small_sizes)
    assert sum(sizes) == total and min(sizes) >= 1
    return sizes


def synthetic_subspace(model: torch.nn.Module, n: int, bits: int | None, shard: str | None = None,
                       process_group=None, seed: int = 0) -> Subspace:
    """A subspace of ``model``'s shape with random codes and no checkpoints behind it, for cost benchmarks
    (time, memory and communication do not depend on what P̃ holds). With ``shard`` it is this rank's
    part, as :meth:`Subspace.from_checkpoints` would build it; every rank agrees on the scales and zeros.
    The centre is the model's current weights, so the optimizer starts where the model is."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    sizes = tuple(p.numel() for _, p in named)
    world, rank, group = 1, 0, None
    if any(is_dtensor(p) for _, p in named):  # FSDP2: this rank's local shards, as from_checkpoints finds them
        placement, group = fsdp_placement([p for _, p in named], "param")
        rank = placement.rank
    else:
        if shard is not None:
            group = group_or_world(process_group)
            world, rank = dist.get_world_size(group), dist.get_rank(group)
        placement = plan(shard, sum(sizes), n, world, rank)
    ranges = placement.layer_ranges(sizes)
    cols = placement.column_slice(n)
    local = random_projection(tuple(b - a for a, b in ranges), cols.stop - cols.start, bits, seed=seed + 1 + rank)
    if bits is None:  # a dense P has no affine parameters
        scale = zero = torch.zeros(len(sizes), n)
    else:
        gen = torch.Generator().manual_seed(seed)  # the same on every rank
        scale = torch.rand(len(sizes), n, generator=gen) * 0.01
        zero = -scale * ((1 << bits) - 1) / 2
        local = PackedProjection(local.layout, scale[:, cols].contiguous(), zero[:, cols].contiguous(), local.words)
    center = torch.cat([p.detach().to_local().reshape(-1).float().cpu() if is_dtensor(p) else
                        p.detach().reshape(-1)[a:b].float().cpu() for (_, p), (a, b) in zip(named, ranges)])
    return Subspace(SubspaceParts(
        names=[nm for nm, _ in named], shapes=[tuple(p.shape) for _, p in named], layers_mode="param",
        decouple_mode="center", scale_mode="layer", center=center, projection=local,
        col_norms=torch.ones(len(sizes), n, dtype=torch.float64), spread=torch.ones(len(sizes), dtype=torch.float64),
        transform=None, frozen=torch.zeros(len(sizes), dtype=torch.bool), layer_sizes=sizes, global_scale=scale,
        global_zero=zero, placement=placement, process_group=group))
