"""Config values that load but poison the model (issue 15, defect 6).

Every model config field is checked on load -- type and range -- and a bad
value is refused with an error naming the file, the field and the value,
instead of loading and giving NaN logits (``layer_norm_epsilon: -1``) or a
late ``TypeError``. A deeply nested ``config.json`` / ``tokenizer.json`` is
the loader's own error naming the file, never a bare ``RecursionError``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import numformer
from numformer import checkpoint, configcheck, jsonfile
from numformer.configcheck import ConfigFieldError
from numformer.models.bert import BertConfig, load_bert
from numformer.models.gpt2 import GPT2, GPT2Config
from numformer.pretrained import PretrainedError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY_GPT2 = os.path.join(FIXTURES, "tiny-gpt2")
TINY_BERT = os.path.join(FIXTURES, "tiny-bert")
NAN, INF = float("nan"), float("inf")
DEEP = "[" * 5000 + "]" * 5000


def _copy(tmp_path, src, name="m", **change):
    folder = tmp_path / name
    shutil.copytree(src, folder)
    _edit(folder / "config.json", **change)
    return str(folder)


def _edit(path, **change):
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(change)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)              # NaN / Infinity are written as JSON's non-standard literals


def _message_names(exc, file, field, value):
    text = str(exc)
    assert file in text, text
    assert field in text, text
    assert repr(value) in text or str(value) in text, text


# ----------------------------------------------------------------------------- GPT-2: Hugging Face folders

GPT2_BAD = [
    ("layer_norm_epsilon", -1), ("layer_norm_epsilon", NAN), ("layer_norm_epsilon", "1e-5"),
    ("layer_norm_epsilon", 0), ("layer_norm_epsilon", INF), ("layer_norm_epsilon", 1e-60),
    ("layer_norm_epsilon", True), ("layer_norm_epsilon", None), ("layer_norm_epsilon", [1e-5]),
    ("n_layer", True), ("n_layer", "two"), ("n_layer", 2.0), ("n_layer", 0), ("n_layer", -1),
    ("n_layer", 2**40), ("n_layer", 10**6), ("n_positions", 2**40), ("n_head", False), ("n_head", 3), ("n_embd", 64.5), ("n_positions", None),
    ("vocab_size", True), ("vocab_size", 0), ("n_inner", 0), ("n_inner", True), ("n_inner", "256"),
    ("activation_function", "relu"), ("activation_function", None), ("activation_function", []),
    ("resid_pdrop", 1.0), ("resid_pdrop", -0.1), ("resid_pdrop", "0.1"), ("resid_pdrop", True),
    ("resid_pdrop", NAN), ("attn_pdrop", 1.5), ("embd_pdrop", "x"), ("initializer_range", NAN),
    ("initializer_range", -0.02), ("n_ctx", "32"), ("scale_attn_weights", 1), ("scale_attn_weights", "true"),
    ("tie_word_embeddings", "false"), ("add_cross_attention", 0), ("use_cache", "yes"),
    ("eos_token_id", 500), ("eos_token_id", -1), ("bos_token_id", 499.0), ("pad_token_id", True),
]


@pytest.mark.parametrize("field, value", GPT2_BAD)
def test_bad_gpt2_config_value_is_refused_naming_field_value_and_file(tmp_path, field, value):
    folder = _copy(tmp_path, TINY_GPT2, **{field: value})
    with pytest.raises(PretrainedError) as info:
        numformer.from_pretrained(folder)
    _message_names(info.value, os.path.join(folder, "config.json"), field,
                   value if not (isinstance(value, float) and math.isnan(value)) else "nan")


def test_the_reported_poison_values_never_reach_forward(tmp_path):
    """The issue's case: epsilon -1 loaded and forward gave NaN logits."""
    for value in (-1, NAN, "1e-5"):
        folder = _copy(tmp_path, TINY_GPT2, name=f"m{value!s}", layer_norm_epsilon=value)
        with pytest.raises(ValueError, match=r"layer_norm_epsilon must be a finite number >= "):
            numformer.from_pretrained(folder)


def test_good_gpt2_values_still_load(tmp_path):
    folder = _copy(tmp_path, TINY_GPT2, layer_norm_epsilon=1e-6, n_inner=256, resid_pdrop=0.0,
                   eos_token_id=None, pad_token_id=0, n_ctx=32)
    model = numformer.from_pretrained(folder)
    assert model.cfg.layer_norm_epsilon == 1e-6 and model.cfg.n_inner == 256
    assert np.all(np.isfinite(model.forward(np.arange(8)[None])[0]))


# ----------------------------------------------------------------------------- numformer's own checkpoints


@pytest.fixture(scope="module")
def own_checkpoint(tmp_path_factory):
    from numformer.tokenizers import CharTokenizer

    path = str(tmp_path_factory.mktemp("ck") / "checkpoint")
    model = GPT2.init(GPT2Config(vocab_size=9, n_positions=8, n_embd=8, n_layer=1, n_head=2), seed=0)
    checkpoint.save(path, model, CharTokenizer.train("abcdefgh"))
    return path


@pytest.mark.parametrize("field, value", [
    ("layer_norm_epsilon", -1), ("layer_norm_epsilon", "tiny"), ("n_layer", True), ("n_head", 3),
    ("dropout", 1.0), ("dropout", NAN), ("n_embd", 8.0), ("activation_function", "swish"),
    ("attn_pdrop", 2), ("n_ctx", False),
])
def test_bad_value_in_a_numformer_checkpoint_is_refused(tmp_path, own_checkpoint, field, value):
    folder = str(tmp_path / "ck")
    shutil.copytree(own_checkpoint, folder)
    _edit(os.path.join(folder, "config.json"), **{field: value})
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load_model(folder)
    _message_names(info.value, os.path.join(folder, "config.json"), field,
                   value if not (isinstance(value, float) and math.isnan(value)) else "nan")


def test_int8_folder_config_is_validated_too(tmp_path, own_checkpoint):
    from numformer.quantize import quantize_checkpoint

    out = str(tmp_path / "q")
    quantize_checkpoint(own_checkpoint, out)
    cfg_file = os.path.join(out, "config.json")
    with open(cfg_file) as f:
        good = json.load(f)
    cases = [({"layer_norm_epsilon": -1}, r"layer_norm_epsilon must be"),
             ({"n_layer": True}, r"n_layer must be a positive integer"),
             ({"quantization": {**good["quantization"], "bits": 8.0}}, r"bits=8\.0"),
             ({"quantization": {**good["quantization"], "format_version": True}}, r"format_version=True"),
             ({"quantization": {**good["quantization"], "symmetric": False}}, r"'symmetric' must be True"),
             ({"quantization": {**good["quantization"], "granularity": "per_tensor"}}, r"'granularity'")]
    for change, pattern in cases:
        with open(cfg_file, "w") as f:
            json.dump({**good, **change}, f)
        with pytest.raises(checkpoint.CheckpointError, match=pattern):
            checkpoint.load_model(out)
        with pytest.raises(checkpoint.CheckpointError, match=pattern):
            numformer.from_pretrained(out)


# ----------------------------------------------------------------------------- BERT


BERT_BAD = [
    ("layer_norm_eps", -1), ("layer_norm_eps", NAN), ("layer_norm_eps", "1e-12"), ("layer_norm_eps", 0),
    ("hidden_act", "relu"), ("num_hidden_layers", True), ("num_hidden_layers", 2.0),
    ("num_attention_heads", 5), ("hidden_dropout_prob", 1.0), ("attention_probs_dropout_prob", 2),
    ("attention_probs_dropout_prob", "0.1"), ("pad_token_id", 99), ("pad_token_id", -1), ("pad_token_id", True),
    ("type_vocab_size", 0), ("initializer_range", NAN), ("intermediate_size", "37"),
    ("max_position_embeddings", None), ("position_embedding_type", "relative_key"),
    ("is_decoder", "no"), ("add_cross_attention", 1), ("num_hidden_layers", 10**6), ("vocab_size", 2**40),
]


@pytest.mark.parametrize("field, value", BERT_BAD)
def test_bad_bert_config_value_is_refused_naming_field_value_and_file(tmp_path, field, value):
    folder = _copy(tmp_path, TINY_BERT, **{field: value})
    for load in (load_bert, numformer.from_pretrained):
        with pytest.raises(ValueError) as info:
            load(folder)
        _message_names(info.value, os.path.join(folder, "config.json"), field,
                       value if not (isinstance(value, float) and math.isnan(value)) else "nan")


def test_a_huge_config_next_to_small_weights_fails_before_allocating(tmp_path):
    """Sizes within the limits but far beyond the file: the shapes are compared first
    (this used to try to allocate hundreds of GB and end in MemoryError)."""
    g = _copy(tmp_path, TINY_GPT2, name="g", n_positions=2**31 - 1)
    with pytest.raises(PretrainedError, match=r"wpe\.weight' has shape \(32, 64\).*needs \(2147483647, 64\)"):
        numformer.from_pretrained(g)
    b = _copy(tmp_path, TINY_BERT, name="b", vocab_size=2**31 - 1)
    with pytest.raises(ValueError, match=r"word_embeddings\.weight' has shape \(99, 32\)"):
        load_bert(b)


@pytest.mark.parametrize("field", ["is_decoder", "add_cross_attention"])
def test_bert_options_that_change_the_math_are_refused(tmp_path, field):
    with pytest.raises(ValueError, match=rf"config\.json: {field}=true is not supported"):
        load_bert(_copy(tmp_path, TINY_BERT, **{field: True}))


# ----------------------------------------------------------------------------- the dataclasses themselves


def test_config_fields_are_normalized_and_errors_carry_the_field():
    cfg = GPT2Config(vocab_size=np.int64(9), n_positions=np.int32(8), n_embd=8, n_layer=1, n_head=2,
                     layer_norm_epsilon=np.float32(1e-5)).validate()
    assert type(cfg.vocab_size) is int and type(cfg.layer_norm_epsilon) is float
    json.dumps(cfg.to_dict())                                 # NumPy scalars would not serialize
    with pytest.raises(ConfigFieldError) as info:
        GPT2Config(layer_norm_epsilon=-1.0).validate("cfg.json")
    assert (info.value.source, info.value.field, info.value.value) == ("cfg.json", "layer_norm_epsilon", -1.0)
    with pytest.raises(ConfigFieldError, match=r"n_layer must be a positive integer.*got True"):
        GPT2(GPT2Config(n_layer=True))
    with pytest.raises(ConfigFieldError, match=r"hidden_size must be divisible by num_attention_heads"):
        BertConfig(hidden_size=10, num_attention_heads=3).validate()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "dropout",
                              "layer_norm_epsilon", "activation_function", "n_inner"]),
       value=st.one_of(st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                       st.none(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
                       st.sampled_from(["gelu", "gelu_new", "relu", 1e-5, 1e-45, 0.5, 1, 64])))
def test_random_config_values_are_refused_or_give_finite_logits(field, value):
    """Either the config is refused (naming the field), or the model it builds is sound."""
    base = dict(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    try:
        cfg = GPT2Config.from_dict({**base, field: value}, "cfg.json")
    except ValueError as exc:
        assert f"cfg.json: {field} must be" in str(exc) or (field == "n_embd" and "n_embd must be" in str(exc)) \
            or (field == "n_head" and "n_embd must be divisible" in str(exc)), str(exc)
        return
    model = GPT2.init(cfg, seed=0)
    T = min(4, cfg.n_positions)
    logits = model.forward(np.arange(T)[None] % cfg.vocab_size)[0]
    assert np.all(np.isfinite(logits))


# ----------------------------------------------------------------------------- deeply nested / malformed JSON


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def test_deep_config_json_is_the_loaders_error_naming_the_file(tmp_path, own_checkpoint):
    gpt2 = _copy(tmp_path, TINY_GPT2, name="g")
    _write(os.path.join(gpt2, "config.json"), DEEP)
    with pytest.raises(PretrainedError, match=re.escape(os.path.join(gpt2, "config.json")) + ".*nested"):
        numformer.from_pretrained(gpt2)
    bert = _copy(tmp_path, TINY_BERT, name="b")
    _write(os.path.join(bert, "config.json"), '{"a": ' + DEEP + "}")
    with pytest.raises(ValueError, match=re.escape(os.path.join(bert, "config.json")) + ".*nested"):
        load_bert(bert)
    ck = str(tmp_path / "ck")
    shutil.copytree(own_checkpoint, ck)
    _write(os.path.join(ck, "config.json"), DEEP)
    with pytest.raises(checkpoint.CheckpointError, match=r"config\.json.*nested"):
        checkpoint.load_model(ck)
    _write(os.path.join(ck, "config.json"), "[" * 150 + "]" * 150)   # parses, but is no config
    with pytest.raises(checkpoint.CheckpointError, match=r"nested 150 levels"):
        checkpoint.load_model(ck)


def test_deep_or_broken_tokenizer_files_are_the_loaders_error(tmp_path, own_checkpoint):
    from numformer.tokenizers import load_tokenizer
    from numformer.tokenizers.wordpiece import load_wordpiece

    own = tmp_path / "tok.json"
    _write(own, '{"kind": "char", "chars": ' + DEEP + "}")
    with pytest.raises(ValueError, match=r"bad tokenizer file .*tok\.json: JSON nested 5001 levels"):
        load_tokenizer(str(own))
    ck = str(tmp_path / "ck")
    shutil.copytree(own_checkpoint, ck)
    _write(os.path.join(ck, checkpoint.TOKENIZER_FILE), DEEP)
    with pytest.raises(checkpoint.CheckpointError, match=r"numformer_tokenizer\.json.*nested"):
        checkpoint.load_tokenizer(ck)
    wp = tmp_path / "wp"
    shutil.copytree(os.path.join(FIXTURES, "wordpiece"), wp)
    _write(wp / "tokenizer.json", '{"model": ' + DEEP + "}")
    for load in (load_wordpiece, numformer.load_tokenizer):
        with pytest.raises(ValueError, match=r"tokenizer\.json.*nested"):
            load(str(wp / "tokenizer.json"))
    g = _copy(tmp_path, TINY_GPT2, name="g")
    _write(os.path.join(g, "vocab.json"), DEEP)
    with pytest.raises(ValueError, match=r"vocab\.json.*nested"):
        numformer.load_tokenizer(g)
    _write(os.path.join(g, "tokenizer.json"), DEEP)       # the WordPiece probe must not crash on it either
    with pytest.raises(ValueError, match=r"\.json.*nested"):
        numformer.load_tokenizer(g)


def test_deep_safetensors_index_and_sentence_files(tmp_path):
    from numformer.sentence import load_sentence_encoder

    g = _copy(tmp_path, TINY_GPT2, name="g")
    os.rename(os.path.join(g, "model.safetensors"), os.path.join(g, "shard.safetensors"))
    _write(os.path.join(g, "model.safetensors.index.json"), DEEP)
    with pytest.raises(PretrainedError, match=r"model\.safetensors\.index\.json.*nested"):
        numformer.from_pretrained(g)
    b = _copy(tmp_path, TINY_BERT, name="b")
    shutil.copy(os.path.join(FIXTURES, "wordpiece", "tokenizer.json"), os.path.join(b, "tokenizer.json"))
    _write(os.path.join(b, "modules.json"), DEEP)
    with pytest.raises(ValueError, match=r"modules\.json.*nested"):
        load_sentence_encoder(b)


def test_jsonfile_turns_every_parse_failure_into_its_error(tmp_path):
    cases = {b"\xff{}": "not valid UTF-8", b'{"a": 1,}': "line 1: not valid JSON",
             b"1" * 5000: "not valid JSON", DEEP.encode(): "JSON nested 5000 levels deep",
             b'["[[[[", "\\"[[[[", ' + b", ".join([b"[]"] * 200) + b"]": None}
    for data, problem in cases.items():
        path = tmp_path / "x.json"
        path.write_bytes(data)
        if problem is None:                                    # brackets in strings do not count
            assert jsonfile.load(path)[0] == "[[[["
            continue
        with pytest.raises(jsonfile.JSONFileError, match=re.escape(str(path)) + ": " + problem):
            jsonfile.load(path)
        with pytest.raises(KeyError, match="custom"):
            jsonfile.load(path, error=lambda src, p: KeyError("custom"))
    with pytest.raises(FileNotFoundError):
        jsonfile.load(tmp_path / "absent.json")


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n'),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\a', max_size=3),
                                                                          c, max_size=3), max_leaves=25))
def test_nesting_depth_scan_matches_the_parsed_document(obj):
    def depth(o):
        if isinstance(o, (list, dict)):
            return 1 + max((depth(v) for v in (o.values() if isinstance(o, dict) else o)), default=0)
        return 0

    assert jsonfile._depth(json.dumps(obj).encode(), -1) == depth(obj)


# ----------------------------------------------------------------------------- tokenizer / sentence / classifier settings


def test_wordpiece_settings_are_typed(tmp_path):
    from numformer.tokenizers.wordpiece import load_wordpiece

    src = os.path.join(FIXTURES, "wordpiece")
    folder = tmp_path / "vt"
    folder.mkdir()
    shutil.copy(os.path.join(src, "vocab.txt"), folder / "vocab.txt")
    _write(folder / "tokenizer_config.json", json.dumps({"do_lower_case": "false"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: do_lower_case must be true or false, got 'false'"):
        load_wordpiece(str(folder))
    _write(folder / "tokenizer_config.json", "{}")
    _write(folder / "sentence_bert_config.json", json.dumps({"max_seq_length": True}))
    with pytest.raises(ValueError, match=r"sentence_bert_config\.json: max_seq_length must be an integer >= 3"):
        load_wordpiece(str(folder))
    with open(os.path.join(src, "tokenizer.json"), encoding="utf-8") as f:
        d = json.load(f)
    d["normalizer"]["lowercase"] = "false"
    _write(tmp_path / "tokenizer.json", json.dumps(d))
    with pytest.raises(ValueError, match=r"tokenizer\.json: lowercase must be true or false, got 'false'"):
        load_wordpiece(str(tmp_path / "tokenizer.json"))


def test_sentence_pooling_flags_are_bools_and_module_paths_stay_inside(tmp_path):
    from numformer.sentence import load_sentence_encoder

    b = _copy(tmp_path, TINY_BERT, name="b")
    shutil.copy(os.path.join(FIXTURES, "wordpiece", "tokenizer.json"), os.path.join(b, "tokenizer.json"))
    _write(os.path.join(b, "modules.json"), json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    os.mkdir(os.path.join(b, "1_Pooling"))
    pool = os.path.join(b, "1_Pooling", "config.json")
    _write(pool, json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": "false"}))
    with pytest.raises(ValueError, match=r"1_Pooling.config\.json: pooling_mode_mean_tokens must be true or false"):
        load_sentence_encoder(b)
    _write(pool, json.dumps({"pooling_mode_mean_tokens": True, "word_embedding_dimension": 33}))
    with pytest.raises(ValueError, match=r"word_embedding_dimension must be the encoder's hidden_size \(32\)"):
        load_sentence_encoder(b)
    _write(pool, json.dumps({"pooling_mode_mean_tokens": True, "word_embedding_dimension": 32}))
    assert load_sentence_encoder(b).pooling == "mean"
    _write(os.path.join(b, "modules.json"), json.dumps([
        {"path": "../../elsewhere", "type": "sentence_transformers.models.Pooling"}]))
    with pytest.raises(ValueError, match=r"modules\.json: module path '\.\./\.\./elsewhere' must be a folder inside"):
        load_sentence_encoder(b)


def test_classifier_settings_are_checked():
    ok = {"id2label": {"0": "a", "1": "b"}, "num_labels": 2, "numformer": {"pooling": "last", "max_length": 16}}
    assert configcheck.classifier_settings(ok, "c.json", ("last",), "last") == {"pooling": "last", "max_length": 16}
    bad = [({"numformer": {"pooling": "mean"}}, r"c\.json: numformer\.pooling must be one of 'last'"),
           ({"numformer": {"max_length": True}}, r"numformer\.max_length must be a positive integer"),
           ({"numformer": {"max_length": 0}}, r"numformer\.max_length"),
           ({"numformer": ["last"]}, r"c\.json: numformer must be an object"),
           ({"num_labels": 3}, r"num_labels must be the number of id2label entries \(2\), got 3"),
           ({"num_labels": True}, r"num_labels must be a positive integer"),
           ({"id2label": {"0": ["a"], "1": "b"}}, r"id2label\['0'\] must be a label name")]
    for change, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            configcheck.classifier_settings({**ok, **change}, "c.json", ("last",), "last")


def test_gpt2_classifier_folder_with_bad_settings_is_refused(tmp_path):
    from numformer.finetune import GPT2Classifier, load_classifier, save_classifier

    body = numformer.from_pretrained(TINY_GPT2)
    folder = tmp_path / "clf"
    save_classifier(GPT2Classifier.from_body(body, ["a", "b"], 499), folder, tokenizer_from=TINY_GPT2)
    for change, pattern in [({"numformer": {"pooling": "last", "max_length": True}}, r"numformer\.max_length"),
                            ({"initializer_range": NAN}, r"initializer_range must be"),
                            ({"layer_norm_epsilon": -1}, r"layer_norm_epsilon must be")]:
        _edit(folder / "config.json", **change)
        with pytest.raises(ValueError, match=r"clf.config\.json.*" + pattern):
            load_classifier(folder)
        _edit(folder / "config.json", numformer={"pooling": "last", "max_length": None}, initializer_range=0.02,
              layer_norm_epsilon=1e-5)
    assert load_classifier(folder)[0].max_length is None


def test_gpt2_tokenizer_json_added_token_flags_are_typed(tmp_path):
    from numformer.tokenizers.gpt2 import GPT2Tokenizer

    with open(os.path.join(TINY_GPT2, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(TINY_GPT2, "merges.txt"), encoding="utf-8") as f:
        merges = [line for line in f.read().splitlines() if line and not line.startswith("#version")]
    eot = max(vocab.values())
    doc = {"model": {"type": "BPE", "vocab": vocab, "merges": merges}, "pre_tokenizer": {"type": "ByteLevel"},
           "added_tokens": [{"id": eot, "content": "<|endoftext|>", "special": True}]}
    path = tmp_path / "tokenizer.json"
    _write(path, json.dumps(doc))
    assert GPT2Tokenizer.from_tokenizer_json(str(path)).eot_id == eot
    for bad in ({"special": "false"}, {"special": 1}, {"id": True}):
        doc["added_tokens"] = [{"id": eot, "content": "<|endoftext|>", "special": True, **bad}]
        _write(path, json.dumps(doc))
        with pytest.raises(ValueError, match=r"tokenizer\.json: added_tokens\[0\]: 'special' must be true or false"):
            GPT2Tokenizer.from_tokenizer_json(str(path))


def test_deep_line_of_a_jsonl_training_file_names_file_and_line(tmp_path):
    from numformer.finetune import read_labelled

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n' + DEEP + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        read_labelled(path)
