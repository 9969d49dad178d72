"""A study's verdicts are computed from its record by one stated rule (aetrack.tracking.reports.verdicts): small synthetic
records in the format of `StudyResult.as_dict()`, and the records the documentation quotes."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from scipy.special import betainc

from aetrack.tracking.reports import verdicts

QUESTIONS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "questions"


def cell(setting: dict, **metrics: list[float]) -> dict:
    """One setting of a record: per-seed metrics as `StudyResult.as_dict()` writes them."""
    seeds = max(len(v) for v in metrics.values())
    return {"setting": setting, "run_ids": [f"run{i}" for i in range(seeds)],
            "metrics": [{m: v[i] for m, v in metrics.items() if i < len(v)} for i in range(seeds)],
            "summary": {m: None for m in metrics}}


def record(*cells: dict, study: str = "made-up") -> dict:
    return {"study": study, "dataset": "digits", "cells": list(cells)}


def test_welch_p_is_the_textbook_value():
    # R: t.test(c(1, 2, 3), c(4, 5, 6)) -> t = -3.6742, df = 4, p-value = 0.02131
    assert verdicts.welch_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.02131, abs=1e-5)
    # Unequal spreads and sizes, by the formula: Welch-Satterthwaite degrees of freedom, the t distribution's tail
    # as a regularised incomplete beta function
    a, b = [1, 2, 3, 4], [2, 6, 10]
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    assert verdicts.welch_p(a, b) == pytest.approx(betainc(df / 2, 0.5, df / (df + t * t)), rel=1e-9)
    assert verdicts.welch_p([8, 8, 8], [8, 8, 8]) == 1.0 and verdicts.welch_p([8, 8, 8], [5, 5, 5]) == 0.0


def test_holm_steps_down_and_stays_monotone():
    assert verdicts.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert verdicts.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])


def test_a_difference_beats_in_the_metrics_direction_and_a_small_one_is_not_shown():
    r = record(cell({"model": "ae"}, recon_loss=[10.0, 10.1, 9.9], psnr=[20.0, 20.2, 19.8], kl=[1.0, 1.1, 0.9]),
               cell({"model": "vae"}, recon_loss=[12.0, 12.1, 11.9], psnr=[20.1, 19.7, 20.3], kl=[3.0, 3.1, 2.9]))
    sentences = {c.metric: verdicts.sentence(c) for c in verdicts.comparisons(r)}
    assert sentences["recon_loss"].startswith("ae beats vae on `recon_loss` by 2.00 (p ")  # lower is better
    assert sentences["psnr"].startswith("no difference shown on `psnr` with 3 seeds (p = ")
    assert sentences["kl"].startswith("vae is higher than ae on `kl` by 2.00 (p ")  # no better side: no "beats"


def test_fewer_than_three_seeds_a_side_is_not_tested():
    r = record(cell({"model": "ae"}, fcd=[40.0]), cell({"model": "vae"}, fcd=[140.0]))
    [c] = verdicts.comparisons(r)
    assert c.p is None and verdicts.sentence(c) == "not tested on `fcd`: 1 seed"
    r = record(cell({"model": "ae"}, fcd=[40.0, 41.0, 39.0]), cell({"model": "vae"}, fcd=[140.0, 141.0]))
    assert verdicts.sentence(verdicts.comparisons(r)[0]) == "not tested on `fcd`: 2 and 3 seeds"


def test_pairs_differ_in_one_axis_keys_that_change_together_are_one_and_numbers_compare_neighbours():
    settings = [{"model": m, "latent_dim": d, "arch": a, "hidden": h}
                for m in ("ae", "vae") for d in (2, 8, 32) for a, h in (("mlp", (256, 128)), ("conv", (32, 64)))]
    assert verdicts.axes(settings) == [("model",), ("latent_dim",), ("arch", "hidden")]
    found = verdicts.pairs(settings)
    by_axis = {axis: sum(1 for a, _, _ in found if a[0] == axis) for axis in ("model", "latent_dim", "arch")}
    assert by_axis == {"model": 6, "latent_dim": 8, "arch": 6}  # 2 vs 8 and 8 vs 32, never 2 vs 32
    assert all(abs(settings[i]["latent_dim"] - settings[j]["latent_dim"]) in (6, 24)
               for axis, i, j in found if axis[0] == "latent_dim")


def test_a_new_axis_and_a_new_metric_need_no_code():
    """The grids grow: a setting and a metric the module has never seen are compared by the same rule."""
    r = record(*(cell({"model": "vae", "beta": b, "prior": p}, made_up_score=[b + i * 0.01 for i in range(3)])
                 for b in (0.5, 1.0, 4.0) for p in ("normal", "mog", "vamp")))
    found = verdicts.comparisons(r)
    assert {c.axis for c in found} == {"beta", "prior"}
    assert sum(c.axis == "prior" for c in found) == 3 * 3 and sum(c.axis == "beta" for c in found) == 3 * 2
    assert any(verdicts.sentence(c).startswith("beta 4.0 is higher than beta 1.0 on `made_up_score`") for c in found)


def test_outputs_of_one_setting_are_compared_at_each_noise_level():
    r = record(cell({"model": "ae"}, recon_loss=[16.0, 16.1, 15.9]),
               cell({"model": "dae", "noise": "gaussian", "noise_level": 0.3},
                    **{"psnr_noisy_at_0.3": [13.0, 12.9, 13.1], "psnr_denoised_at_0.3": [17.7, 17.8, 17.6],
                       "psnr_baseline_at_0.3": [13.6, 13.4, 13.7]}), study="denoising")
    found = [c for c in verdicts.comparisons(r) if c.axis == "output"]
    assert [(c.first, c.second) for c in found] == [("the noisy input", "dae"), ("the noisy input", "ae"),
                                                    ("dae", "ae")]
    assert verdicts.sentence(found[2]).startswith("dae beats ae on `psnr_at_0.3` by 4.13 (p ")


def test_question_1s_verdict_at_latent_2_agrees_with_its_table():
    """The typed verdict said the VAE's architecture made no difference; at latent 2 the MLP's loss, 20.29 ± 0.09,
    was below the conv net's 20.72 ± 0.18 (that record's seeds), and the computed verdict says so."""
    r = record(cell({"model": "vae", "latent_dim": 2, "arch": "mlp"}, recon_loss=[20.20, 20.29, 20.38]),
               cell({"model": "vae", "latent_dim": 2, "arch": "conv"}, recon_loss=[20.54, 20.72, 20.90]))
    [c] = verdicts.comparisons(r)
    assert verdicts.sentence(c).startswith("mlp beats conv on `recon_loss` by 0.430 (p = 0.03")


def test_a_metric_that_describes_a_setting_is_in_the_table_but_not_tested():
    """A parameter count is a setting's size, not an outcome: "conv is higher than mlp on `parameters`" is no
    verdict, while the outcomes beside it are tested."""
    r = record(cell({"arch": "mlp"}, parameters=[40_000] * 3, recon_loss=[20.20, 20.29, 20.38]),
               cell({"arch": "conv"}, parameters=[38_900] * 3, recon_loss=[20.54, 20.72, 20.90]))
    assert [c.metric for c in verdicts.comparisons(r)] == ["recon_loss"]
    assert "parameters" in verdicts.rule()


@pytest.mark.parametrize("path", sorted(QUESTIONS.glob("*.json")), ids=lambda p: p.stem)
def test_every_shown_difference_agrees_with_its_records_means(path):
    r = json.loads(path.read_text())
    for c in verdicts.comparisons(r):
        text = verdicts.sentence(c)
        if c.shown and c.direction:
            winner = text.split(" beats ")[0]
            better = {"higher": max, "lower": min}[c.direction]
            means = {c.first: sum(c.first_values) / len(c.first_values),
                     c.second: sum(c.second_values) / len(c.second_values)}
            assert winner == better(means, key=means.get), text
        assert c.shown == (" beats " in text or " is higher than " in text)


def test_settings_a_study_derives_from_the_others_are_no_axis():
    """Question 1's MLP widths follow its latent size (a parameter count like the conv net's at each size): still,
    the architecture and the latent size are each compared, the rest held equal."""
    widths = {2: [144, 72], 8: [152, 76]}
    cells = [cell({"latent_dim": z, "arch": arch, "hidden": widths[z] if arch == "mlp" else [32, 64]},
                  recon_loss=[z + (arch == "conv") + i / 10 for i in range(3)]) for z in (2, 8) for arch in ("mlp", "conv")]
    r = {**record(*cells), "derived": ["hidden"]}
    assert sorted((c.axis, c.context) for c in verdicts.comparisons(r)) == [
        ("arch", "latent_dim 2"), ("arch", "latent_dim 8"), ("latent_dim", "arch conv"), ("latent_dim", "arch mlp")]
    del r["derived"]  # without the declaration, an MLP's widths are an axis that changes with everything else
    assert {c.axis for c in verdicts.comparisons(r)} == {"latent_dim"}


def test_a_setting_a_key_does_not_apply_to_is_compared_on_the_rest():
    """Question 3: a plain ae has no prior. It is still compared with the vae of each prior (the question itself),
    the vae's priors with each other, and the context names the prior the vae side had."""
    r = record(cell({"model": "ae"}, fcd=[3.0, 2.5, 2.8]),
               cell({"model": "vae", "prior": "normal"}, fcd=[21.0, 19.0, 23.0]),
               cell({"model": "vae", "prior": "mog"}, fcd=[12.0, 12.5, 11.5]))
    found = {(c.axis, c.first, c.second, c.context) for c in verdicts.comparisons(r)}
    assert found == {("model", "ae", "vae", "prior normal"), ("model", "ae", "vae", "prior mog"),
                     ("prior", "normal", "mog", "vae")}
    assert verdicts.sentence(next(c for c in verdicts.comparisons(r) if c.context == "prior normal")).startswith(
        "ae beats vae on `fcd` by 18.2")


def test_a_numeric_axis_compares_neighbours_among_the_settings_that_have_it():
    settings = [{"model": "ae"}, *({"model": "sae", "sparsity_weight": w} for w in (1e-4, 1e-3, 1e-2))]
    found = [(a[0], settings[i].get("sparsity_weight"), settings[j].get("sparsity_weight"))
             for a, i, j in verdicts.pairs(settings)]
    assert sorted(found, key=str) == sorted([("model", None, 1e-4), ("model", None, 1e-3), ("model", None, 1e-2),
                                            ("sparsity_weight", 1e-4, 1e-3), ("sparsity_weight", 1e-3, 1e-2)], key=str)
    assert verdicts.side(settings, 1, ("sparsity_weight",)) == "sparsity_weight 0.0001"


def test_each_kind_of_noise_compares_a_daes_output_with_the_baselines_and_shared_outputs_stay_inside_a_setting():
    """Question 2's grid: every dae is scored on every kind of noise; its output is compared with the plain ae's on
    the same noisy images, kind by kind. The plain ae's output is the same for every dae of an architecture, so it
    is no difference between two daes."""
    def dae(kind, gain):
        return cell({"model": "dae", "noise": kind}, psnr_denoised_gaussian_at_0=[14 + gain + i / 10 for i in range(3)],
                    psnr_baseline_gaussian_at_0=[13.0, 13.1, 13.2], **{"psnr_denoised_salt-pepper_at_0": [12, 12.1, 12.2],
                                                                       "psnr_baseline_salt-pepper_at_0": [12, 12.1, 12.2]})
    r = {**record(cell({"model": "ae"}, recon_loss=[1.0, 1.1, 1.2]), dae("gaussian", 2), dae("masking", 0)),
         "baseline": {"model": "ae"}}
    found = verdicts.comparisons(r)
    outputs = {(c.context, c.metric, c.shown) for c in found if c.axis == "output"}
    assert outputs == {("the runs of dae, noise gaussian", "psnr_gaussian_at_0", True),
                       ("the runs of dae, noise masking", "psnr_gaussian_at_0", True),
                       ("the runs of dae, noise gaussian", "psnr_salt-pepper_at_0", False),
                       ("the runs of dae, noise masking", "psnr_salt-pepper_at_0", False)}
    across = {c.metric for c in found if c.axis == "noise"}
    assert across == {"psnr_denoised_gaussian_at_0", "psnr_denoised_salt-pepper_at_0"}  # no baseline metric
