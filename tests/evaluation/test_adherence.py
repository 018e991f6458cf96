"""Prompt adherence: a generator that draws exactly the prompted scene scores (near) 100%, a blank one 0%."""
from __future__ import annotations

import random

from PIL import Image

from diffusekit.evaluation.adherence import AdherenceReport, adherence_prompts, evaluate_adherence
from diffusekit.training.datasets import shapes as S
from diffusekit.training.datasets.shapes import COLORS, is_heldout, render


def test_prompts_are_heldout_combinations_in_heldout_phrasings():
    singles, pairs = adherence_prompts(20, 10, seed=0)
    assert len(singles) == 20 and len(pairs) == 10
    assert all(len(s.objects) == 1 and is_heldout(s.objects[0].shape, s.objects[0].color, s.background)
               and s.template in S.HELDOUT_SINGLE_TEMPLATES for s in singles)
    assert all(len(s.objects) == 2 and s.template in S.HELDOUT_PAIR_TEMPLATES
               and all(is_heldout(o.shape, o.color, s.background) for o in s.objects) for s in pairs)
    assert adherence_prompts(20, 10, seed=0) == (singles, pairs)   # deterministic
    # legacy: the first release's prompts (its held-out singles, two-object train scenes, its phrasings)
    old_singles, old_pairs = adherence_prompts(5, 3, seed=0, prompts="legacy")
    assert old_singles[0].caption == "green background with a large white square at the bottom"
    assert all(s.template in S.LEGACY_SINGLE_TEMPLATES for s in old_singles)
    assert all(len(s.objects) == 2 and s.template in S.LEGACY_PAIR_TEMPLATES for s in old_pairs)


def test_exact_renderer_scores_high_and_blank_scores_zero():
    singles, pairs = adherence_prompts(20, 10, seed=0)
    by_caption = {s.caption: s for s in singles + pairs}

    def perfect(prompt, seed):
        return render(by_caption[prompt], 64, random.Random(seed))

    def blank(prompt, seed):
        return Image.new("RGB", (64, 64), COLORS[by_caption[prompt].background])

    good = evaluate_adherence(perfect, n_single=20, n_pair=10)
    assert good.single["shape_color"] >= 0.95 and good.single["background"] == 1.0
    assert good.pair["position"] >= 0.9
    bad = evaluate_adherence(blank, n_single=20, n_pair=10)
    assert bad.single["shape_color"] == 0.0 and bad.pair["position"] == 0.0 and bad.single["background"] == 1.0
    md = good.to_markdown()
    assert "held-out single-object" in md and "| 20 |" in md
    # per template: every prompt counted once under its own template; size and position only where named
    assert sum(r["n"] for r in good.per_template.values()) == 30
    assert set(good.per_template) == {s.template for s in singles + pairs}
    for t, r in good.per_template.items():
        assert ("size" in r) == ("{size}" in t) and ("position" in r) == ("{where" in t)
    assert "| template |" in good.to_markdown(per_template=True)


def test_report_markdown_skips_empty_groups():
    r = AdherenceReport(single={"shape_color": 0.5, "background": 1.0}, n_single=2)
    assert "two-object" not in r.to_markdown() and "50.0%" in r.to_markdown()
