"""Identity-balanced (P x K) batch sampling for triplet-style losses, DDP-aware."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


class PKSampler(Sampler[int]):
    """Yields dataset indices forming batches of P identities x K images each.

    Use with DataLoader(dataset, batch_size=p * k, sampler=sampler). Each epoch, every
    identity's images are shuffled and cut into groups of K (an identity with fewer than K
    images gets one group drawn with replacement; a leftover shorter than K is dropped, as in
    torchreid's RandomIdentitySampler); batches take one group from each of P identities
    drawn at random among those with groups left. The order depends only on (seed, epoch):
    call set_epoch(epoch) each epoch. Needs at least P identities.

    Distributed: the epoch's batch list is the same on every rank; rank r takes batches
    r, r + num_replicas, ... and every rank gets the same number (extra batches are dropped),
    so the ranks' shares are disjoint and equal; an epoch with fewer batches than ranks raises
    ValueError (iterating or len()). num_replicas/rank default to the initialised process group
    (else 1/0).
    """

    def __init__(
        self,
        pids: Sequence[int],
        p: int,
        k: int,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be >= 1, got p={p}, k={k}")
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = (
            num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        )
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")
        by_pid = defaultdict(list)
        for index, pid in enumerate(pids):
            by_pid[int(pid)].append(index)
        if len(by_pid) < p:
            raise ValueError(f"PKSampler needs at least p={p} identities, the dataset has {len(by_pid)}")
        self.groups = [np.asarray(v) for _, v in sorted(by_pid.items())]
        self.p, self.k, self.seed, self.epoch = p, k, seed, 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[np.ndarray]:
        """All P x K batches of this epoch, identical on every rank (their number may vary by epoch)."""
        if self._cache is None or self._cache[0] != self.epoch:
            batches = self._make_batches()
            # Each rank takes len // num_replicas batches: fewer batches than ranks would give every
            # rank an empty epoch, silently (a training loop would just do nothing).
            if len(batches) < self.num_replicas:
                raise ValueError(
                    f"PKSampler: epoch {self.epoch} has only {len(batches)} batches of p={self.p} "
                    f"identities x k={self.k} images, fewer than num_replicas={self.num_replicas}, so every "
                    "rank would get an empty epoch; use a smaller p or k, or fewer ranks"
                )
            self._cache = (self.epoch, batches)
        return self._cache[1]

    def _make_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        chunks = []  # per identity: its groups of K indices
        for idx in self.groups:
            if len(idx) < self.k:
                chunks.append([rng.choice(idx, self.k, replace=True)])
            else:
                idx = rng.permutation(idx)
                chunks.append([idx[i : i + self.k] for i in range(0, len(idx) - self.k + 1, self.k)])
        batches = []
        available = list(range(len(chunks)))
        while len(available) >= self.p:
            chosen = rng.choice(len(available), self.p, replace=False)
            batches.append(np.concatenate([chunks[available[c]].pop() for c in chosen]))
            available = [i for i in available if chunks[i]]
        return batches

    def __iter__(self) -> Iterator[int]:
        batches = self._batches()
        per_rank = len(batches) // self.num_replicas
        for batch in batches[self.rank : per_rank * self.num_replicas : self.num_replicas]:
            yield from batch.tolist()

    def __len__(self) -> int:
        return len(self._batches()) // self.num_replicas * self.p * self.k
