"""The measured error of an int8 copy: what ``numformer quantize`` reports.

:func:`measure_int8_copy` compares a float GPT-2 with its int8 copy (as
read back from disk): the relative RMS reconstruction error of the int8
weights (:func:`weight_errors`) and the logits of both models on a fixed
probe input (:func:`probe_logits_error`). :func:`format_summary` turns
:func:`numformer.quantize.quantize_checkpoint`'s summary into the lines the
command prints. The quantization itself, the model and the file format are
in :mod:`numformer.quantize`; this module needs only an object with
``dequantize()`` for each int8 weight and two models with ``forward``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PROBE_TOKENS", "format_summary", "max_rel_error", "measure_int8_copy", "probe_logits_error",
           "weight_errors"]


def max_rel_error(w: np.ndarray, wq) -> float:
    """max over columns of max_i |w − q·s| / max_i |w|.

    Kept for callers of the summary, but not a useful quality figure: in any
    column of more than a few elements one of them rounds by nearly half a
    step, so this is the rounding bound 1/254 to three digits, whatever the
    weights. :func:`weight_errors` and :func:`probe_logits_error` measure.
    """
    amax = np.max(np.abs(w), axis=0)
    err = np.max(np.abs(w - wq.dequantize()), axis=0)
    return float(np.max(np.divide(err, amax, out=np.zeros_like(err), where=amax > 0), initial=0.0))


def weight_errors(pairs) -> dict:
    """Measured reconstruction error of ``(name, w, Int8Weight)`` triples.

    Per tensor, the relative RMS error ``‖w − q·s‖_F / ‖w‖_F`` (float64 sums);
    returns the figure over all the tensors together (``rel_rms``), the worst
    tensor's (``worst_rel_rms``, ``worst_name``) and the largest absolute
    element error (``max_abs``).
    """
    num = den = 0.0
    worst, worst_name, max_abs = 0.0, None, 0.0
    for name, w, wq in pairs:
        diff = w.astype(np.float64) - wq.dequantize().astype(np.float64)
        e2, w2 = float(np.sum(diff * diff)), float(np.sum(np.square(w, dtype=np.float64)))
        num, den = num + e2, den + w2
        rel = float(np.sqrt(e2 / w2)) if w2 > 0 else 0.0
        if worst_name is None or rel > worst:
            worst, worst_name = rel, name
        max_abs = max(max_abs, float(np.max(np.abs(diff), initial=0.0)))
    return {"rel_rms": float(np.sqrt(num / den)) if den > 0 else 0.0, "worst_rel_rms": worst,
            "worst_name": worst_name, "max_abs": max_abs}


PROBE_TOKENS = 64


def probe_logits_error(model, qmodel, ids: np.ndarray | None = None) -> dict:
    """Logits of the float model and its int8 copy on one probe input, compared.

    ``ids`` defaults to ``PROBE_TOKENS`` (at most the context) token ids drawn
    from a fixed seed, so the figure is reproducible. Returns ``max_abs``
    (max |Δlogit|), ``rel_rms`` (RMS of Δlogit / RMS of the float logits),
    ``top1_agree`` (fraction of positions whose argmax token is unchanged)
    and ``tokens`` (how many positions were compared).
    """
    cfg = model.cfg
    if ids is None:
        T = min(PROBE_TOKENS, cfg.n_positions)
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, T))
    ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
    ref = model.forward(ids)[0].astype(np.float64)
    got = qmodel.forward(ids)[0].astype(np.float64)
    diff = got - ref
    ref_rms = float(np.sqrt(np.mean(ref * ref)))
    return {"max_abs": float(np.max(np.abs(diff))),
            "rel_rms": float(np.sqrt(np.mean(diff * diff))) / ref_rms if ref_rms > 0 else 0.0,
            "top1_agree": float(np.mean(np.argmax(ref, -1) == np.argmax(got, -1))),
            "tokens": int(ids.size)}


def measure_int8_copy(model, written, head_name: str) -> dict:
    """The error entries of the summary: the float ``model`` against its int8 copy ``written``.

    ``weight_error`` over the int8 block weights, ``head_error`` for an int8
    head (``head_name``, stored transposed; None with a float head),
    ``logits_error`` on the probe, and the legacy ``max_rel_error`` /
    ``head_max_rel_error`` (:func:`max_rel_error`).
    """
    worst = max((max_rel_error(model.params[n], w) for n, w in written.qweights.items()), default=0.0)
    head_err = head_error = None
    if written.head is not None:
        head_t = np.ascontiguousarray(model.params[head_name].T)
        head_err = max_rel_error(head_t, written.head)
        head_error = weight_errors([(head_name, head_t, written.head)])
    return {"weight_error": weight_errors((n, model.params[n], w) for n, w in written.qweights.items()),
            "head_error": head_error, "logits_error": probe_logits_error(model, written),
            "max_rel_error": worst, "head_max_rel_error": head_err}


def format_summary(info: dict, out: str) -> str:
    """The lines ``numformer quantize`` prints for a :func:`quantize_checkpoint` summary."""
    src = info["source_bytes"]
    ratio = f" ({info['int8_bytes'] / src:.2f}x of {src / 1e6:.1f} MB)" if src else ""
    we, lg = info["weight_error"], info["logits_error"]
    head = "int8 head" if info["int8_head"] else "float32 head"
    lines = [f"wrote {out}: {info['int8_bytes'] / 1e6:.1f} MB{ratio}; "
             f"{info['quantized_params']:,} weights int8, {info['float_params']:,} float32, {head}",
             f"measured weight error ||w - q*s|| / ||w||: {we['rel_rms']:.2e} over the int8 blocks "
             f"(worst tensor {we['worst_name']}: {we['worst_rel_rms']:.2e}; max |w - q*s| {we['max_abs']:.2e})"]
    if info.get("head_error") is not None:
        lines.append(f"measured head error ||wte - q*s|| / ||wte||: {info['head_error']['rel_rms']:.2e} "
                     f"(max |w - q*s| {info['head_error']['max_abs']:.2e})")
    lines.append(f"logits on a {lg['tokens']}-token probe: max |diff| {lg['max_abs']:.2e}, "
                 f"RMS diff / RMS logit {lg['rel_rms']:.2e}, same top-1 token at {lg['top1_agree']:.1%} "
                 f"of positions")
    return "\n".join(lines)
