"""Epoch order: every epoch a uniform pseudo-random permutation of the whole data set, in O(1) memory.

A keyed Feistel network with cycle walking: batches mix all sources and classes as a full shuffle does, the order
holds only round keys, and position ``p`` of an epoch maps to its sample without the positions before it (any
rank or loader worker computes its own share).
"""

from __future__ import annotations

import numpy as np

#: Rounds of the Feistel network behind :class:`EpochOrder`. Luby-Rackoff: 4 rounds of random functions make a
#: strong pseudo-random permutation of large halves; on tiny domains 8 rounds leave a measurable bias (the 120
#: orders of 5 items over 24k seeds: chi2 175, a uniform shuffle 119 +- 15), 12 do not (123).
FEISTEL_ROUNDS: int = 12
#: Smallest domain of the network, in bits: halves of 1 bit mix poorly (5 items in 3 bits: chi2 663).
_MIN_BITS: int = 4
#: Mixed into the seed of every epoch's round keys, so that the order never shares a stream with masks or views.
_ORDER_TAG: int = 0xFE157E1
# splitmix64 (Steele, Lea and Flood 2014): increment and finalizer multipliers.
_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLITMIX_MUL2 = np.uint64(0x94D049BB133111EB)
_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31))
_PAIR = np.uint64(2)  # the parity step swaps values 0 and 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function, elementwise on uint64 (wrapping arithmetic): a 64-bit bijective mixer."""
    x = x + _SPLITMIX_GAMMA
    x = (x ^ (x >> _SHIFTS[0])) * _SPLITMIX_MUL1
    x = (x ^ (x >> _SHIFTS[1])) * _SPLITMIX_MUL2
    return x ^ (x >> _SHIFTS[2])


class EpochOrder:
    """The sample order of every epoch: a keyed pseudo-random permutation of ``[0, num_items)`` per epoch.

    A Feistel network on ``n``-bit integers (the fewest bits that count ``num_items``, at least :data:`_MIN_BITS`:
    the domain is under 2x the data), halves of ``n // 2`` and ``n - n // 2`` bits, with :data:`FEISTEL_ROUNDS`
    rounds ``(L, R) -> (R, L ^ F(R ^ k_i))``, ``F`` the low bits of splitmix64 and ``k_i`` round keys drawn from
    ``SeedSequence([seed, epoch, tag])``, then a keyed swap of 0 and 1 (rounds of XORs are even permutations), is a
    bijection of the domain; cycle walking (re-applying it until the value falls below ``num_items``) restricts it
    to a bijection of the data. Position ``p`` of an epoch maps to its sample without the positions before it and
    without state: memory is O(1) (the round keys), a batch of positions costs a few vectorised passes (about 3 ms
    for 4096 at 29.7M items).
    """

    def __init__(self, num_items: int, seed: int) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be positive, got {num_items}")
        self.num_items, self.seed = num_items, seed
        bits = max(_MIN_BITS, (num_items - 1).bit_length())  # the domain [0, 2**bits) holds under 2x the data
        self.left_bits, self.right_bits = bits // 2, bits - bits // 2
        self._keys: tuple[int, np.ndarray] | None = None  # (epoch, round keys)

    def _round_keys(self, epoch: int) -> np.ndarray:
        """``FEISTEL_ROUNDS`` round keys, then the key of the parity step."""
        if self._keys is None or self._keys[0] != epoch:
            seq = np.random.SeedSequence([self.seed, epoch, _ORDER_TAG])
            self._keys = (epoch, seq.generate_state(FEISTEL_ROUNDS + 1, dtype=np.uint64))
        return self._keys[1]

    def _feistel(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        a, b = self.left_bits, self.right_bits
        left, right = x >> np.uint64(b), x & np.uint64((1 << b) - 1)
        for key in keys[:FEISTEL_ROUNDS]:  # (L: a bits, R: b bits) -> (R: b bits, L ^ F(R): a bits)
            left, right = right, left ^ (_splitmix64(right ^ key) & np.uint64((1 << a) - 1))
            a, b = b, a
        x = (left << np.uint64(b)) | right  # (a, b): the halves' widths after the last round
        # XOR by a constant on a half of 2+ bits is an even permutation, and cycle walking from even permutations
        # alone is biased on small data; swapping 0 and 1 for half of the keys reaches the odd ones too.
        swap = np.uint64(keys[FEISTEL_ROUNDS] & np.uint64(1))
        return x ^ (swap & (x < _PAIR).astype(np.uint64))

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Sample indices at positions ``[start, stop)`` of ``epoch`` (int64)."""
        if not 0 <= start <= stop <= self.num_items:
            raise ValueError(f"positions [{start}, {stop}) outside the epoch's {self.num_items}")
        keys, limit = self._round_keys(epoch), np.uint64(self.num_items)
        x = self._feistel(np.arange(start, stop, dtype=np.uint64), keys)
        walking = np.flatnonzero(x >= limit)
        while walking.size:  # cycle walking: ends, as the cycle through a position < num_items holds one
            y = self._feistel(x[walking], keys)
            x[walking] = y
            walking = walking[y >= limit]
        return x.astype(np.int64)

    def epoch(self, epoch: int) -> np.ndarray:
        """The whole order of one epoch (tests and small data only: memory grows with the data set)."""
        return self.indices(epoch, 0, self.num_items)
