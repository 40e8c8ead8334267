"""``EnvState``: a snapshot of N MatrixWorld episodes, to rewind them or branch them (planning).

``clone_state()`` on :class:`~matrix_env.env.MatrixWorldEnv` (N = 1) or
:class:`~matrix_env.vector.MatrixWorldVectorEnv` (its sub-envs) returns one; ``restore_state(state)``
puts it back, into the same env, another env of the same world and sampler, or (one row) into
every sub-env of a vector env, so a planner can try N action sequences from the state an agent is in
with one batched forward per step::

    snap = env.unwrapped.clone_state()             # the acting env, one episode
    plan.restore_state(snap)                       # all N sub-envs of a planning vector env
    for t in range(horizon):
        obs, reward, terminated, truncated, info = plan.step(candidates[:, t])

What it holds is what an episode's future depends on besides the actions: each stream's Swin-DPM
window (the clean context frames and the frames in flight, with their control rows), its noise key
and draw counter, a recurrent hazard head's memory (if the world has one), the episode's step count
(the vector env's time limit) and whether the episode ended at the last step. Restored episodes
replay exactly: the same actions give the same frames, rewards and terminations. Not in it: the
envs' ``np_random`` (which only draws the start context and noise key of *later* episodes: after a
rewind, the episode that follows a replayed ending is drawn afresh, not repeated), and wrappers' own
counters (``gym.make``'s ``TimeLimit``: restore the unwrapped env, or use the vector env, which
counts steps itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from world_model.swin_dpm import SwinDPMState


@dataclass(frozen=True)
class EnvState:
    """N episodes of a MatrixWorld env (see the module docstring). Index it for a subset."""

    stream: SwinDPMState
    """The simulator rows: (N, L, C, H, W) window latents, (N, L) controls, (N,) noise keys and counters,
    (N, M) hazard memory (M = 0 without a recurrent hazard head)."""
    elapsed: np.ndarray
    """(N,) int64 steps since each episode's reset."""
    ended: np.ndarray
    """(N,) bool: the episode ended at its last step (vector env: terminated or truncated, so the next
    step resets it; single env: terminated, as its time limit is ``gym.make``'s wrapper's)."""

    def __len__(self) -> int:
        return len(self.elapsed)

    def __getitem__(self, index: int | slice | np.ndarray | list[int]) -> EnvState:
        """The episodes ``index`` selects, as a new state (an int keeps one row: ``state[0]``)."""
        rows = np.arange(len(self))[index]
        rows = np.atleast_1d(rows).astype(np.int64)
        return EnvState(self.stream.select(torch.from_numpy(rows)), self.elapsed[rows].copy(), self.ended[rows].copy())
