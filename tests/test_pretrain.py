"""The generated caption corpus, the contrastive pretraining, its cache and ``--pretrained``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_PRETRAIN
from fastmerge import models, pretrain
from fastmerge.data import corpus
from fastmerge.mima import LR_BUILTIN_PRETRAINED, LR_BUILTIN_RANDOM, MimaConfig

TINY = replace(pretrain.DEFAULT, **TINY_PRETRAIN)


# ----------------------------------------------------------------------------- the corpus

def test_corpus_is_deterministic_and_covers_every_family():
    a_img, a_cap, a_fam = corpus.caption_corpus(400, seed=5)
    b_img, b_cap, b_fam = corpus.caption_corpus(400, seed=5)
    c_img, c_cap, _ = corpus.caption_corpus(400, seed=6)
    assert torch.equal(a_img, b_img) and a_cap == b_cap and a_fam == b_fam
    assert not torch.equal(a_img, c_img) and a_cap != c_cap
    assert a_img.dtype == torch.uint8 and a_img.shape == (400, 3, 16, 16)
    assert set(a_fam) == set(corpus.FAMILIES)
    assert all(c.endswith(".") and len(c) > 3 for c in a_cap)


def test_held_out_pairs_never_occur_and_captions_name_true_attributes():
    rng = np.random.default_rng(0)
    seen_pairs = set()
    for _ in range(3000):
        _, text, attrs = corpus._object(rng)
        seen_pairs.add((attrs["colour"] or attrs["looks"], attrs["shape"]))   # unnamed: the nearest named colour
        named_colours = [c for c in corpus.COLOURS if f" {c} " in f" {text[:-1]} " or f"coloured {c}" in text]
        assert named_colours in ([], [attrs["colour"]]), text
        named_shapes = [s for s in corpus.SHAPES if f" {s}" in text]
        assert named_shapes in ([], [attrs["shape"]]), text
        named_places = [p for p in corpus.POSITIONS if p in text]
        assert named_places in ([], [attrs["position"]]), text
    assert not seen_pairs & corpus.HELD_OUT
    # every other colour–shape pair does occur
    assert {p for p in seen_pairs if p[0] is not None} == {(c, s) for c in corpus.COLOURS for s in corpus.SHAPES} - corpus.HELD_OUT
    assert {c for c, _ in corpus.HELD_OUT} == set(corpus.COLOURS)
    # the other families never paint a held-out colour on the shapes they draw
    for maker, key in ((corpus._dots, None), (corpus._texture_scene, "texture"), (corpus._glyph, "digit")):
        for _ in range(1500):
            _, text, attrs = maker(rng)
            thing = "dots" if key is None else attrs[key]
            assert not corpus.held_out(attrs["colour"], thing), (text, attrs)
            assert attrs.get("count", attrs.get("texture", attrs.get("digit"))) in text
    assert corpus.held_out("blue", "dots") and corpus.held_out("cyan", "polka dots") and not corpus.held_out(None, "ring")


def test_glyphs_look_like_the_digits_task():
    rng = np.random.default_rng(1)
    for d in range(10):
        g = corpus._glyph8(rng, d)
        assert g.shape == (8, 8) and g.max() == 1.0 and g.min() >= 0
        assert np.allclose(g * 16, np.round(g * 16))   # 17 grey levels, as scikit-learn's digits
    img, text, attrs = corpus._glyph(rng)
    assert img.shape == (3, 16, 16) and attrs["digit"] in text


def test_composition_probe_marks_held_out_pairs():
    images, labels, captions, held = corpus.composition_probe(per_pair=2)
    assert images.shape[0] == 2 * len(captions) == labels.numel()
    assert sum(held) == len(corpus.HELD_OUT)
    for (c, s), h in zip([(c, s) for c in corpus.COLOURS for s in corpus.SHAPES], held):
        assert h == ((c, s) in corpus.HELD_OUT)


def test_corpus_size_must_be_positive():
    with pytest.raises(ValueError, match="at least one image"):
        corpus.caption_corpus(0)


# ----------------------------------------------------------------------------- the loss

def _loss_by_hand(img, txt, caption, scale):
    B, U = img.shape[0], txt.shape[0]
    logits = scale * img @ txt.t()
    li = sum(-(logits[i].log_softmax(0)[caption[i]]) for i in range(B)) / B
    lt = 0.0
    for u in range(U):
        pos = [i for i in range(B) if caption[i] == u]
        lp = logits[:, u].log_softmax(0)
        lt = lt - sum(lp[i] for i in pos) / len(pos)
    return 0.5 * (li + lt / U)


@pytest.mark.parametrize("caption", [[0, 1, 2, 3], [0, 0, 1, 2, 2, 2], [0, 0, 0]])
def test_contrastive_loss_with_repeated_captions(caption):
    g = torch.Generator().manual_seed(len(caption))
    cap = torch.tensor(caption)
    U = int(cap.max()) + 1
    img = F.normalize(torch.randn(len(caption), 8, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(U, 8, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(7.0, dtype=torch.float64)
    got = pretrain.contrastive_loss(img, txt, cap, scale)
    torch.testing.assert_close(got, _loss_by_hand(img, txt, cap, scale))
    if U == len(caption):   # distinct captions: CLIP's loss
        logits = scale * img @ txt.t()
        want = 0.5 * (F.cross_entropy(logits, cap) + F.cross_entropy(logits.t(), cap))
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- training and the cache

def test_pretraining_is_deterministic_and_moves_both_towers():
    a, rec = pretrain.pretrain(TINY, log=lambda _m: None, progress=False)
    b, _ = pretrain.pretrain(TINY, log=lambda _m: None, progress=False)
    init = models.load_clip(TINY.model, None, seed=TINY.seed)[0]
    sa, sb, s0 = a.state_dict(), b.state_dict(), init.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.conv1.weight"], s0["visual.conv1.weight"])
    assert not torch.equal(sa["text_projection"], s0["text_projection"])
    assert rec["config"]["steps"] == TINY.steps and rec["distinct_captions"] > 1


_RANGES = ("pretraining needs corpus_size >= 1, steps >= 1, batch_size >= 2, lr > 0 and weight_decay >= 0")


@pytest.mark.parametrize("bad,msg", [
    (dict(steps=0), _RANGES), (dict(batch_size=1), _RANGES), (dict(lr=0.0), _RANGES),
    (dict(weight_decay=-0.1), _RANGES), (dict(corpus_size=0), _RANGES),
    (dict(warmup=6), "warmup must be in [0, steps), got 6 for 6 steps"),
    (dict(warmup=-1), "warmup must be in [0, steps), got -1 for 6 steps"),
])
def test_bad_settings(bad, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        replace(TINY, **bad).check()
    assert replace(TINY, warmup=5).check().warmup == 5     # the edges that are allowed
    assert replace(TINY, batch_size=2, warmup=0).check().batch_size == 2


def test_settings_change_the_cache_key():
    # the key: the first 16 hex digits of the SHA-256 of the settings as JSON with sorted keys,
    # the corpus version among them; the JSON of TINY written out by hand
    v = pretrain.CORPUS_VERSION
    blob = ('{"batch_size": 16, "corpus_size": 96, "corpus_version": %d, "lr": 0.001, "model": "fastmerge-vit-tiny", '
            '"seed": 0, "steps": 6, "warmup": 1, "weight_decay": 0.1}' % v)
    assert TINY.key() == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert TINY.key() != pretrain.DEFAULT.key()
    assert replace(TINY, seed=1).key() != TINY.key()
    assert pretrain.checkpoint_path(TINY).name == f"fastmerge-vit-tiny-{TINY.key()}.pt"


def test_cache_trains_once_reloads_and_retrains_a_corrupted_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMERGE_CACHE", str(tmp_path))
    msgs = []
    path = pretrain.ensure_pretrained(TINY, log=msgs.append, progress=False, report=False)
    assert path.parent == tmp_path / "pretrained" and path.is_file()
    rec = json.loads(path.with_suffix(".json").read_text())
    assert rec["config"] == json.loads(json.dumps(TINY.__dict__))
    assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert any("training it once" in m for m in msgs)

    def refuse(*a, **k):
        raise AssertionError("a valid cache entry must not be trained again")

    monkeypatch.setattr(pretrain, "pretrain", refuse)
    assert pretrain.ensure_pretrained(TINY, log=msgs.append, progress=False, report=False) == path

    model = models.load_clip(TINY.model, str(path))[0]
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0xFF
    path.write_bytes(bytes(blob))
    assert "does not match the checksum" in pretrain.verify(path)
    with pytest.raises(ValueError, match="does not match the checksum"):
        models.load_clip(TINY.model, str(path))
    monkeypatch.undo()
    monkeypatch.setenv("FASTMERGE_CACHE", str(tmp_path))
    msgs.clear()
    again = pretrain.ensure_pretrained(TINY, log=msgs.append, progress=False, report=False)
    assert any("cannot be used" in m for m in msgs) and pretrain.verify(again) is None
    reloaded = models.load_clip(TINY.model, str(again))[0]
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_concurrent_first_use_trains_once(tmp_path):
    code = ("import sys; from dataclasses import replace; from fastmerge import pretrain; "
            f"pretrain.ensure_pretrained(replace(pretrain.DEFAULT, **{TINY_PRETRAIN!r}), progress=False, report=False)")
    env = dict(os.environ, FASTMERGE_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("training it once" in o for o in outs) == 1, outs


def test_builtin_start_is_the_default_on_the_builtin_suite(_test_cache):
    c = MimaConfig().resolved()
    assert c.pretrained == "builtin" and c.lr == LR_BUILTIN_PRETRAINED
    r = MimaConfig(pretrained="none").resolved()
    assert r.pretrained == "none" and r.lr == LR_BUILTIN_RANDOM
    assert MimaConfig(data_root="/nowhere").resolved().pretrained == "none"
    assert MimaConfig(pretrained="none", lr=0.1).resolved().lr == 0.1
    # the cached built-in checkpoint (here the tests' stand-in) is what "builtin" loads
    built = models.load_clip(models.TINY, "builtin")[0].state_dict()
    cached = torch.load(pretrain.checkpoint_path(), weights_only=True)
    assert all(torch.equal(built[k], v) for k, v in cached.items())
    rand = models.load_clip(models.TINY, "none")[0].state_dict()
    assert not torch.equal(rand["visual.conv1.weight"], built["visual.conv1.weight"])
    with pytest.raises(ValueError, match="only for fastmerge-vit-tiny"):
        models.load_clip("ViT-B-32", "builtin")
    with pytest.raises(FileNotFoundError, match="no pretrained checkpoint"):
        models.load_clip(models.TINY, "/nowhere/clip.pt")


def test_zero_shot_report_fields(_test_cache):
    model, _, tok = models.load_clip(models.TINY, "builtin")
    rep = pretrain.zero_shot_report(model, tok)
    assert set(rep["zero_shot"]) == {"shapes", "colors", "orientation", "count", "position", "textures", "digits"}
    assert all(0 <= v <= 100 for v in rep["zero_shot"].values())
    assert rep["pairs_chance"] == pytest.approx(100 / 48)


def test_cli_pretrain_reports_and_copies(tmp_path):
    env = dict(os.environ, FASTMERGE_CACHE=str(tmp_path / "cache"))
    args = [sys.executable, "-m", "fastmerge", "pretrain", "--steps", "3", "--corpus-size", "40", "--batch-size", "8",
            "--no-progress", "--out", str(tmp_path / "clip.pt")]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| **mean** |" in r.stdout and "held out from it" in r.stdout and "training it once" in r.stdout
    assert (tmp_path / "clip.pt").is_file() and (tmp_path / "clip.json").is_file()
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "training it once" not in again.stdout
    bad = subprocess.run([sys.executable, "-m", "fastmerge", "pretrain", "--steps", "0"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 2 and "error" in bad.stderr
