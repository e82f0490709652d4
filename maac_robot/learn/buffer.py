"""Replay buffers for Algorithm 1: D_env (real transitions) and D_model (imagined ones).

Both are the same fixed-capacity ring buffer of numpy arrays. Transitions store the
*state* (see the state convention in CONTRACTS.md: root x included) and `terminated`
only: a time-limit truncation is not a terminal state, so it must not cut the Bellman
backup. Sampling takes an explicit numpy Generator so a run is reproducible from its
seed and a resumed run continues the same random stream.

D_model keeps "the last `rollout.retain_rounds` rounds" of imagined rollouts by being a
ring buffer of `retain_rounds * rollout.batch_size * rollout.length` transitions (each
round adds at most `batch_size * length`, fewer when branches terminate), as in MBPO's
model buffer; old rounds are overwritten first.

Every row also carries a `source` tag (SOURCE_ENV 0: stepped by the trainer in its own env, the
simulator; SOURCE_RECORDED 1: a recorded robot/controller transition added by `maac-robot finetune`).
Sampling ignores it; it is saved in checkpoints (a checkpoint from before the tag loads as all 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FIELDS = ("state", "action", "reward", "next_state", "terminated")
SOURCE_ENV, SOURCE_RECORDED = 0, 1
SOURCE_NAMES = {SOURCE_ENV: "env", SOURCE_RECORDED: "recorded"}


@dataclass(frozen=True)
class Batch:
    """A minibatch of transitions as tensors on the training device."""

    state: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_state: torch.Tensor
    terminated: torch.Tensor

    def __len__(self) -> int:
        return int(self.state.shape[0])

    def split(self, sizes: int) -> list[Batch]:
        """Cut a stacked batch into consecutive batches of `sizes` rows (one per G2 step)."""
        parts = [torch.split(getattr(self, f), sizes) for f in FIELDS]
        return [Batch(*fields) for fields in zip(*parts, strict=True)]

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        return Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in FIELDS))


class ReplayBuffer:
    """Fixed-capacity FIFO of (state, action, reward, next_state, terminated) in float32."""

    def __init__(self, state_dim: int, act_dim: int, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.state_dim, self.act_dim, self.capacity = state_dim, act_dim, capacity
        self.state = np.zeros((capacity, state_dim), np.float32)
        self.action = np.zeros((capacity, act_dim), np.float32)
        self.reward = np.zeros(capacity, np.float32)
        self.next_state = np.zeros((capacity, state_dim), np.float32)
        self.terminated = np.zeros(capacity, np.bool_)
        self.source = np.zeros(capacity, np.uint8)  # SOURCE_ENV / SOURCE_RECORDED per row
        self.ptr = 0  # next row to write
        self.size = 0
        self.total_added = 0  # transitions ever added (D_env: equals env steps stored)

    def __len__(self) -> int:
        return self.size

    def add(self, state: np.ndarray, action: np.ndarray, reward: float, next_state: np.ndarray,
            terminated: bool, source: int = SOURCE_ENV) -> None:
        """Store one real transition."""
        i = self.ptr
        self.state[i], self.action[i], self.reward[i] = state, action, reward
        self.next_state[i], self.terminated[i], self.source[i] = next_state, terminated, source
        self._advance(1)

    def add_batch(self, state: np.ndarray, action: np.ndarray, reward: np.ndarray, next_state: np.ndarray,
                  terminated: np.ndarray, source: int = SOURCE_ENV) -> None:
        """Store many transitions at once (an imagined rollout step, recorded episodes); wraps around the ring."""
        n = len(state)
        if n == 0:
            return
        if n > self.capacity:  # only the newest `capacity` rows would survive anyway
            state, action, reward, next_state, terminated = (
                x[-self.capacity:] for x in (state, action, reward, next_state, terminated))
            self.total_added += n - self.capacity
            n = self.capacity
        idx = (self.ptr + np.arange(n)) % self.capacity
        self.state[idx], self.action[idx], self.reward[idx] = state, action, reward
        self.next_state[idx], self.terminated[idx], self.source[idx] = next_state, terminated, source
        self._advance(n)

    def keep(self, rows: np.ndarray) -> None:
        """Keep only the stored rows `rows` (a boolean mask over the filled rows, or indices), compacted at the
        front in that order; writing continues after them. `keep(np.zeros(len(buf), bool))` empties the buffer.
        For studies that reshape a run's data (finetune's `prepare`); training itself never drops rows."""
        idx = np.arange(self.size)[rows]
        for f in (*FIELDS, "source"):
            column = getattr(self, f)
            column[: len(idx)] = column[idx]
        self.size = len(idx)
        self.ptr = self.size % self.capacity

    def _advance(self, n: int) -> None:
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self.total_added += n

    def sample_indices(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        return rng.integers(0, self.size, size=n)

    def batch(self, idx: np.ndarray, device: torch.device | str = "cpu") -> Batch:
        """The transitions at rows `idx`, as tensors on `device`."""
        return Batch(*(torch.from_numpy(getattr(self, f)[idx]).to(device) for f in FIELDS))

    def sample(self, n: int, rng: np.random.Generator, device: torch.device | str = "cpu") -> Batch:
        """`n` transitions drawn uniformly with replacement, as tensors on `device`."""
        return self.batch(self.sample_indices(n, rng), device)

    def empty_batch(self, device: torch.device | str = "cpu") -> Batch:
        """A zero-row batch with this buffer's field shapes (the unused side of a 0/1 real_ratio split)."""
        return Batch(*(torch.from_numpy(getattr(self, f)[:0]).to(device) for f in FIELDS))

    def arrays(self) -> dict[str, np.ndarray]:
        """The stored transitions (views, oldest-first order not guaranteed): what the model fits on."""
        return {f: getattr(self, f)[: self.size] for f in FIELDS}

    def state_dict(self) -> dict[str, object]:
        """Only the filled rows go into a checkpoint (a 1M-row D_env is mostly empty early on)."""
        return {
            "capacity": self.capacity, "ptr": self.ptr, "size": self.size, "total_added": self.total_added,
            **{f: torch.from_numpy(getattr(self, f)[: self.size].copy()) for f in FIELDS},
            "source": torch.from_numpy(self.source[: self.size].copy()),
        }

    def source_counts(self) -> dict[str, int]:
        """Stored rows per source name (SOURCE_NAMES), e.g. {"env": 5000, "recorded": 400}."""
        counts = np.bincount(self.source[: self.size], minlength=len(SOURCE_NAMES))
        return {name: int(counts[code]) for code, name in SOURCE_NAMES.items()}

    def load_state_dict(self, sd: dict[str, object]) -> None:
        size = int(sd["size"])  # type: ignore[arg-type]
        if size > self.capacity:
            raise ValueError(f"checkpointed buffer holds {size} transitions, more than capacity {self.capacity}")
        stored_capacity = int(sd["capacity"])  # type: ignore[arg-type]
        for f in FIELDS:
            data = sd[f].numpy()  # type: ignore[union-attr]
            if data.shape[1:] != getattr(self, f).shape[1:]:
                raise ValueError(f"checkpointed buffer field {f} has shape {data.shape}, "
                                 f"expected rows of {getattr(self, f).shape[1:]}")
            getattr(self, f)[:size] = data
        # checkpoints from before the source tag hold only the trainer's own env steps
        source = sd.get("source")
        self.source[:size] = 0 if source is None else source.numpy()  # type: ignore[union-attr]
        self.source[size:] = 0
        self.size = size
        # Same capacity: keep the write pointer so the FIFO order continues; otherwise the rows
        # are compacted at the front and writing continues after them.
        self.ptr = int(sd["ptr"]) if stored_capacity == self.capacity else size % self.capacity  # type: ignore[arg-type]
        self.total_added = int(sd["total_added"])  # type: ignore[arg-type]
