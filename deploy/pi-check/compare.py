"""Comparing aarch64 with x86_64: model-input pixels, kernels, and the whole path.

Three comparisons per runtime and bundle, so that a difference is pinned down:

* ``preprocess``: the model-input pixels of every image must be identical: with
  ``resample = "exact"`` recipes fieldscope's decoding, denoising and resizing give
  the same pixels on ARM and x86. A difference fails (one grey level only warns with
  ``--lenient-preprocessing``, e.g. for bundles made before exact resampling, whose
  OpenCV INTER_AREA rounds differently on ARM); anything more always fails.
* ``denoise filters``: every denoise method at its defaults on a few images, so a
  filter that rounds differently on ARM is found before a bundle uses it (WARN for
  methods this bundle does not use; its own method is in ``preprocess``).
* ``model on identical input``: the aarch64 interpreter on the x86_64 tensors. Within
  the tolerance it passes (LiteRT's int8 and float kernels agree bit for bit). A runtime
  whose kernels round differently on ARM (tflite-runtime 2.14's int8 ones do, by a few
  output quantisation steps) warns, as long as every top-1 is the same and no
  probability moves more than ``--max-drift``; anything else fails.
* ``classify`` (``fieldscope edge classify``, file to answer): the top-1 and status
  must be identical for every image and no probability may move more than
  ``--max-drift``; smaller differences are explained by the two rows above.

``--strict`` turns every warning into a failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from steps import Context, Outcome

WHERE = "arm64 vs x86_64"


def _probabilities(record: dict[str, Any]) -> dict[str, float]:
    return {entry["label"]: float(entry["score"]) for entry in record["top_k"]}


def _describe(record: dict[str, Any]) -> str:
    top = record["top_k"][0]
    scores = ", ".join(f"{e['label']} {e['score']:.6f}" for e in record["top_k"])
    return f"top-1 {top['label']!r} {top['score']:.6f} ({record['status']}); all: {scores}"


def compare_classify(
    ctx: Context,
    label: str,
    bundle: str,
    arm: dict[str, dict[str, Any]],
    x86: dict[str, dict[str, Any]],
) -> Outcome:
    """Same images, same top-1 and status, no probability moved beyond the drift."""
    step = "classify"
    differences: list[str] = []
    worst = 0.0
    for rel in sorted(set(arm) | set(x86)):
        a, b = arm.get(rel), x86.get(rel)
        if a is None or b is None:
            differences.append(
                f"image {rel}: classified only on {'x86_64' if a is None else 'arm64'}"
            )
            continue
        pa, pb = _probabilities(a), _probabilities(b)
        diff = max(abs(pa.get(k, 0.0) - pb.get(k, 0.0)) for k in set(pa) | set(pb))
        worst = max(worst, diff)
        same_top = a["top_k"][0]["label"] == b["top_k"][0]["label"]
        if not same_top or a["status"] != b["status"] or diff > ctx.max_drift:
            differences.append(
                f"image {rel}, runtime {label}, bundle {bundle}: max |Δp| {diff:.6f} "
                f"(at most {ctx.max_drift:g}){'' if same_top else ', different top-1'}\n"
                f"        arm64:  {_describe(a)}\n        x86_64: {_describe(b)}"
            )
    if differences:
        shown = "\n      ".join(differences[:5])
        more = f"\n      ... and {len(differences) - 5} more" if len(differences) > 5 else ""
        problem = (
            f"aarch64 and x86_64 disagree on {len(differences)} of {len(set(arm) | set(x86))} "
            f"image(s) with {label} and bundle {bundle}:\n      {shown}{more}"
        )
        detail = f"{len(differences)} image(s) differ"
        return Outcome(step, WHERE, label, bundle, "FAIL", detail, 0.0, problem)
    detail = f"{len(arm)} images: same top-1, max |Δp| {worst:.6f}"
    if worst > ctx.tolerance:
        detail += " (explained by the rows above)"
    return Outcome(step, WHERE, label, bundle, "PASS", detail)


def compare_tensors(
    ctx: Context, label: str, bundle: str, arm_file: Path, x86_file: Path
) -> tuple[Outcome, Outcome]:
    """The ``preprocess`` and ``model on identical input`` rows."""
    arm, x86 = np.load(arm_file), np.load(x86_file)
    names = [str(n) for n in x86["names"]]
    pixels = np.abs(arm["tensors"].astype(np.int16) - x86["tensors"].astype(np.int16))
    per_image = pixels.reshape(len(names), -1).max(axis=1)
    worst = int(pixels.max())
    count = int((pixels > 0).sum())
    if worst == 0:
        preprocess = Outcome(
            "preprocess", WHERE, label, bundle, "PASS", f"{len(names)} images: identical pixels"
        )
    else:
        lenient = ctx.lenient_preprocessing and not ctx.strict
        status = "WARN" if worst <= 1 and lenient else "FAIL"
        images = [n for n, m in zip(names, per_image, strict=True) if m > 0]
        detail = (
            f"{count} of {pixels.size} pixel values differ (by up to {worst}) in "
            f"{len(images)} of {len(names)} images"
        )
        resample = str(x86["resample"]) if "resample" in x86 else "area"
        cause = (
            "The bundle's recipe shrinks with OpenCV's INTER_AREA (resample 'area', "
            "bundles made before exact resampling), which rounds differently on ARM: "
            "retrain and convert it for resample 'exact', or pass --lenient-preprocessing "
            "to accept one grey level. "
            if resample == "area"
            else "The image decoding, denoising or resizing of fieldscope.edge.preprocess "
            "rounds differently on ARM (see the 'denoise filters' row). "
        )
        problem = (
            f"the model-input pixels for bundle {bundle} ({label}'s venv) differ between "
            f"aarch64 and x86_64: {detail}, e.g. {', '.join(images[:3])}. {cause}A Pi "
            "then does not see exactly the pixels the model was trained and checked on; "
            "the probability differences of 'classify' come from here."
        )
        preprocess = Outcome("preprocess", WHERE, label, bundle, status, detail, 0.0, problem)

    model = _compare_outputs(
        ctx, label, bundle, names, pa=arm["probabilities"], pb=x86["probabilities"]
    )
    return preprocess, model


def compare_denoise(
    ctx: Context, label: str, bundle: str, arm_file: Path, x86_file: Path
) -> Outcome:
    """The ``denoise filters`` row: each method's output, aarch64 against x86_64."""
    step = "denoise filters"
    arm, x86 = np.load(arm_file), np.load(x86_file)
    methods = [k.removeprefix("denoise_") for k in x86.files if k.startswith("denoise_")]
    if not methods:
        return Outcome(step, WHERE, label, bundle, "SKIP", "no denoise outputs recorded")
    differing = []
    for method in methods:
        a, b = arm[f"denoise_{method}"], x86[f"denoise_{method}"]
        delta = np.abs(a.astype(np.int16) - b.astype(np.int16))
        if delta.max() > 0:
            count, worst = int((delta > 0).sum()), int(delta.max())
            differing.append(f"{method} ({count} of {delta.size} values, up to {worst})")
    images = len(x86[f"denoise_{methods[0]}"])
    if not differing:
        detail = f"{', '.join(methods)}: identical on {images} images"
        return Outcome(step, WHERE, label, bundle, "PASS", detail)
    detail = f"differ: {'; '.join(differing)}"
    problem = (
        f"with {label}'s OpenCV, these denoise filters give other pixels on aarch64 than "
        f"on x86_64 ({images} images, this bundle's resizing): {'; '.join(differing)}. "
        "A bundle whose recipe uses one of them will fail 'preprocess'; choose another "
        "filter for Pi stations."
    )
    status = "FAIL" if ctx.strict else "WARN"
    return Outcome(step, WHERE, label, bundle, status, detail, 0.0, problem)


def _output_step(ctx: Context, bundle: str) -> float | None:
    """The bundle's output quantisation step (None for a float output)."""
    manifest = json.loads((ctx.bundles[bundle] / "manifest.json").read_text())
    output = (manifest.get("quantization") or {}).get("output")
    return float(output["scale"]) if output else None


def _compare_outputs(
    ctx: Context, label: str, bundle: str, names: list[str], *, pa: np.ndarray, pb: np.ndarray
) -> Outcome:
    """Outputs of the aarch64 model on the x86_64 tensors against x86_64's own."""
    step = "model on identical input"
    diff = np.abs(pa.astype(np.float64) - pb.astype(np.float64)).max(axis=1)
    other_top = pa.argmax(axis=1) != pb.argmax(axis=1)
    worst = float(diff.max())
    differ = [i for i in range(len(names)) if other_top[i] or diff[i] > ctx.tolerance]
    if not differ:
        detail = f"{len(names)} images: same top-1, max |Δp| {worst:.6f}"
        return Outcome(step, WHERE, label, bundle, "PASS", detail)
    quantum = _output_step(ctx, bundle)
    steps = f" = {round(worst / quantum)} output steps" if quantum else ""
    detail = f"{len(differ)} of {len(names)} images differ, max |Δp| {worst:.6f}{steps}"
    lines = [
        f"image {names[i]}: max |Δp| {diff[i]:.6f}{', different top-1' if other_top[i] else ''}\n"
        f"        arm64:  {np.array2string(pa[i], precision=6)}\n"
        f"        x86_64: {np.array2string(pb[i], precision=6)}"
        for i in differ[:5]
    ]
    shown = "\n      ".join(lines)
    if other_top.any() or worst > ctx.max_drift or ctx.strict:
        problem = (
            f"{label} computes other outputs on aarch64 than on x86_64 from the same input "
            f"tensors with bundle {bundle}: {detail} (allowed: same top-1, |Δp| <= "
            f"{ctx.max_drift:g}). A kernel of this runtime is wrong or very differently "
            f"rounded on the Pi:\n      {shown}"
        )
        return Outcome(step, WHERE, label, bundle, "FAIL", detail, 0.0, problem)
    problem = (
        f"{label}'s kernels round differently on aarch64 than on x86_64: from the same "
        f"input tensors, bundle {bundle} gives {detail}, with the same top-1 everywhere. "
        "Expected for runtimes with separate ARM and x86 int8 kernels (tflite-runtime "
        f"2.14); LiteRT's agree exactly.\n      {shown}"
    )
    return Outcome(step, WHERE, label, bundle, "WARN", detail, 0.0, problem)
