"""aTLAS / DV-BASI: coefficient gradients, MGDA, one iteration, the driver, bad inputs."""

import copy
import json
import math
import re
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


def _val_accuracy_by_hand(suite, theta, t):
    """Validation accuracy (%) of the flat parameters ``theta`` on task ``t``, computed here: the whole
    split in one batch, uint8 images normalised with the tasks' mean 0.5 and std 0.25, the encoder
    run on ``theta`` and the frozen head."""
    task = suite.tasks[t]
    ds = task.splits["val"]
    assert ds.images.dtype == torch.uint8 and task.mean == (0.5,) * 3 and task.std == (0.25,) * 3
    images = (ds.images.double() - 127.5) / 63.75
    encoder = copy.deepcopy(suite.encoder).eval()
    with torch.no_grad():
        feats = torch.func.functional_call(encoder, suite.layout.unflatten(theta), (images.float(),))
        pred = (torch.nn.functional.normalize(feats, dim=-1) @ suite.heads[t].t()).argmax(-1)
    return 100.0 * int((pred == ds.labels).sum()) / ds.labels.numel()


def _per_entry(suite, coefs_row):
    """One coefficient per parameter tensor, repeated over that tensor's entries (float64)."""
    return coefs_row.double().repeat_interleave(torch.tensor(suite.layout.numels))


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
    # the entries run from about 1e-7 to 4e-3: atol stays well below the smallest
    assert torch.allclose(fused, coefs.grad, rtol=1e-4, atol=1e-8)
    assert coefs.grad.abs().min() > 1e-8


# ----------------------------------------------------------------------------------- one iteration

def test_one_dvbasi_iteration_moves_theta_by_the_chosen_coefficients(suite):
    ev = Evaluator(suite)
    theta_prev = fastmerge.task_arithmetic(suite.theta0, [_perturbed(suite, 0.05, s) for s in (3, 4, 5)], 0.5)
    obj = Objective("supervised", [0, 1, 2])
    cfg = CoefConfig(epochs=3, patience=2, steps_per_epoch=2, batch_size=16, lr=0.1)
    theta, rec = dvbasi_step(suite, ev, suite.theta0, theta_prev, obj, cfg, progress=False)
    coefs = rec["coefs"]
    # with these settings a trained epoch wins, so Λ* is learned, not the start (Λ = 0)
    assert rec["best_epoch"] > 0 and coefs.shape == (1, len(suite.layout)) and bool((coefs != 0).any())
    scores = [e["score"] for e in rec["epochs"]]
    assert [e["epoch"] for e in rec["epochs"]] == list(range(len(scores)))
    assert rec["best_epoch"] == scores.index(max(scores)) and rec["best_score"] == max(scores)
    # θ_m = θ_{m-1} + Λ*·δ, one coefficient per parameter tensor, written out in float64
    delta = theta_prev.double() - suite.theta0.double()
    want = theta_prev.double() + _per_entry(suite, coefs[0]) * delta
    torch.testing.assert_close(theta.double(), want, rtol=1e-6, atol=1e-7)
    assert (theta.double() - theta_prev.double()).abs().max() > 1e-3
    # the recorded score is the mean validation accuracy of that θ, evaluated here
    assert rec["best_score"] == pytest.approx(sum(_val_accuracy_by_hand(suite, theta, t) for t in range(3)) / 3)


def test_ablations_scale_one_coefficient_or_a_random_direction(suite, monkeypatch):
    """The ablations' wiring, with the coefficient learning replaced by known coefficients."""
    import fastmerge.dvbasi as D

    seen = []

    def known_coefs(model, *_a, **_k):
        seen.append(model)
        coefs = torch.linspace(-0.5, 0.75, model.coefs.numel()).view_as(model.coefs)
        return dict(best_epoch=1, best_score=0.0, coefs=coefs, epochs=[])

    monkeypatch.setattr(D, "learn_coefs", known_coefs)
    ev = Evaluator(suite)
    theta_prev = _perturbed(suite, 0.05, 9)
    d = theta_prev.numel()
    delta = theta_prev.double() - suite.theta0.double()
    cfg = CoefConfig(epochs=1, patience=1, steps_per_epoch=1, batch_size=8)
    obj = Objective("unsupervised", [0, 1])

    # isotropic: one block over the whole buffer, δ itself, θ = θ_prev + c δ
    theta, iso = dvbasi_step(suite, ev, suite.theta0, theta_prev, obj, cfg, ablation="isotropic", progress=False)
    model = seen[-1]
    assert model.offsets.tolist() == [0, d] and tuple(model.coefs.shape) == (1, 1)
    torch.testing.assert_close(model.vectors[0].double(), delta, rtol=0, atol=1e-7)
    assert float(iso["coefs"]) == -0.5
    torch.testing.assert_close(theta.double(), theta_prev.double() - 0.5 * delta, rtol=1e-6, atol=1e-7)

    # random: the generator's normal draws, rescaled to |δ|, one coefficient per parameter tensor
    theta, rnd = dvbasi_step(suite, ev, suite.theta0, theta_prev, obj, cfg, ablation="random",
                             generator=torch.Generator().manual_seed(0), progress=False)
    model = seen[-1]
    r = model.vectors[0].double()
    ends = [sum(suite.layout.numels[:i + 1]) for i in range(len(suite.layout))]
    assert model.offsets.tolist() == [0, *ends] and tuple(model.coefs.shape) == (1, len(suite.layout))
    assert float(r.norm()) == pytest.approx(float(delta.norm()), rel=1e-6)
    z = torch.randn(d, generator=torch.Generator().manual_seed(0)).double()
    assert float(r @ z / (r.norm() * z.norm())) > 1 - 1e-9            # the same direction
    assert abs(float(r @ delta / (r.norm() * delta.norm()))) < 5 / math.sqrt(d)   # unrelated to δ
    want = theta_prev.double() + _per_entry(suite, rnd["coefs"][0]) * r
    torch.testing.assert_close(theta.double(), want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=re.escape("ablation must be one of ('anisotropic', 'isotropic', 'random'), "
                                                   "got 'sideways'")):
        dvbasi_step(suite, ev, suite.theta0, theta_prev, obj, cfg, ablation="sideways", progress=False)


def test_negation_selection_respects_the_control_floor(suite):
    ev = Evaluator(suite)
    obj = Objective("negation", [0, 1], target=0, control=1)
    theta_prev = suite.theta0 + 0.5 * (_perturbed(suite, 0.05, 11) - suite.theta0)
    cfg = CoefConfig(epochs=2, patience=2, steps_per_epoch=2, batch_size=8)   # no early stop: every epoch runs

    # floor 0: every epoch qualifies, the score is minus the target accuracy, and a trained epoch wins
    _, free = dvbasi_step(suite, ev, suite.theta0, theta_prev, obj, cfg, progress=False, floor=0.0)
    assert [ep["score"] for ep in free["epochs"]] == [-ep["val"][0] for ep in free["epochs"]]
    assert free["best_epoch"] > 0

    # the floor of the method (95 % of the start's control accuracy): the start meets it, the trained
    # epochs (which lost control accuracy here) do not, score -inf and are never chosen
    floor = 0.95 * _val_accuracy_by_hand(suite, theta_prev, 1)
    theta, rec = dvbasi_step(suite, ev, suite.theta0, theta_prev, obj, cfg, progress=False, floor=floor)
    assert [ep["val"] for ep in rec["epochs"]] == [ep["val"] for ep in free["epochs"]]   # the floor only selects
    met = [ep["val"][1] >= floor for ep in rec["epochs"]]
    assert met[0] and not all(met)
    for ep, ok in zip(rec["epochs"], met):
        assert ep["score"] == (-ep["val"][0] if ok else float("-inf"))
    assert rec["best_epoch"] == 0 and torch.equal(theta, theta_prev) and float(rec["coefs"].abs().max()) == 0.0
    with pytest.raises(ValueError, match="negation needs a target task and a different control task"):
        Objective("negation", [0], target=0, control=0)


def test_mgda_step_follows_the_min_norm_combination(suite, monkeypatch):
    """Each MGDA step hands AdamW the gradient Σ_t w_t g_t of the per-task gradients g_t, with w from
    min_norm_weights."""
    import fastmerge.dvbasi as D

    solved, stepped = [], []
    real = D.min_norm_weights

    def recording(g):
        w = real(g)
        solved.append((g.detach().clone(), w.clone()))
        return w

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, *a, **k):
            stepped.append(self.param_groups[0]["params"][0].grad.detach().clone())
            return super().step(*a, **k)

    monkeypatch.setattr(D, "min_norm_weights", recording)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    ev = Evaluator(suite)
    model = BlockScaledModel(suite.encoder, suite.layout, suite.theta0, [_perturbed(suite, 0.05, 2) - suite.theta0],
                             suite.layout.block_offsets("tensor"), init=0.1)
    rec = learn_coefs(model, suite, ev, Objective("mgda", [0, 1, 2]), CoefConfig(epochs=1, steps_per_epoch=2,
                      batch_size=8), progress=False)
    assert len(rec["epochs"]) == 2 and len(solved) == len(stepped) == 2
    for (g, w), grad in zip(solved, stepped):
        assert g.shape == (3, 1, len(suite.layout))
        g64 = g.double().flatten(1)
        assert float(w.min()) >= 0 and float(w.sum()) == pytest.approx(1.0, abs=1e-12)
        assert float((w - 1 / 3).abs().max()) > 0.05          # not the plain mean, so the weights matter
        want = (w[:, None] * g64).sum(0)
        torch.testing.assert_close(grad.double().flatten(), want, rtol=1e-5, atol=1e-7 * float(g64.abs().max()))
        # the min-norm point of the hull is no longer than any of its corners
        assert float(want.norm()) <= float(g64.norm(dim=1).min()) * (1 + 1e-9)


# ----------------------------------------------------------------------------------- bad inputs

def test_blocks_that_do_not_tile_the_buffer_raise(suite):
    n = suite.theta0.numel()
    for bad, msg in (([0, 10], f"the last offset is 10, expected {n}"),
                     ([0, n + 1], f"the last offset is {n + 1}, expected {n}"),
                     ([1, n], "the first offset is 1, expected 0"),
                     ([0, 50, 20, n], "offsets decrease at block 1 (50 -> 20)")):
        with pytest.raises(ValueError, match=re.escape(f"blocks do not tile the buffer: {msg}")):
            BlockScaledModel(suite.encoder, suite.layout, suite.theta0, [suite.theta0], bad)


def test_layouts_that_differ_raise(suite, tmp_path):
    ev = Evaluator(suite)
    obj = Objective("supervised", [0])
    with pytest.raises(ValueError, match="they must share one layout"):
        dvbasi_step(suite, ev, suite.theta0, suite.theta0[:-1].clone(), obj, CoefConfig(), progress=False)
    with pytest.raises(ValueError, match=r"vectors\[0\] has shape \(5,\), base .*the models have different layouts"):
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

def test_driver_end_to_end_with_resume(tmp_path, monkeypatch):
    import shutil

    import fastmerge.dvbasi as D
    import fastmerge.mima as M

    coef = CoefConfig(epochs=2, patience=1, steps_per_epoch=2, batch_size=16, lr=0.1)
    kw = dict(tasks=TASKS, builtin_sizes=SMALL, finetune_steps=8, coef=coef, iterations=2, init_merge="atlas",
              ablations=("isotropic",), progress=False)
    variants = ("anisotropic", "isotropic")
    a = tmp_path / "a"
    full = run_dvbasi(DVBasiConfig(out=str(a), **kw), log=lambda _m: None)
    assert [it["iteration"] for it in full["runs"]["anisotropic"]] == [1, 2]
    assert set(full["runs"]) == set(variants)
    assert full["init"]["method"] == "atlas"
    for f in ("results.json", "report.md", "stepwise_relative_accuracy.png", "theta-0.safetensors",
              "anisotropic/theta-2.safetensors", "task-models/N1/checkpoints/task-digits.safetensors"):
        assert (a / f).is_file(), f
    load = lambda path: FlatLayout.load_safetensors(path)[1]
    theta0 = load(a / "theta-0.safetensors")
    for v in variants:   # these settings make outer iteration 1 learn: θ_1 is not θ_0
        it1 = full["runs"][v][0]
        assert it1["best_epoch"] > 0 and it1["coef_range"] != [0.0, 0.0]
        assert not torch.equal(load(a / v / "theta-1.safetensors"), theta0)

    def refuse(*_a, **_k):
        raise AssertionError("a resumed run must not redo the finished work")

    monkeypatch.setattr(D, "atlas", refuse)          # θ_0 is reloaded, not merged again
    monkeypatch.setattr(M, "run_mima", refuse)       # nor are the task models fine-tuned again
    # stop during the anisotropic outer iteration 2: anisotropic has finished iteration 1 and the
    # isotropic run has not started; --resume reloads θ_1 for the one and learns both iterations
    # (iteration 1 from θ_0, with the nonzero coefficients above) for the other
    b = tmp_path / "b"
    shutil.copytree(a, b)
    (b / "results.json").unlink()
    (b / "anisotropic" / "theta-2.safetensors").unlink()
    st = json.loads((b / "anisotropic" / "state.json").read_text())
    (b / "anisotropic" / "state.json").write_text(json.dumps(dict(done=1, iterations=st["iterations"][:1])))
    shutil.rmtree(b / "isotropic")
    (b / "config.json").write_text((b / "config.json").read_text().replace(str(a), str(b)))
    msgs = []
    again = run_dvbasi(DVBasiConfig(out=str(b), **kw), resume=True, log=msgs.append)
    resumed = [m for m in msgs if "resuming after outer iteration" in m]
    assert resumed == ["anisotropic: resuming after outer iteration 1 of 2"]
    runs_of = lambda out: {v: [{k: x for k, x in it.items() if k != "seconds"} for it in its]
                           for v, its in json.loads((out / "results.json").read_text())["runs"].items()}
    assert runs_of(b) == runs_of(a)      # the same epochs, accuracies, chosen epochs and coefficient ranges
    assert again["runs"]["isotropic"][0]["coef_range"] == full["runs"]["isotropic"][0]["coef_range"]
    for v in variants:
        for m in (1, 2):
            assert torch.equal(load(b / v / f"theta-{m}.safetensors"), load(a / v / f"theta-{m}.safetensors"))
    with pytest.raises(FileExistsError, match=re.escape(f"{a} already holds a run; pass --resume or choose another "
                                                        "--out")):
        run_dvbasi(DVBasiConfig(out=str(a), **kw), log=lambda _m: None)


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


def test_unsupervised_loss_option_reaches_the_training_and_is_checked(suite, tmp_path, monkeypatch):
    import fastmerge.dvbasi as D

    ev = Evaluator(suite)
    theta_prev = _perturbed(suite, 0.05, 5)
    obj = Objective("unsupervised", [0, 1])
    kinds, out = [], {}
    real = D.unsupervised_loss
    monkeypatch.setattr(D, "unsupervised_loss", lambda logits, kind: kinds.append(kind) or real(logits, kind))
    for kind in ("im", "entropy"):
        cfg = CoefConfig(epochs=1, patience=1, steps_per_epoch=2, batch_size=8, unsupervised_loss=kind)
        model = BlockScaledModel(suite.encoder, suite.layout, theta_prev, [theta_prev - suite.theta0],
                                 suite.layout.block_offsets("tensor"), init=0.1)
        learn_coefs(model, suite, ev, obj, cfg, progress=False)
        out[kind] = model.coefs.detach().clone()
        assert kinds == [kind] * 4      # every training step (2) of every task (2) computed that loss
        kinds.clear()
    assert not torch.equal(out["im"], out["entropy"])
    monkeypatch.undo()
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
    for other in ("isotropic", "random"):
        d0, d1 = (x["runs"]["anisotropic"][-1]["abs"] - x["runs"][other][-1]["abs"] for x in res)
        got = summary["differences"][other]
        assert got["per_seed"] == pytest.approx([d0, d1])
        # two seeds: the mean is the midpoint, the sample standard deviation |d0 - d1| / sqrt(2)
        assert got["mean"] == pytest.approx((d0 + d1) / 2) and got["std"] == pytest.approx(abs(d0 - d1) / math.sqrt(2))
    assert res[0]["config"]["seed"] == 0 and res[1]["config"]["coef"]["seed"] == 1
    assert "mean ± std" in (out / "report.md").read_text() and "over 2 seeds" in r.stdout


def _seed_result(pre, ft, theta0, runs):
    return dict(tasks=["shapes", "colors"], pretrained=pre, fine_tuned=ft, init=dict(method="task_arithmetic"),
                theta0=dict(test={"shapes": 0.0, "colors": 0.0}, abs=theta0[0], rel=theta0[1]),
                runs={v: [dict(abs=a, rel=r)] for v, (a, r) in runs.items()})


def test_seeds_table_on_known_numbers():
    from fastmerge.dvbasi import seeds_table

    results = [_seed_result([10.0, 20.0], [80.0, 90.0], (50.0, 60.0),
                            dict(anisotropic=(61.0, 70.0), isotropic=(58.5, 68.0), random=(58.0, 67.0))),
               _seed_result([12.0, 20.0], [84.0, 90.0], (52.0, 62.0),
                            dict(anisotropic=(59.0, 72.0), isotropic=(59.5, 70.0), random=(57.0, 66.0)))]
    table, diffs = seeds_table(results)
    # anisotropic minus isotropic: +2.5 and -0.5, mean 1.0, sample std 3 / sqrt(2) = 2.12, not beyond it;
    # minus random: +3.0 and +2.0, mean 2.5, std 1 / sqrt(2) = 0.71, beyond it
    assert diffs["isotropic"]["per_seed"] == [2.5, -0.5] and diffs["random"]["per_seed"] == [3.0, 2.0]
    assert diffs["isotropic"]["mean"] == 1.0 and diffs["isotropic"]["std"] == pytest.approx(2.1213203435596424)
    assert diffs["random"]["mean"] == 2.5 and diffs["random"]["std"] == pytest.approx(0.7071067811865476)
    assert diffs["isotropic"]["beyond_one_std"] is False and diffs["random"]["beyond_one_std"] is True
    lines = table.splitlines()
    for row in ("| pretrained (zero-shot) | 15.5 ± 0.7 | – |",      # task means 15 and 16
                "| fine-tuned (own task) | 86.0 ± 1.4 | 100 |",      # 85 and 87
                "| θ_0 (task_arithmetic) | 51.0 ± 1.4 | 61.0 ± 1.4 |",
                "| DV-BASI anisotropic, m = 1 | 60.0 ± 1.4 | 71.0 ± 1.4 |",
                "| DV-BASI isotropic, m = 1 | 59.0 ± 0.7 | 69.0 ± 1.4 |",
                "| DV-BASI random, m = 1 | 57.5 ± 0.7 | 66.5 ± 0.7 |",
                "| isotropic | +2.5, -0.5 | +1.0 ± 2.1 | no |",
                "| random | +3.0, +2.0 | +2.5 ± 0.7 | yes |"):
        assert row in lines, row
