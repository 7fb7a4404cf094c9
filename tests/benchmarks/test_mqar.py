"""MQAR generator: Zoology's procedure re-run literally (global numpy seed, apply_along_axis) as the oracle."""
import numpy as np
import pytest
import torch

from mambacl.benchmarks.mqar import IGNORE_INDEX, multiquery_ar


def zoology_multiquery_ar(vocab_size, num_examples, input_seq_len, seed, power_a=0.01, num_kv_pairs=8):
    """Zoology's multiquery_ar.py written the way the original is (without the random non-query fill)."""
    np.random.seed(seed)
    context_size = num_kv_pairs * 2
    key_vocab_size = vocab_size // 2
    key_choices = np.arange(1, key_vocab_size)
    value_choices = np.arange(key_vocab_size, vocab_size)
    keys = np.apply_along_axis(np.random.choice, 1, np.tile(key_choices, (num_examples, 1)), replace=False,
                               size=num_kv_pairs)
    values = np.apply_along_axis(np.random.choice, 1, np.tile(value_choices, (num_examples, 1)), replace=False,
                                 size=num_kv_pairs)
    kvs = np.zeros((num_examples, context_size), dtype=np.int64)
    kvs[:, 0::2] = keys
    kvs[:, 1::2] = values
    space = (input_seq_len - context_size) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    x = np.stack([np.arange(space, dtype=int)] * num_examples)
    gaps = np.apply_along_axis(np.random.choice, axis=1, arr=x, replace=False, p=p, size=num_kv_pairs)
    queries = np.zeros((num_examples, input_seq_len - context_size + 1), dtype=np.int64)
    np.put_along_axis(queries, (gaps * 2), values=keys, axis=1)
    examples = np.concatenate([kvs, queries], axis=1)
    labels = np.full((num_examples, input_seq_len + 1), -100, dtype=np.int64)
    np.put_along_axis(labels, (gaps * 2) + context_size + 1, values=values, axis=1)
    return torch.tensor(examples[:, :-1]), torch.tensor(labels[:, 1:])


@pytest.mark.parametrize("vocab,seqlen,pairs", [(128, 64, 4), (512, 128, 16), (80, 64, 16)], ids=str)
def test_mqar_equals_zoology(vocab, seqlen, pairs):
    ours = multiquery_ar(vocab, 50, seqlen, seed=3, num_kv_pairs=pairs, random_non_queries=False)
    ref = zoology_multiquery_ar(vocab, 50, seqlen, seed=3, num_kv_pairs=pairs)
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=0)
    filled, labels = multiquery_ar(vocab, 50, seqlen, seed=3, num_kv_pairs=pairs)
    assert torch.equal(labels, ref[1])
    empty = ref[0] == 0
    assert torch.equal(filled[~empty], ref[0][~empty])
    assert filled[empty].min() >= 0 and filled[empty].max() < vocab and filled[empty].float().std() > 0


def test_mqar_label_placement_and_ranges():
    vocab, seqlen, pairs = 256, 64, 8
    inputs, labels = multiquery_ar(vocab, 200, seqlen, seed=0, num_kv_pairs=pairs)
    keys, values = inputs[:, 0:2 * pairs:2], inputs[:, 1:2 * pairs:2]
    assert keys.min() >= 1 and keys.max() < vocab // 2
    assert values.min() >= vocab // 2 and values.max() < vocab
    for row in range(inputs.shape[0]):
        assert len(set(keys[row].tolist())) == pairs and len(set(values[row].tolist())) == pairs
        kv = dict(zip(keys[row].tolist(), values[row].tolist()))
        (pos,) = torch.nonzero(labels[row] != IGNORE_INDEX, as_tuple=True)
        assert len(pos) == pairs
        assert torch.all(pos >= 2 * pairs) and torch.all((pos - 2 * pairs) % 2 == 0)
        for p in pos.tolist():
            assert labels[row, p].item() == kv[inputs[row, p].item()]
        assert sorted(inputs[row, pos].tolist()) == sorted(kv)


def test_mqar_gap_distribution_is_the_power_law():
    """With one pair the gap is a single draw from p(g) ~ a g^(a-1) over (L - 2) / 2 slots."""
    seqlen, a = 32, 0.01
    _, labels = multiquery_ar(64, 8000, seqlen, seed=1, power_a=a, num_kv_pairs=1)
    gaps = (torch.nonzero(labels != IGNORE_INDEX)[:, 1] - 2) // 2
    space = (seqlen - 2) // 2
    p = a * np.arange(1, space + 1) ** (a - 1)
    p /= p.sum()
    freq = np.bincount(gaps.numpy(), minlength=space) / len(gaps)
    assert 0.5 * np.abs(freq - p).sum() < 0.03


def test_mqar_is_seeded():
    a = multiquery_ar(128, 8, 64, seed=5, num_kv_pairs=4)
    b = multiquery_ar(128, 8, 64, seed=5, num_kv_pairs=4)
    c = multiquery_ar(128, 8, 64, seed=6, num_kv_pairs=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(vocab_size=128, input_seq_len=63), "even"),
    (dict(vocab_size=64, input_seq_len=64), "vocab_size"),
    (dict(vocab_size=128, input_seq_len=64, num_kv_pairs=17), "num_kv_pairs"),
    (dict(vocab_size=128, input_seq_len=64, power_a=0.0), "power_a"),
], ids=["odd", "small-vocab", "too-many-pairs", "power_a"])
def test_mqar_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        multiquery_ar(num_examples=2, seed=0, **kwargs)
