"""Non-integer token ids, targets, labels and positions are refused, never truncated
(issue 15, defect 7).

``np.ascontiguousarray(ids, dtype=np.int64)`` and ``int(t)`` turn 1.5 into 1:
a float array handed to ``embedding_backward`` or ``cross_entropy_forward``
silently trained on the wrong rows on the cpu backend, while the NumPy backend
failed with an IndexError. Every path must now raise the same TypeError,
naming the argument and its dtype, on every backend.
"""

import os

import numpy as np
import pytest

from numformer import backend
from numformer.data import TokenSplits
from numformer.generate import generate, generate_batch
from numformer.models.gpt2 import GPT2, GPT2Config
from numformer.ops import cross_entropy, embedding

BACKENDS = ["numpy"] + (["cpu"] if backend.cpu_available() else [])
FLOATS = [np.array([[1.5, 0.0]]), np.array([[1.0, 2.0]]), np.array([[1.0, 2.0]], np.float32)]


def has_cpu():
    return backend.cpu_available()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("ids", FLOATS + [np.array([[True, False]])], ids=["1.5", "1.0", "f32", "bool"])
def test_embedding_forward_refuses_non_integer_ids(name, ids):
    wte, wpe = np.ones((4, 3), np.float32), np.ones((5, 3), np.float32)
    with backend.use(name), pytest.raises(TypeError, match=rf"embedding: ids has dtype {ids.dtype}"):
        embedding.forward(ids, wte, wpe)


@pytest.mark.parametrize("name", BACKENDS)
def test_embedding_positions_and_pos0_must_be_integers(name):
    ids = np.array([[1, 2]])
    wte, wpe = np.ones((4, 3), np.float32), np.ones((5, 3), np.float32)
    with backend.use(name):
        with pytest.raises(TypeError, match="embedding: positions has dtype float64"):
            embedding.forward(ids, wte, wpe, positions=np.array([[0.5, 1.0]]))
        with pytest.raises(TypeError, match="embedding: pos0 must be an integer, got float 1.5"):
            embedding.forward(ids, wte, wpe, pos0=1.5)
        with pytest.raises(ValueError, match="pos0 must be >= 0, got -1"):   # was an empty slice of wpe
            embedding.forward(ids, wte, wpe, pos0=-1)
        out, _ = embedding.forward(ids.astype(np.uint8), wte, wpe, pos0=np.int64(3))   # any integer type
        assert out.shape == (1, 2, 3)


@pytest.mark.skipif(not has_cpu(), reason="numformer._cpu is not built")
def test_backend_embedding_backward_refuses_float_ids():
    """The truncation itself: ids 1.5 used to add into row 1 of dwte."""
    dout = np.ones((1, 2, 3), np.float32)
    dwte, dwpe = np.zeros((4, 3), np.float32), np.zeros((5, 3), np.float32)
    with pytest.raises(TypeError, match="embedding_backward: ids has dtype float64"):
        backend.embedding_backward(dout, np.array([[1.5, 2.0]]), dwte, dwpe, 0)
    with pytest.raises(TypeError, match="embedding_backward: pos0 must be an integer"):
        backend.embedding_backward(dout, np.array([[1, 2]]), dwte, dwpe, 0.5)
    assert not dwte.any() and not dwpe.any()


@pytest.mark.skipif(not has_cpu(), reason="numformer._cpu is not built")
def test_bindings_refuse_float_ids_and_targets():
    from numformer import _cpu
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="cross_entropy_forward: targets has dtype float64; expected int64"):
        _cpu.cross_entropy_forward(z, np.array([1.5, 0.0]))
    with pytest.raises(TypeError, match="embedding_backward: ids has dtype float64; expected int64"):
        _cpu.embedding_backward(np.zeros((1, 2, 3), np.float32), np.array([[1.5, 0.0]]),
                                np.zeros((4, 3), np.float32))
    with pytest.raises(TypeError, match="BPE: byte id must be an integer, got float"):
        _cpu.BPE([1.5] + list(range(1, 256)), [], None)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("targets", [np.array([1.5, 0.0]), np.array([1.0, 0.0]), np.array([True, False])],
                         ids=["1.5", "1.0", "bool"])
def test_cross_entropy_refuses_non_integer_targets(name, targets):
    logits = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    with backend.use(name), pytest.raises(TypeError, match=rf"cross_entropy: targets has dtype {targets.dtype}"):
        cross_entropy.forward(logits, targets)


@pytest.mark.parametrize("name", BACKENDS)
def test_cross_entropy_ignore_index_must_be_an_integer(name):
    logits = np.zeros((2, 3), np.float32)
    with backend.use(name), pytest.raises(TypeError, match="ignore_index must be an integer"):
        cross_entropy.forward(logits, np.array([1, 0]), ignore_index=0.5)


@pytest.mark.skipif(not has_cpu(), reason="numformer._cpu is not built")
def test_backend_cross_entropy_refuses_float_targets():
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="cross_entropy_forward: targets has dtype float64"):
        backend.cross_entropy_forward(z, np.array([1.5, 0.0]), -100)


CFG = GPT2Config(vocab_size=13, n_positions=12, n_embd=16, n_layer=1, n_head=2)


@pytest.mark.parametrize("name", BACKENDS)
def test_model_refuses_float_ids_and_targets(name):
    model = GPT2.init(CFG, seed=0)
    ids = np.array([[1, 2, 3]])
    with backend.use(name):
        with pytest.raises(TypeError, match="ids has dtype float64"):
            model.forward(ids.astype(np.float64))
        with pytest.raises(TypeError, match="targets has dtype float64"):
            model.forward(ids, np.array([[2.5, 3.0, 4.0]]))


def test_quantized_model_refuses_float_ids():
    from numformer.quantize import quantize_model
    qmodel = quantize_model(GPT2.init(CFG, seed=0), int8_head=True)   # its own int8 embedding lookup
    with pytest.raises(TypeError, match="embedding: ids has dtype float64"):
        qmodel.forward(np.array([[1.0, 2.5]]))
    assert qmodel.forward(np.array([[1, 2]]))[0].shape == (1, 2, CFG.vocab_size)


def test_generation_refuses_non_integer_prompts():
    model = GPT2.init(CFG, seed=0)
    with pytest.raises(TypeError, match=r"prompt must hold integer token ids, got float 1.5"):
        generate(model, [1, 1.5], 2)
    with pytest.raises(TypeError, match=r"prompt 1 must hold integer token ids, got float 2.5"):
        generate_batch(model, [[1, 2], [2.5]], 2)
    with pytest.raises(TypeError, match=r"eot_id must hold integer token ids"):
        generate_batch(model, [[1, 2]], 2, eot_id=[1.5])
    assert len(generate(model, np.array([1, 2], np.int32), 2)) == 2        # NumPy integers are fine


def test_token_splits_refuse_float_tokens():
    with pytest.raises(TypeError, match="tokens has dtype float64"):
        TokenSplits(np.arange(100) + 0.5, block_size=4)
    assert len(TokenSplits(np.arange(100, dtype=np.uint16), block_size=4).train) == 90


def test_classification_report_refuses_float_labels():
    from numformer.finetune import classification_report
    with pytest.raises(TypeError, match="y_pred has dtype float64"):
        classification_report([0, 1], [0.0, 1.5], ["a", "b"])
    assert classification_report([0, 1], np.array([0, 1]), ["a", "b"])["accuracy"] == 1.0


def test_bert_refuses_float_ids_and_token_types():
    """BERT's own checks run before the embedding op: float token types used to be an IndexError."""
    from numformer.models.bert import load_bert
    model = load_bert(os.path.join(os.path.dirname(__file__), "fixtures", "tiny-bert"))
    ids = np.array([[1, 2, 3]])
    with pytest.raises(TypeError, match="ids has dtype float64"):
        model.forward(ids.astype(np.float64))
    with pytest.raises(TypeError, match="token_type_ids has dtype float64"):
        model.forward(ids, token_type_ids=np.zeros((1, 3)))
    model.forward(ids, token_type_ids=np.zeros((1, 3), dtype=np.int32))     # any integer dtype is fine
