"""`python -m mambacl.kernels` and the shared workload helpers behind it and benchmarks/scan_speed.py."""
import pytest

from mambacl.kernels.__main__ import main
from mambacl.kernels.workload import forward_backward, max_errors, scan_problem


def test_demo_prints_small_errors_for_every_cpu_backend(capsys):
    main(["--batch", "1", "--dim", "6", "--seqlen", "9", "--d-state", "3", "--device", "cpu"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [(op, be) for op in ("selective_scan", "longhorn_scan")
                                           for be in ("reference", "chunk")]
    for op, backend, out_err, grad_err, ms in rows:
        assert float(out_err) < 1e-5 and float(grad_err) < 1e-5, (op, backend)
        assert float(ms) > 0


@pytest.mark.parametrize("op", ["selective_scan", "longhorn_scan"])
def test_max_errors_sees_a_perturbed_gradient(op):
    inputs = scan_problem(op, 1, 4, 5, 2)
    ref = forward_backward(op, "reference", inputs)
    assert "delta_softplus" not in ref[1] and set(ref[1]) >= {"u", "delta", "D", "z", "delta_bias"}
    out, grads = forward_backward(op, "chunk", inputs)
    assert max(max_errors((out, grads), ref)) < 1e-5
    key = next(iter(grads))
    grads[key] = grads[key] + 0.1 * grads[key].abs().max()
    assert max_errors((out + 1, grads), ref) == pytest.approx((1.0, 0.1), rel=1e-3)


def test_scan_problem_rejects_unknown_op():
    with pytest.raises(ValueError, match=r"op must be one of"):
        scan_problem("mamba2", 1, 2, 3, 4)
