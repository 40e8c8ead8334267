"""Driving action table (The Matrix, DESIGN.md §4) and per-source action maps.

Action ids 0..8 are the nine driving actions. In recorded data the id -1 marks "unknown"
(unlabelled footage, and the reset frame that no action produced); in the model's control table
it is the last row, ``UNKNOWN_SENTENCE``.
"""

from __future__ import annotations

import numpy as np

UNKNOWN_ID = -1
UNKNOWN_SENTENCE = "The camera is moving in an unknown way."

# (name, sentence, (steer, gas, brake)) for CarRacing-v3's continuous controls.
# Gas 0.5 / brake 0.8 keep the car controllable: full gas at a steering lock spins it out.
# "B" (brake) in CarRacing only slows down: the simulator has no reverse gear.
_DRIVING = (
    ("D", "The car is driving forward.", (0.0, 0.5, 0.0)),
    ("DL", "The car is driving forward and turning left.", (-1.0, 0.5, 0.0)),
    ("DR", "The car is driving forward and turning right.", (1.0, 0.5, 0.0)),
    ("B", "The car is braking.", (0.0, 0.0, 0.8)),
    ("BL", "The car is braking and turning left.", (-1.0, 0.0, 0.8)),
    ("BR", "The car is braking and turning right.", (1.0, 0.0, 0.8)),
    ("N", "The car is coasting straight.", (0.0, 0.0, 0.0)),
    ("NL", "The car is coasting and turning left.", (-1.0, 0.0, 0.0)),
    ("NR", "The car is coasting and turning right.", (1.0, 0.0, 0.0)),
)

DRIVING_ACTIONS: tuple[str, ...] = tuple(name for name, _, _ in _DRIVING)
DRIVING_SENTENCES: tuple[str, ...] = tuple(sentence for _, sentence, _ in _DRIVING)
# (9, 3) float32: steer in [-1, 1], gas in [0, 1], brake in [0, 1]
CARRACING_CONTROLS: np.ndarray = np.array([c for _, _, c in _DRIVING], dtype=np.float32)

# steer sign of each driving action (-1 left, 0 straight, +1 right), used by the recording policy
STEER_OF_ACTION = np.array([0, -1, 1, 0, -1, 1, 0, -1, 1], dtype=np.int64)
# throttle class of each driving action: 0 drive, 1 brake, 2 coast
THROTTLE_OF_ACTION = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2], dtype=np.int64)


def action_id(steer: int, throttle: int) -> int:
    """Driving action id from a steer sign (-1, 0, 1) and a throttle class (0 drive, 1 brake, 2 coast)."""
    return int(3 * throttle + {0: 0, -1: 1, 1: 2}[steer])


def default_sentences(num_actions: int) -> tuple[str, ...]:
    """Sentences for an env with its own ``Discrete(num_actions)``: "Action k." (user-overridable)."""
    return tuple(f"Action {k}." for k in range(num_actions))


def control_sentences(action_sentences: tuple[str, ...] | list[str]) -> list[str]:
    """The model's control table rows: one sentence per action id, then the unknown sentence."""
    return [*action_sentences, UNKNOWN_SENTENCE]


def to_table_index(actions: np.ndarray, num_actions: int) -> np.ndarray:
    """Map data action ids (with -1 = unknown) to control-table rows (unknown -> ``num_actions``)."""
    actions = np.asarray(actions)
    return np.where(actions < 0, num_actions, actions).astype(np.int64)
