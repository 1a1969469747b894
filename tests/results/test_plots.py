"""qlab.results.plots on a fabricated sweep (fake_results.fake_run): every plot written as PNG and
SVG, the same bytes when drawn again, the random-weights set without quality plots, bars coloured
by quantization type, the Pareto front's numbered listing, one loss-curve panel per optimizer,
and the generation plot's panels."""

import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from fake_results import fake_run
from qlab.results import frame, plots, tables

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Pareto front by hand (lower peak and lower eval loss are better):
    nf4+DQ (9.5 GiB, 1.12), nf4 (11, 1.10 mean of 1.08 and 1.12), bf16 (20, 1.05) trade memory for loss;
    fp4 (13, 1.4) is beaten by nf4 on both. nf4 has two seeds; nf4 with adamw adds an optimizer."""
    root = tmp_path_factory.mktemp("res") / "syn"
    fake_run(root, "bf16", peak=20.0, tps=2000.0, eval_loss=1.05)
    fake_run(root, "nf4", seed=0, peak=11.0, tps=1000.0, eval_loss=1.08, train_loss=2.0)
    fake_run(root, "nf4", seed=1, peak=11.0, tps=1100.0, eval_loss=1.12, train_loss=2.2)
    fake_run(root, "nf4", dq=True, peak=9.5, tps=950.0, eval_loss=1.12)
    fake_run(root, "fp4", peak=13.0, tps=900.0, eval_loss=1.4)
    fake_run(root, "nf4", optim="adamw", peak=10.8, tps=1050.0, eval_loss=1.3)
    runs = frame.load_runs(root)
    arms = tables.arms(runs)
    curves = frame.load_curves(root, runs)
    varying = [c for c in ("quant_label", "optim", "adapter") if runs[c].nunique() > 1]
    return runs, arms, curves, varying


def svg_texts(path) -> list[str]:
    return [t.text for t in ET.parse(path).iter("{http://www.w3.org/2000/svg}text") if t.text]


ALL = ("memory_breakdown", "throughput", "loss_curves", "eval_loss", "memory_vs_quality")


def test_all_plots_written_as_png_and_svg_with_captions(sweep, tmp_path):
    runs, arms, curves, varying = sweep
    captions = plots.all_plots(runs, arms, curves, varying, tmp_path / "plots")
    assert list(captions) == list(ALL) and all(len(c) > 50 for c in captions.values())
    for name in ALL:
        png, svg = tmp_path / "plots" / f"{name}.png", tmp_path / "plots" / f"{name}.svg"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
        assert ET.parse(svg).getroot().tag == "{http://www.w3.org/2000/svg}svg"


def test_random_weights_get_no_quality_plots(sweep, tmp_path):
    runs, arms, curves, varying = sweep
    captions = plots.all_plots(runs, arms, curves, varying, tmp_path, quality=False)
    assert list(captions) == ["memory_breakdown", "throughput", "loss_curves"]
    assert captions["loss_curves"].startswith("Random weights: these curves show that training ran, not quality.")
    assert sorted(p.stem for p in tmp_path.glob("*.svg")) == ["loss_curves", "memory_breakdown", "throughput"]
    assert "Train loss per step: random weights, not quality" in svg_texts(tmp_path / "loss_curves.svg")


def test_the_same_results_draw_the_same_bytes(sweep, tmp_path):
    runs, arms, curves, varying = sweep
    for out in ("a", "b"):
        plots.throughput(arms, varying, tmp_path / out / "throughput")
        plots.memory_vs_quality(arms, varying, tmp_path / out / "mvq")
    for name in ("throughput.svg", "throughput.png", "mvq.svg", "mvq.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_bars_are_coloured_by_quantization_type(sweep, tmp_path):
    _, arms, _, varying = sweep
    plots.throughput(arms, varying, tmp_path / "throughput")
    fills = set(re.findall(r"fill: (#[0-9a-f]{6})", (tmp_path / "throughput.svg").read_text()))
    for q in ("bf16", "nf4", "fp4"):
        assert plots.QUANT_COLORS[q].lower() in fills, q
    assert plots.QUANT_COLORS["int8"].lower() not in fills  # no int8 run, no int8 colour
    assert plots.color("int8") == plots.QUANT_COLORS["int8"] and plots.color("e4m3") == plots.OTHER_COLOR
    # the labels name the optimizer too, since it varies here
    assert "nf4  adamw" in svg_texts(tmp_path / "throughput.svg")


def test_memory_vs_quality_lists_the_pareto_front(sweep, tmp_path):
    _, arms, _, _ = sweep
    one_optim = arms[arms.optim == "paged_adamw_32bit"].reset_index(drop=True)
    plots.memory_vs_quality(one_optim, [], tmp_path / "mvq")
    texts = svg_texts(tmp_path / "mvq.svg")
    listing = texts[texts.index("Pareto front:") + 1:]
    assert listing == ["1: nf4+DQ  (9.50 GiB, eval loss 1.1200)", "2: nf4  (11.00 GiB, eval loss 1.1000)",
                       "3: bf16  (20.00 GiB, eval loss 1.0500)"]


def test_loss_curves_one_panel_per_varying_optimizer(sweep, tmp_path):
    runs, _, curves, varying = sweep
    assert "optim" in varying
    plots.loss_curves(runs, curves, varying, tmp_path / "curves")
    texts = svg_texts(tmp_path / "curves.svg")
    assert "optim=adamw" in texts and "optim=paged_adamw_32bit" in texts
    plots.loss_curves(runs[runs.optim == "adamw"], curves, [], tmp_path / "one")
    assert "all configurations" in svg_texts(tmp_path / "one.svg")


def test_memory_breakdown_names_the_peak_source(sweep, tmp_path):
    runs, arms, _, varying = sweep
    plots.memory_breakdown(runs, arms, varying, tmp_path / "mem")
    texts = svg_texts(tmp_path / "mem.svg")
    assert "Peak memory breakdown per configuration (peak: NVML device used)" in texts
    # every segment in the legend, and torch's peak tick since the peak is NVML's, not torch's
    assert {name for name, _, _ in plots.SEGMENTS} <= set(texts) and "torch peak allocated" in texts


def test_ci_errors_are_distances_and_unknown_is_zero():
    arms = pd.DataFrame({"tok_s": [10.0, 5.0], "tok_s_ci95_low": [8.0, math.nan], "tok_s_ci95_high": [13.0, math.nan]})
    mean, err = plots._mean_err(arms, "tok_s")
    assert mean.tolist() == [10.0, 5.0] and err.tolist() == [[2.0, 0.0], [3.0, 0.0]]
    mean, err = plots._mean_err(arms[["tok_s"]], "tok_s")  # no interval columns at all: no error bars
    assert err.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_generation_plot_draws_the_panels_that_have_numbers(tmp_path):
    table = pd.DataFrame({
        "quant_label": ["bf16", "nf4+DQ"], "quant": ["bf16", "nf4"], "dq": ["off", "on"], "adapter": ["none", "none"],
        "ttft_ms": [12.0, 20.0], "ttft_ms_ci95_low": [11.0, 18.0], "ttft_ms_ci95_high": [13.0, 22.0],
        "decode_tok_s_b1": [300.0, 150.0], "decode_tok_s_b8": [math.nan, math.nan]})
    caption = plots.generation(table, [1, 8], tmp_path / "gen")
    assert "B (N - 1) / (T_N - T_1)" in caption
    texts = svg_texts(tmp_path / "gen.svg")
    assert "time to first token, batch 1 (ms)" in texts and "decode tok/s, batch 1" in texts
    assert "decode tok/s, batch 8" not in texts  # no number in that column: no panel
    assert "bf16  none" in texts and "nf4+DQ  none" in texts
