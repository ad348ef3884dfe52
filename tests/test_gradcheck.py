"""Every backward pass against finite differences, in float64 (see numformer.gradcheck)."""

import numpy as np
import pytest

from numformer import backend, gradcheck


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_op_matches_finite_differences(seed):
    with backend.use("numpy"):
        results = gradcheck.op_checks(seed)
    bad = [(r.name, r.max_rel_error) for r in results if not r.passed]
    assert not bad, bad
    assert len(results) == 13


def test_whole_model_matches_finite_differences():
    with backend.use("numpy"):
        result = gradcheck.model_check(seed=3)
    assert result.passed, result.max_rel_error


def test_gpt2_classifier_matches_finite_differences_for_every_parameter():
    with backend.use("numpy"):
        result = gradcheck.gpt2_classifier_check(seed=1)
    assert result.passed and "every parameter" in result.name, result


def test_gradcheck_detects_a_wrong_backward():
    """The checker itself must fail a broken gradient (a test that cannot fail is no test)."""
    from numformer.ops import layernorm

    rng = np.random.default_rng(0)

    def broken_backward(dout, cache):
        dx, dg, db = layernorm.backward(dout, cache)
        return dx * 1.01, dg, db                      # 1 % off

    x = rng.standard_normal((2, 3, 5))
    result = gradcheck.check("broken", layernorm.forward, broken_backward,
                             [x, rng.standard_normal(5), rng.standard_normal(5)], rng)
    assert not result.passed


def test_format_table_lists_each_check():
    results = [gradcheck.CheckResult("a", 1e-9, 3), gradcheck.CheckResult("b", 1.0, 3)]
    table = gradcheck.format_table(results)
    assert "pass" in table and "FAIL" in table
