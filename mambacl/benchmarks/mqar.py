"""Multi-query associative recall (MQAR), generated exactly as Zoology's ``zoology/data/multiquery_ar.py``.

Arora et al., "Zoology: Measuring and Improving Recall in Efficient Language Models" (arXiv 2312.04927).
An example is ``k1 v1 k2 v2 ... kK vK`` followed by ``L - 2K`` query slots; each key is asked again at a
slot ``2 g`` whose gap ``g`` is drawn without replacement with ``p(g) ~ a g^(a-1)`` (``a = power_a``), the
other slots hold random tokens. Inputs and labels are the next-token shift of one sequence of length
``L + 1``: the label at a query position is the value that followed the key, every other label is -100.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

__all__ = ["multiquery_ar", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def multiquery_ar(vocab_size: int, num_examples: int, input_seq_len: int, seed: int, power_a: float = 0.01,
                  num_kv_pairs: int = 8, random_non_queries: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generate MQAR examples with Zoology's sampling procedure (same draws in the same order).

    Args:
        vocab_size: V; keys come from ``[1, V/2)``, values from ``[V/2, V)``; must exceed ``input_seq_len``.
        num_examples: number of sequences.
        input_seq_len: L, even.
        seed: seeds numpy (keys, values, gaps) and torch (random non-query tokens).
        power_a: exponent a of the gap distribution ``p(g) ~ a g^(a-1)``, ``0 < a <= 1``.
        num_kv_pairs: K, with ``4 K <= L``.
        random_non_queries: fill the empty query slots with uniform random tokens (else 0).
    Returns:
        inputs ``[num_examples, L]`` int64 and labels ``[num_examples, L]`` int64 (-100 except at queries).

    Examples:
        >>> x, y = multiquery_ar(128, 4, 64, seed=0, num_kv_pairs=4)
        >>> x.shape, int((y != -100).sum())
        (torch.Size([4, 64]), 16)
    """
    vocab_size = _check_int("vocab_size", vocab_size, 4)
    num_examples = _check_int("num_examples", num_examples, 1)
    input_seq_len = _check_int("input_seq_len", input_seq_len, 4)
    num_kv_pairs = _check_int("num_kv_pairs", num_kv_pairs, 1)
    if input_seq_len % 2:
        raise ValueError(f"input_seq_len must be even, got {input_seq_len}")
    if vocab_size <= input_seq_len:
        raise ValueError(f"vocab_size must be larger than input_seq_len, got {vocab_size} <= {input_seq_len}")
    if 4 * num_kv_pairs > input_seq_len:
        raise ValueError(f"num_kv_pairs must satisfy 4 * num_kv_pairs <= input_seq_len, got {num_kv_pairs}, "
                         f"{input_seq_len}")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a must be in (0, 1], got {power_a}")
    rng = np.random.RandomState(seed)
    context_size = 2 * num_kv_pairs
    key_vocab_size = vocab_size // 2
    key_choices, value_choices = np.arange(1, key_vocab_size), np.arange(key_vocab_size, vocab_size)
    keys = np.stack([rng.choice(key_choices, size=num_kv_pairs, replace=False) for _ in range(num_examples)])
    values = np.stack([rng.choice(value_choices, size=num_kv_pairs, replace=False) for _ in range(num_examples)])
    kvs = np.zeros((num_examples, context_size), dtype=np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values

    space = (input_seq_len - context_size) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    gaps = np.stack([rng.choice(np.arange(space), size=num_kv_pairs, replace=False, p=p)
                     for _ in range(num_examples)])
    queries = np.zeros((num_examples, input_seq_len - context_size + 1), dtype=np.int64)
    np.put_along_axis(queries, gaps * 2, values=keys, axis=1)
    examples = np.concatenate([kvs, queries], axis=1)
    labels = np.full((num_examples, input_seq_len + 1), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, gaps * 2 + context_size + 1, values=values, axis=1)

    inputs, targets = torch.from_numpy(examples[:, :-1]).clone(), torch.from_numpy(labels[:, 1:]).clone()
    if random_non_queries:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randint(vocab_size, inputs.shape, generator=gen)
        empty = inputs == 0
        inputs[empty] = noise[empty]
    return inputs, targets
