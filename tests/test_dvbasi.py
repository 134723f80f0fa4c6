"""aTLAS / DV-BASI: coefficient gradients, MGDA, one iteration, the driver, bad inputs."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import cache_with_builtin
import fastmerge
from fastmerge import reference
from fastmerge.dvbasi import (BlockScaledModel, CoefConfig, DVBasiConfig, Objective, dvbasi_step, learn_coefs,
                              min_norm_weights, run_dvbasi)
from fastmerge.flat import FlatLayout
from fastmerge.mima import Evaluator, MimaConfig, build_suite

SMALL = {"train": 64, "val": 32, "test": 32}
TASKS = ["shapes", "colors", "digits"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMERGE_CACHE", cache_with_builtin(tmp_path / "cache"))


@pytest.fixture(scope="module")
def suite():
    cfg = MimaConfig(iterations=(1,), tasks=TASKS, builtin_sizes=SMALL, landscape=None).resolved()
    return build_suite(cfg, log=lambda _m: None)


def _perturbed(suite, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return suite.theta0 + scale * torch.randn(suite.theta0.shape, generator=g)


# ----------------------------------------------------------------------------------- MGDA

@pytest.mark.parametrize("grads,want", [
    ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5]),              # orthogonal, equal norms: the midpoint
    ([[1.0, 0.0], [2.0, 0.0]], [1.0, 0.0]),              # colinear: the shorter one alone
    ([[2.0, 0.0], [0.0, 1.0]], [0.2, 0.8]),              # w1 * 4 = w2 * 1 on the segment
    ([[1.0, 1.0], [1.0, -1.0], [5.0, 0.0]], [0.5, 0.5, 0.0]),  # the third is dominated
    ([[3.0]], [1.0]),
])
def test_min_norm_weights_known_answers(grads, want):
    w = min_norm_weights(torch.tensor(grads))
    assert torch.allclose(w, torch.tensor(want, dtype=torch.float64), atol=1e-9)


def test_min_norm_weights_opposite_gradients_reach_zero():
    g = torch.tensor([[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0], [0.5, 0.0, 0.0]])
    w = min_norm_weights(g)
    assert float((w.double() @ g.double()).norm()) < 1e-9 and abs(float(w.sum()) - 1) < 1e-12


def test_min_norm_weights_is_the_minimum_over_the_simplex():
    g = torch.randn(5, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = min_norm_weights(g)
    best = float((w @ g).norm())
    samples = torch.distributions.Dirichlet(torch.ones(5, dtype=torch.float64)).sample((4000,))
    assert best <= float((samples @ g).norm(dim=1).min()) + 1e-12


# ----------------------------------------------------------------------------------- gradients

def test_coefficient_gradient_matches_autograd_through_the_reference(suite):
    """∂L/∂Λ from the fused op equals autograd through the reference block_scale, on a real encoder."""
    base = suite.theta0
    vecs = [_perturbed(suite, 0.02, s) - base for s in (1, 2)]
    offs = suite.layout.block_offsets("tensor")
    model = BlockScaledModel(suite.encoder, suite.layout, base, vecs, offs, init=0.3)
    images, labels = next(suite.tasks[0].eval_batches("test", 8))
    loss = torch.nn.functional.cross_entropy(model.logits(model.merged(), suite.heads[0], images), labels)
    loss.backward()
    fused = model.coefs.grad.clone()

    coefs = model.coefs.detach().clone().requires_grad_(True)
    merged = reference.block_scale(base, vecs, coefs, offs)
    feats = torch.func.functional_call(suite.encoder, suite.layout.unflatten(merged), (images,))
    logits = torch.nn.functional.normalize(feats, dim=-1) @ suite.heads[0].t()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert fused.shape == (2, len(suite.layout))
    assert torch.allclose(fused, coefs.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------- one iteration

def test_one_dvbasi_iteration_keeps_the_validation_accuracy_it_selected_on(suite):
    ev = Evaluator(suite)
    theta_prev = fastmerge.task_arithmetic(suite.theta0, [_perturbed(suite, 0.05, s) for s in (3, 4, 5)], 0.5)
    obj = Objective("supervised", [0, 1, 2])
    cfg = CoefConfig(epochs=3, patience=2, steps_per_epoch=2, batch_size=16)
    before = sum(ev.accuracy(theta_prev, t, "val") for t in range(3)) / 3
    theta, rec = dvbasi_step(suite, ev, suite.theta0, theta_prev, obj, cfg, progress=False)
    after = sum(ev.accuracy(theta, t, "val") for t in range(3)) / 3
    assert after >= before
    assert rec["epochs"][0]["epoch"] == 0 and rec["best_score"] == pytest.approx(after)
    # θ_m = θ_{m-1} + Λ*·δ exactly as the op computes it
    delta = theta_prev - suite.theta0
    want = fastmerge.block_scale(theta_prev, [delta], rec["coefs"], suite.layout.block_offsets("tensor"))
    assert torch.equal(theta, want)


def test_isotropic_and_random_ablations_have_their_shapes(suite):
    ev = Evaluator(suite)
    theta_prev = _perturbed(suite, 0.05, 9)
    cfg = CoefConfig(epochs=1, patience=1, steps_per_epoch=1, batch_size=8)
    obj = Objective("unsupervised", [0, 1])
    _, iso = dvbasi_step(suite, ev, suite.theta0, theta_prev, obj, cfg, ablation="isotropic", progress=False)
    assert iso["coefs"].shape == (1, 1)
    g = torch.Generator().manual_seed(0)
    _, rnd = dvbasi_step(suite, ev, suite.theta0, theta_prev, obj, cfg, ablation="random", generator=g,
                         progress=False)
    assert rnd["coefs"].shape == (1, len(suite.layout))
    assert rnd["delta_norm"] == pytest.approx(float((theta_prev - suite.theta0).double().norm()), rel=1e-5)
    with pytest.raises(ValueError, match="ablation"):
        dvbasi_step(suite, ev, suite.theta0, theta_prev, obj, cfg, ablation="sideways", progress=False)


def test_negation_selection_respects_the_control_floor(suite):
    ev = Evaluator(suite)
    obj = Objective("negation", [0, 1], target=0, control=1)
    theta_prev = suite.theta0 - 0.5 * (_perturbed(suite, 0.05, 11) - suite.theta0)
    cfg = CoefConfig(epochs=2, patience=2, steps_per_epoch=2, batch_size=8)
    floor = 0.95 * ev.accuracy(suite.theta0, 1, "val")
    theta, rec = dvbasi_step(suite, ev, suite.theta0, theta_prev, obj, cfg, progress=False, floor=floor)
    chosen = rec["epochs"][rec["best_epoch"]]
    if rec["best_score"] == float("-inf"):  # nothing met the floor: the start is kept
        assert rec["best_epoch"] == 0 and torch.equal(theta, theta_prev)
    else:
        assert chosen["val"][1] >= floor
    # epochs whose control accuracy fell below the floor score -inf and are never chosen
    for ep in rec["epochs"][1:]:
        assert (ep["score"] == float("-inf")) == (ep["val"][1] < floor)
    with pytest.raises(ValueError, match="different control"):
        Objective("negation", [0], target=0, control=0)


def test_mgda_objective_runs_and_uses_min_norm_weights(suite, monkeypatch):
    import fastmerge.dvbasi as D

    seen = []
    real = D.min_norm_weights
    monkeypatch.setattr(D, "min_norm_weights", lambda g: seen.append(g.shape) or real(g))
    ev = Evaluator(suite)
    model = BlockScaledModel(suite.encoder, suite.layout, suite.theta0, [_perturbed(suite, 0.05, 2) - suite.theta0],
                             suite.layout.block_offsets("tensor"), init=0.1)
    rec = learn_coefs(model, suite, ev, Objective("mgda", [0, 1, 2]), CoefConfig(epochs=1, steps_per_epoch=2,
                      batch_size=8), progress=False)
    assert seen == [(3, 1, len(suite.layout))] * 2 and len(rec["epochs"]) == 2


# ----------------------------------------------------------------------------------- bad inputs

def test_blocks_that_do_not_tile_the_buffer_raise(suite):
    n = suite.theta0.numel()
    for bad in ([0, 10], [0, n + 1], [1, n], [0, 50, 20, n]):
        with pytest.raises(ValueError):
            BlockScaledModel(suite.encoder, suite.layout, suite.theta0, [suite.theta0], bad)


def test_layouts_that_differ_raise(suite, tmp_path):
    ev = Evaluator(suite)
    obj = Objective("supervised", [0])
    with pytest.raises(ValueError, match="same|layout"):
        dvbasi_step(suite, ev, suite.theta0, suite.theta0[:-1].clone(), obj, CoefConfig(), progress=False)
    with pytest.raises(ValueError, match="layout"):
        BlockScaledModel(suite.encoder, suite.layout, suite.theta0, [torch.zeros(5)], [0, suite.theta0.numel()])
    # task models saved with another layout are refused by the driver
    other = FlatLayout.from_shapes([("w", (3, 3))])
    ck = tmp_path / "models"
    ck.mkdir()
    for n in TASKS:
        other.save_safetensors(torch.zeros(9), ck / f"task-{n}.safetensors")
    cfg = DVBasiConfig(out=str(tmp_path / "o"), tasks=TASKS, builtin_sizes=SMALL, task_models=str(ck),
                       progress=False)
    with pytest.raises(ValueError, match="another parameter layout"):
        run_dvbasi(cfg, log=lambda _m: None)


# ----------------------------------------------------------------------------------- the driver

def test_driver_end_to_end_with_resume(tmp_path):
    coef = CoefConfig(epochs=2, patience=1, steps_per_epoch=2, batch_size=16)
    kw = dict(tasks=TASKS, builtin_sizes=SMALL, finetune_steps=8, coef=coef, iterations=2, init_merge="atlas",
              ablations=("isotropic",), progress=False)
    full = run_dvbasi(DVBasiConfig(out=str(tmp_path / "a"), **kw), log=lambda _m: None)
    assert [it["iteration"] for it in full["runs"]["anisotropic"]] == [1, 2]
    assert set(full["runs"]) == {"anisotropic", "isotropic"}
    assert full["init"]["method"] == "atlas"
    for f in ("results.json", "report.md", "stepwise_relative_accuracy.png", "theta-0.safetensors",
              "anisotropic/theta-2.safetensors", "task-models/N1/checkpoints/task-digits.safetensors"):
        assert (tmp_path / "a" / f).is_file(), f
    # stop after outer iteration 1 (drop iteration 2's files), then resume: the same θ_2
    b = tmp_path / "b"
    import shutil

    shutil.copytree(tmp_path / "a", b)
    (b / "results.json").unlink()
    for v in ("anisotropic", "isotropic"):
        (b / v / "theta-2.safetensors").unlink()
        st = json.loads((b / v / "state.json").read_text())
        (b / v / "state.json").write_text(json.dumps(dict(done=1, iterations=st["iterations"][:1])))
    (b / "config.json").write_text((b / "config.json").read_text().replace(str(tmp_path / "a"), str(b)))
    msgs = []
    again = run_dvbasi(DVBasiConfig(out=str(b), **kw), resume=True, log=msgs.append)
    assert any("resuming after outer iteration 1" in m for m in msgs)
    for v in ("anisotropic", "isotropic"):
        x = FlatLayout.load_safetensors(tmp_path / "a" / v / "theta-2.safetensors")[1]
        y = FlatLayout.load_safetensors(b / v / "theta-2.safetensors")[1]
        assert torch.equal(x, y)
    assert again["runs"]["anisotropic"][1]["abs"] == full["runs"]["anisotropic"][1]["abs"]
    with pytest.raises(FileExistsError):
        run_dvbasi(DVBasiConfig(out=str(tmp_path / "a"), **kw), log=lambda _m: None)


def test_driver_single_task_and_negation(tmp_path):
    coef = CoefConfig(epochs=1, patience=1, steps_per_epoch=1, batch_size=8)
    kw = dict(tasks=TASKS, builtin_sizes=SMALL, finetune_steps=8, coef=coef, iterations=1, progress=False,
              task_models=None)
    one = run_dvbasi(DVBasiConfig(out=str(tmp_path / "s"), single_task="colors", **kw), log=lambda _m: None)
    assert list(one["theta0"]["test"]) == ["colors"] and one["init"]["method"] == "fine_tuned"
    neg = run_dvbasi(DVBasiConfig(out=str(tmp_path / "n"), negate="shapes", control="digits",
                                  task_models=str(tmp_path / "s" / "task-models" / "N1" / "checkpoints"),
                                  **{k: v for k, v in kw.items() if k != "task_models"}), log=lambda _m: None)
    assert neg["init"]["method"] == "task_arithmetic_negation" and neg["negation"]
    assert "target shapes" in (tmp_path / "n" / "report.md").read_text()
    assert (tmp_path / "n" / "theta-0.safetensors").is_file() and (tmp_path / "s" / "theta-0.safetensors").is_file()
    with pytest.raises(ValueError, match="unknown task"):
        run_dvbasi(DVBasiConfig(out=str(tmp_path / "u"), single_task="nope", **kw), log=lambda _m: None)
    for bad, msg in ((dict(single_task="colors", negate="shapes"), "not both"), (dict(control="shapes"), "control"),
                     (dict(negate="shapes", objective="unsupervised"), "own objective"),
                     (dict(single_task="colors", objective="mgda"), "MGDA")):
        with pytest.raises(ValueError, match=msg):
            run_dvbasi(DVBasiConfig(out=str(tmp_path / "bad"), **kw, **bad), log=lambda _m: None)


def test_cli_help_and_errors(tmp_path):
    for cmd in ("atlas", "dvbasi"):
        r = subprocess.run([sys.executable, "-m", "fastmerge", cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "--objective" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastmerge", "dvbasi", "--out", str(tmp_path / "x"), "--task-models",
                        str(tmp_path / "none"), "--tasks", "shapes", "digits", "--no-progress"],
                       capture_output=True, text=True, env={**__import__("os").environ,
                                                            "FASTMERGE_CACHE": cache_with_builtin(tmp_path / "c")})
    assert r.returncode == 2 and "no task model for 'shapes'" in r.stderr


def test_atlas_theta0_can_use_its_own_objective_and_blocks(tmp_path):
    coef = CoefConfig(epochs=1, patience=1, steps_per_epoch=1, batch_size=8)
    res = run_dvbasi(DVBasiConfig(out=str(tmp_path / "a"), tasks=TASKS, builtin_sizes=SMALL, finetune_steps=8,
                                  coef=coef, iterations=1, objective="unsupervised", atlas_objective="supervised",
                                  blocks="row", atlas_blocks="tensor", progress=False), log=lambda _m: None)
    assert res["init"]["method"] == "atlas" and res["init"]["objective"] == "supervised"
    assert len(res["runs"]["anisotropic"]) == 1


def test_unsupervised_objective_can_adapt_on_the_unlabeled_test_images(suite):
    from fastmerge.dvbasi import _batch_iters

    obj = Objective("unsupervised", [0])
    test_images = next(iter(suite.tasks[0].eval_batches("test", batch_size=1000)))[0]
    train_images = next(iter(suite.tasks[0].eval_batches("train", batch_size=1000)))[0]

    def drawn(split):
        images, _ = next(_batch_iters(suite, obj, CoefConfig(batch_size=8, unlabeled_split=split), 1)[0])
        return images

    def rows_in(x, pool):
        return all(bool((pool == r).flatten(1).all(1).any()) for r in x)

    assert rows_in(drawn("test"), test_images) and rows_in(drawn("train"), train_images)
    # the supervised objective always trains on the labeled train split
    images, _ = next(_batch_iters(suite, Objective("supervised", [0]), CoefConfig(batch_size=8, unlabeled_split="test"),
                                  1)[0])
    assert rows_in(images, train_images)
    with pytest.raises(ValueError, match="unlabeled_split"):
        _batch_iters(suite, obj, CoefConfig(unlabeled_split="val"), 1)


# ----------------------------------------------------------------------------------- unsupervised losses

def test_unsupervised_losses_on_known_batches():
    from fastmerge.dvbasi import unsupervised_loss

    C = 4
    # one confident class per image, all images in class 0 (collapse) or one image per class (diverse)
    collapsed = torch.full((C, C), -30.0)
    collapsed[:, 0] = 30.0
    diverse = torch.full((C, C), -30.0)
    diverse.fill_diagonal_(30.0)
    for logits in (collapsed, diverse):   # entropy alone cannot tell them apart
        assert float(unsupervised_loss(logits, "entropy")) == pytest.approx(0.0, abs=1e-6)
    assert float(unsupervised_loss(collapsed, "im")) == pytest.approx(0.0, abs=1e-6)
    assert float(unsupervised_loss(diverse, "im")) == pytest.approx(-torch.log(torch.tensor(4.0)).item(), abs=1e-6)
    # uniform predictions: entropy log C, and the mean prediction is uniform too, so im is 0
    flat = torch.zeros(3, C)
    assert float(unsupervised_loss(flat, "entropy")) == pytest.approx(float(torch.log(torch.tensor(4.0))), abs=1e-6)
    assert float(unsupervised_loss(flat, "im")) == pytest.approx(0.0, abs=1e-6)
    # a general batch against the formula written out, in float64, from bf16 logits too
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 5, generator=g) * 3
    p = logits.double().softmax(-1)
    h = -(p * p.log()).sum(-1).mean()
    pm = p.mean(0)
    assert float(unsupervised_loss(logits, "entropy")) == pytest.approx(float(h), rel=1e-5)
    assert float(unsupervised_loss(logits, "im")) == pytest.approx(float(h + (pm * pm.log()).sum()), rel=1e-5, abs=1e-6)
    assert unsupervised_loss(logits.bfloat16(), "im").dtype == torch.float32
    with pytest.raises(ValueError, match="unsupervised_loss"):
        unsupervised_loss(logits, "kl")


def test_im_gradient_pulls_a_collapsed_batch_apart():
    from fastmerge.dvbasi import unsupervised_loss

    # every image leans to class 0 with a second-best class that differs per image
    logits = torch.tensor([[3.0, 1.0, 0.0], [3.0, 0.0, 1.0], [3.0, 1.0, 0.0]], requires_grad=True)
    unsupervised_loss(logits, "entropy").backward()
    g_ent = logits.grad.clone()
    logits.grad = None
    unsupervised_loss(logits, "im").backward()
    g_im = logits.grad
    # descent on entropy raises the class-0 logit of every image (more collapse); im lowers it
    assert (g_ent[:, 0] < 0).all() and (g_im[:, 0] > 0).all()


def test_unsupervised_loss_option_reaches_the_training_and_is_checked(suite, tmp_path):
    ev = Evaluator(suite)
    theta_prev = _perturbed(suite, 0.05, 5)
    obj = Objective("unsupervised", [0, 1])
    out = {}
    for kind in ("im", "entropy"):
        cfg = CoefConfig(epochs=1, patience=1, steps_per_epoch=2, batch_size=8, unsupervised_loss=kind)
        model = BlockScaledModel(suite.encoder, suite.layout, theta_prev, [theta_prev - suite.theta0],
                                 suite.layout.block_offsets("tensor"), init=0.1)
        rec = learn_coefs(model, suite, ev, obj, cfg, progress=False)
        out[kind] = (model.coefs.detach().clone(), rec["epochs"][1]["loss"])
    assert not torch.equal(out["im"][0], out["entropy"][0])
    assert out["im"][1] < out["entropy"][1]     # im = entropy − H(mean) ≤ entropy on the same batches
    bad = CoefConfig(epochs=1, steps_per_epoch=1, batch_size=8, unsupervised_loss="kl")
    model = BlockScaledModel(suite.encoder, suite.layout, theta_prev, [theta_prev - suite.theta0],
                             suite.layout.block_offsets("tensor"))
    with pytest.raises(ValueError, match="unsupervised_loss"):
        learn_coefs(model, suite, ev, obj, bad, progress=False)
    with pytest.raises(ValueError, match="unsupervised_loss"):
        run_dvbasi(DVBasiConfig(out=str(tmp_path / "x"), coef=bad, progress=False), log=lambda _m: None)
    r = subprocess.run([sys.executable, "-m", "fastmerge", "dvbasi", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--unsupervised-loss" in r.stdout


def test_cli_seeds_report_paired_ablation_differences(tmp_path):
    import os

    out = tmp_path / "d"
    r = subprocess.run([sys.executable, "-m", "fastmerge", "dvbasi", "--out", str(out), "--seeds", "2",
                        "--tasks", "shapes", "colors", "--finetune-steps", "4", "--epochs", "1", "--steps-per-epoch", "1",
                        "--iterations", "1", "--batch-size", "8", "--init-merge", "task_arithmetic",
                        "--ablations", "isotropic", "random", "--no-progress"],
                       capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["differences"]) == {"isotropic", "random"}
    res = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    want = [x["runs"]["anisotropic"][-1]["abs"] - x["runs"]["isotropic"][-1]["abs"] for x in res]
    assert summary["differences"]["isotropic"]["per_seed"] == pytest.approx(want)
    assert res[0]["config"]["seed"] == 0 and res[1]["config"]["coef"]["seed"] == 1
    assert "mean ± std" in (out / "report.md").read_text() and "over 2 seeds" in r.stdout
