"""Evaluation suites (issue 19): GenEval and T2I-CompBench-style benchmarks, several models, one report."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flowalign.eval import compbench as C
from flowalign.eval import stats
from flowalign.eval import suite as S
from flowalign.eval.geneval import MetadataError

OFFICIAL = [  # lines in the official GenEval evaluation_metadata.jsonl format, every optional field once
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
     "prompt": "a photo of two clocks"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "pink"}], "prompt": "a photo of a pink car"},
    {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1,
                                                                    "position": ["right of", 0]}],
     "prompt": "a photo of a cat right of a dog"},
    {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "white"},
                                      {"class": "kite", "count": 1, "color": "black"}],
     "prompt": "a photo of a white bus and a black kite"},
]


def _jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# --------------------------------------------------------------------------------------------- parsing
def test_geneval_paths_parse_official_fields_and_pick_a_scorer(tmp_path):
    p = _jsonl(tmp_path / "evaluation_metadata.jsonl", OFFICIAL)
    with pytest.raises(S.EvalError, match=r"names classes the ShapeWorld judges do not know \(bench, bus, car"):
        S.parse_benchmark(str(p))
    su = S.parse_benchmark(str(p), real_geneval=True)
    assert su.scorer == "real" and su.judges == ("real",) and su.records == OFFICIAL
    assert su.records[3]["include"][1]["position"] == ["right of", 0] and su.records[1]["exclude"][0]["count"] == 3
    sw = [{"tag": "position", "include": [{"class": "square", "count": 1},
                                          {"class": "circle", "count": 1, "position": ["left of", 0]}],
           "prompt": "a photo of a circle left of a square"}]
    su = S.parse_benchmark(str(_jsonl(tmp_path / "mine.jsonl", sw)))
    assert su.scorer == "shapeworld" and su.headline == "heldout_strict" and su.kind == "geneval"
    su = S.parse_benchmark("shapeworld-geneval", n_per_task=3)
    assert len(su.records) == 18 and [r["tag"] for r in su.records[:3]] == ["single_object"] * 3


def test_compbench_layout_loads_and_parses(tmp_path):
    d = tmp_path / "cb"
    d.mkdir()
    (d / "spatial_val.txt").write_text("a photo of a circle left of a square\n\n  a photo of a cross above a circle \n")
    (d / "color_val.txt").write_text("a photo of a red circle and a blue square\n")
    (d / "notes.md").write_text("ignored")
    recs = C.load_compbench(d, images_per_prompt=2)
    assert [(r["tag"], r["prompt"], r["copy"]) for r in recs] == [
        ("color", "a photo of a red circle and a blue square", 0),
        ("color", "a photo of a red circle and a blue square", 1),
        ("spatial", "a photo of a circle left of a square", 0), ("spatial", "a photo of a circle left of a square", 1),
        ("spatial", "a photo of a cross above a circle", 0), ("spatial", "a photo of a cross above a circle", 1)]
    assert len(C.load_compbench(d / "spatial_val.txt", 3)) == 6 and len(C.load_compbench(d, 2, n_per_task=3)) == 5
    assert S.parse_benchmark(str(d)).scorer == "shapeworld"
    # official T2I-CompBench prompts: noun phrases, relation phrases; not ShapeWorld-scorable without real scorers
    assert C.noun_phrases("a green bench and a red car") == ["a green bench", "a red car"]
    assert C.split_relation("a balloon on the top of a giraffe.") == ("a balloon", "above", "a giraffe")
    assert C.noun_phrases("a red book on the left of a blue vase") == ["a red book", "a blue vase"]
    assert C.head_noun("a fluffy white cat") == "cat"
    (d / "texture_val.txt").write_text("a wooden table and a metallic car\n")
    with pytest.raises(S.EvalError, match="ShapeWorld rules cannot score it.*texture"):
        S.parse_benchmark(str(d))
    assert S.parse_benchmark(str(d), real_compbench=True).scorer == "real"
    assert C.parse_shapeworld_prompt("a photo of three crosses") == {
        "phrases": [{"shape": "cross", "color": None, "count": 3}], "relation": None}
    with pytest.raises(MetadataError, match="not a ShapeWorld phrase: 'a wooden table'"):
        C.parse_shapeworld_phrase("a wooden table")


def test_shipped_compbench_files_regenerate_exactly(tmp_path):
    from flowalign.shapeworld.compbench import CATEGORIES, COMPBENCH_DIR, write_compbench_files

    for cat, p in write_compbench_files(tmp_path).items():
        assert p.read_text() == (COMPBENCH_DIR / f"{cat}_val.txt").read_text(), cat
    recs = C.load_compbench("shapeworld-compbench", 4)
    # 25 prompts per category; non_spatial has only 24 (12 shape pairs + 12 counts): all of them
    assert [sum(r["tag"] == c for r in recs) for c in CATEGORIES] == [100, 100, 100, 96, 100]
    assert tuple(dict.fromkeys(r["tag"] for r in recs)) == CATEGORIES
    C.check_shapeworld_records(recs)  # every shipped prompt parses under the ShapeWorld grammar


# --------------------------------------------------------------------------------------------- rules
def _det(cls, color, box, unambiguous=True, color_clear=True, score=0.9):
    return {"cls": cls, "color": color, "bbox": box, "score": score, "unambiguous": unambiguous,
            "color_clear": color_clear, "centroid": ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)}


def test_binding_rule_is_a_product_over_phrases():
    ph = C.parse_shapeworld_prompt("a photo of a red circle and a blue square")["phrases"]
    L, R = (0.1, 0.4, 0.3, 0.6), (0.6, 0.4, 0.8, 0.6)
    assert C.binding_score(ph, [_det("circle", "red", L), _det("square", "blue", R)]) == 1.0
    assert C.binding_score(ph, [_det("circle", "red", L), _det("square", "red", R)]) == 0.0   # colour leaked
    assert C.binding_score(ph, [_det("circle", "red", L), _det("square", "blue", R), _det("cross", "red", L)]) == 1.0
    amb = [_det("circle", "red", L), _det("square", "blue", R, unambiguous=False)]
    assert C.binding_score(ph, amb) == 1.0 and C.binding_score(ph, amb, strict=True) == 0.0
    murky = [_det("circle", "red", L, color_clear=False), _det("square", "blue", R)]
    assert C.binding_score(ph, murky, strict=True) == 0.0
    two = C.parse_shapeworld_prompt("a photo of two crosses")["phrases"]
    assert C.binding_score(two, [_det("cross", "red", L)]) == 0.0
    assert C.binding_score(two, [_det("cross", "red", L), _det("cross", "blue", R)]) == 1.0


def test_position_and_spatial_rules_by_hand():
    L, R = (0.1, 0.4, 0.3, 0.6), (0.6, 0.4, 0.8, 0.6)
    assert C.position_score("left of", L, R) == 1.0 and C.position_score("right of", L, R) == 0.0
    assert C.position_score("right of", R, L) == 1.0
    top, bottom = (0.4, 0.1, 0.6, 0.3), (0.4, 0.6, 0.6, 0.8)
    assert C.position_score("above", top, bottom) == 1.0 and C.position_score("below", bottom, top) == 1.0
    assert C.position_score("left of", top, bottom) == 0.0  # |dy| > |dx|: not a left/right relation
    # overlapping boxes: IoU of [0,0.4]x[0,1] and [0.2,0.6]x[0,1] is 0.2/0.6 = 1/3 -> 0.1 / (1/3) = 0.3
    a, b = (0.0, 0.0, 0.4, 1.0), (0.2, 0.0, 0.6, 1.0)
    assert C.box_iou(a, b) == pytest.approx(1 / 3) and C.position_score("left of", a, b) == pytest.approx(0.3)
    box = lambda bb, c=1.0: {"bbox": bb, "confidence": c}  # noqa: E731
    assert C.spatial_score("left of", box(L), box(R)) == (1.0, 1.0)
    assert C.spatial_score("right of", box(L), box(R)) == (0.5, 0.0)      # both found, wrong relation: 0.5
    assert C.spatial_score("left of", box(L, 0.8), box(R, 0.6)) == (pytest.approx(0.85), 1.0)
    assert C.spatial_score("left of", box(L, 0.4), box(R, 0.4))[0] == pytest.approx(0.7)
    assert C.spatial_score("right of", box(L, 0.9), box(R, 0.9)) == (0.0, 0.0)  # 0.45 < 0.5 -> 0
    assert C.spatial_score("left of", box(L), None) == (0.0, 0.0)         # 0.25 < 0.5 -> 0
    assert C.spatial_score("left of", box(a), box(b))[0] == pytest.approx(0.5 + 0.15)
    # ShapeWorld: the highest-scoring detection of each class; complex = mean of binding, spatial, cosine
    dets = [_det("circle", "red", L, score=0.9), _det("circle", "green", (0.85, 0.4, 0.95, 0.6), score=0.6),
            _det("square", "blue", R)]
    assert C.shapeworld_scores("spatial", "a photo of a circle left of a square", dets, False, 0.3) == (1.0, True)
    s, v = C.shapeworld_scores("complex", "a photo of a red circle left of a blue square", dets, False, 0.4)
    assert s == pytest.approx((1 + 1 + 0.4) / 3) and v is True
    s, v = C.shapeworld_scores("complex", "a photo of a green circle right of a blue square", dets, False, 0.4)
    assert s == pytest.approx((1 + 0.5 + 0.4) / 3) and v is False  # the red circle (best) is left of the square
    assert C.shapeworld_scores("non_spatial", "a photo of a circle and a square", dets, True, 0.27) == (0.27, None)


def test_shapeworld_scores_on_renders_under_all_judges():
    from flowalign.shapeworld.world import render

    im = np.asarray(render([{"shape": "circle", "color": "red", "x": 0.25, "y": 0.5, "r": 0.18},
                            {"shape": "square", "color": "blue", "x": 0.75, "y": 0.5, "r": 0.18}]))
    recs = [{"tag": "color", "prompt": "a photo of a red circle and a blue square"},
            {"tag": "shape", "prompt": "a photo of a red circle and a red square"},
            {"tag": "spatial", "prompt": "a photo of a circle left of a square"},
            {"tag": "spatial", "prompt": "a photo of a circle above a square"},
            {"tag": "non_spatial", "prompt": "a photo of a circle and a square"}]
    out = C.score_shapeworld(recs, np.stack([im] * len(recs)))
    for j in ("train", "train_strict", "heldout", "heldout_strict"):
        assert [o["scores"][j] for o in out[:4]] == [1.0, 0.0, 1.0, 0.5], j
        assert [o["verdicts"][j] for o in out] == [True, False, True, False, None], j
    assert out[4]["scores"]["train"] == pytest.approx(out[4]["cosine"]) and -1 < out[4]["cosine"] < 1


# --------------------------------------------------------------------------------------------- statistics
def test_deltas_and_standard_errors_by_hand():
    a, b = [1, 0, 1, 1], [1, 1, 1, 0]
    d = stats.delta(a, b, paired=True)
    # d_i = (0, 1, 0, -1): mean 0, population variance 0.5 -> SE sqrt(0.5 / 4)
    assert d["delta"] == 0.0 and d["se"] == pytest.approx(math.sqrt(0.5 / 4))
    u = stats.delta(a, b, paired=False)  # binomial SEs sqrt(.75 .25 / 4) each, added in quadrature
    assert u["se"] == pytest.approx(math.sqrt(2 * 0.75 * 0.25 / 4))
    rng = np.random.default_rng(0)
    xa = rng.integers(0, 2, 50).astype(float)
    xb = np.where(rng.random(50) < 0.8, xa, 1 - xa)  # correlated, as shared noises make them
    sa, sb = stats.mean_se(xa)[1], stats.mean_se(xb)[1]
    cov = np.mean((xa - xa.mean()) * (xb - xb.mean()))
    p = stats.delta(xa, xb, True)["se"]
    assert p ** 2 == pytest.approx(sa ** 2 + sb ** 2 - 2 * cov / 50) and p < math.sqrt(sa ** 2 + sb ** 2)
    tags = ["x"] * 4 + ["y"] * 2
    A, B = [1, 0, 1, 1, 0, 0], [1, 1, 1, 0, 1, 1]
    keys = list(range(6))
    c = stats.compare(tags, A, keys, tags, B, keys)
    assert c["paired"] and c["per_task"]["y"]["delta"] == 1.0 and c["per_task"]["y"]["se"] == 0.0
    assert c["overall"] == pytest.approx((0.0 + 1.0) / 2)
    assert c["se_overall"] == pytest.approx(math.sqrt(0.5 / 4) / 2)
    assert not stats.compare(tags, A, keys, tags, B, keys[::-1])["paired"]
    s = stats.summarize_scores(tags, A)
    assert s["per_task"] == {"x": 0.75, "y": 0.0}
    assert s["se_overall"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4) / 2)


# --------------------------------------------------------------------------------------------- real scorers
def _save_tiny_blip(d):
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipProcessor, BertTokenizer
    try:
        from transformers import BlipImageProcessorPil as IP
    except ImportError:
        from transformers import BlipImageProcessor as IP
    from flowalign.rewards.tiny import BERT_WORDS, save_bert_tokenizer

    save_bert_tokenizer(d / "tok", words=list(BERT_WORDS) + ["yes", "no", "[DEC]"])
    tok = BertTokenizer.from_pretrained(d / "tok", bos_token="[DEC]")
    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = BlipConfig(text_config=dict(common, vocab_size=len(tok), max_position_embeddings=32,
                                      encoder_hidden_size=32, bos_token_id=tok.bos_token_id,
                                      pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id),
                     vision_config=dict(common, image_size=32, patch_size=8), projection_dim=32)
    BlipForQuestionAnswering(cfg).eval().save_pretrained(d)
    BlipProcessor(image_processor=IP(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_real(tmp_path_factory):
    from flowalign.rewards.tiny import save_tiny_clip, save_tiny_owlv2

    root = tmp_path_factory.mktemp("real")
    return {"blip": str(_save_tiny_blip(root / "blip")), "owl": str(save_tiny_owlv2(root / "owl")),
            "clip": str(save_tiny_clip(root / "clip"))}


def test_real_compbench_scorers_on_tiny_replicas(tiny_real):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    vqa = C.BlipVQA(tiny_real["blip"])
    one = vqa.p_yes(imgs[:1], ["a red car?"])
    batch = vqa.p_yes(imgs[[0, 0, 1]], ["a red car?", "a green bench in the park?", "a red car?"])
    assert 0 < batch[0] < 1 and batch[0] == pytest.approx(one[0], abs=1e-5)  # padding does not change P(yes)
    q = vqa.p_yes(imgs[[1, 1]], ["a green bench?", "a red car?"])
    assert vqa.binding(imgs[1:2], ["a green bench and a red car"])[0] == pytest.approx(q[0] * q[1], rel=1e-5)
    recs = [{"tag": "color", "prompt": "a green bench and a red car"},
            {"tag": "spatial", "prompt": "a cat on the left of a dog"},
            {"tag": "non_spatial", "prompt": "a man holding a phone"}]
    real = C.RealCompBench(tiny_real["blip"], tiny_real["owl"], tiny_real["clip"])
    real.owl.det.threshold = 0.0  # random weights: keep every box so both objects are found
    out = real.score(recs, imgs)
    assert out[0]["scores"]["real"] == pytest.approx(vqa.binding(imgs[:1], [recs[0]["prompt"]])[0], rel=1e-5)
    sp, pos = out[1]["scores"]["real"], real.owl.scores(imgs[1:2], [recs[1]["prompt"]])[0]
    assert sp == pytest.approx(pos[0]) and (sp == 0.0 or sp >= 0.5)
    assert out[2]["scores"]["real"] == pytest.approx(out[2]["cosine"]) and out[2]["verdicts"]["real"] is None
    cx = real.score([{"tag": "complex", "prompt": "a green bench on the left of a red car"}], imgs[:1])[0]
    parts = [vqa.binding(imgs[:1], ["a green bench on the left of a red car"])[0],
             real.owl.scores(imgs[:1], ["a green bench on the left of a red car"])[0][0], cx["cosine"]]
    assert cx["scores"]["real"] == pytest.approx(np.mean(parts), rel=1e-5)
    with pytest.raises(MetadataError, match="needs the clip scorer"):
        C.RealCompBench(blip=tiny_real["blip"]).score(recs[2:], imgs[:1])


# --------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained_dir(tiny_sd3, tmp_path_factory):
    from diffusers import SD3Transformer2DModel

    d = tmp_path_factory.mktemp("run") / "final"
    tr = SD3Transformer2DModel.from_pretrained(f"{tiny_sd3}/transformer")
    with torch.no_grad():
        for p in tr.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tr.save_pretrained(d / "transformer")
    return d


def test_model_specs(tiny_sd3, trained_dir):
    m = S.parse_model(str(trained_dir), default_base=tiny_sd3)
    assert (m.base, m.trained, m.name) == (tiny_sd3, str(trained_dir), trained_dir.parent.name)
    assert S.parse_model(str(trained_dir.parent), default_base=tiny_sd3).trained == str(trained_dir)  # a run dir
    m = S.parse_model(f"bon={tiny_sd3}@best_of_n:n=2,reward=shapeclip+artifact*0.5")
    assert (m.name, m.method, m.options) == ("bon", "best_of_n", {"n": 2, "reward": {"shapeclip": 1.0,
                                                                                    "artifact": 0.5}})
    assert m.key() != S.parse_model(tiny_sd3).key()
    with pytest.raises(S.EvalError, match="neither a diffusers pipeline"):
        S.parse_model(str(trained_dir.parent.parent))
    with pytest.raises(S.EvalError, match="unknown method 'magic'"):
        S.parse_model(f"{tiny_sd3}@magic")


def test_a_full_finetuning_checkpoint_is_a_model(tiny_sd3, trained_dir, tmp_path):
    from diffusers import SD3Transformer2DModel

    from flowalign import checkpoint

    tr = SD3Transformer2DModel.from_pretrained(str(trained_dir / "transformer"))
    ck = checkpoint.save_checkpoint(tmp_path / "myrun" / "checkpoints", "iter_7", tr.state_dict(), {}, {"iteration": 7})
    m = S.parse_model(str(ck), default_base=tiny_sd3)
    assert (m.trained, m.name) == (str(ck), "myrun_iter_7")
    a = m.load()
    w = dict(a.transformer.named_parameters())
    sd = tr.state_dict()
    assert set(w) <= set(sd) and len(w) > 0
    assert all(torch.equal(w[k], sd[k]) for k in w)  # the evaluated transformer holds the checkpoint's weights


def _opts(tmp_path, **kw):
    return S.Options(**{**dict(steps=2, guidance=(2.0,), batch_size=4, cache=str(tmp_path / "cache"),
                               rewards=("jpeg_compressibility",), progress=False, grid_per_task=2), **kw})


def test_eval_report_resume_and_deltas(tiny_sd3, trained_dir, tmp_path, monkeypatch):
    models = [S.parse_model(tiny_sd3), S.parse_model(str(trained_dir), default_base=tiny_sd3),
              S.parse_model(f"bon={tiny_sd3}@best_of_n:n=2")]
    suites = [S.parse_benchmark("shapeworld-geneval", n_per_task=1),
              S.parse_benchmark("shapeworld-compbench", n_per_task=2, images_per_prompt=2)]
    suites[1].guidance = (3.0,)  # a benchmark's own CFG grid (--compbench-guidance)
    n_img = len(suites[0].records) + len(suites[1].records)
    saved = []
    real_save = S.ImageCache.save

    def dying_save(self, prompt, seed, img):
        if len(saved) == 5:
            raise KeyboardInterrupt("killed")
        saved.append(prompt)
        real_save(self, prompt, seed, img)

    monkeypatch.setattr(S.ImageCache, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        S.Runner(models, suites, _opts(tmp_path)).run()
    monkeypatch.setattr(S.ImageCache, "save", lambda self, *a: (saved.append(a[0]), real_save(self, *a)))
    runner = S.Runner(models, suites, _opts(tmp_path))
    R = runner.run()
    assert len(saved) == 3 * n_img  # the resumed run generated only what the killed one had not
    # a third run: nothing generated, no model loaded, no score recomputed
    monkeypatch.setattr(S.ModelSpec, "load", lambda self: (_ for _ in ()).throw(AssertionError("loaded")))
    monkeypatch.setattr(C, "score_shapeworld", lambda *a: (_ for _ in ()).throw(AssertionError("rescored")))
    again = S.Runner(models, suites, _opts(tmp_path))
    dump = lambda r: json.dumps(r["suites"], default=float, sort_keys=True)  # noqa: E731
    assert dump(again.run()) == dump(R) and len(saved) == 3 * n_img
    # deltas by hand from the per-image verdicts
    g = R["suites"]["shapeworld-geneval"]
    first, second = runner.models[0].name, runner.models[1].name
    ia, pa = runner.images[("shapeworld-geneval", first)]
    ib, pb = runner.images[("shapeworld-geneval", second)]
    ya = np.array([p["scores"]["heldout_strict"] for p in pa])
    yb = np.array([p["scores"]["heldout_strict"] for p in pb])
    d = yb - ya  # one record per task: each task's SE is 0, the overall delta the mean over the six tasks
    assert g["deltas"][second]["heldout_strict"]["overall"] == pytest.approx(d.mean())
    assert g["deltas"][second]["heldout_strict"]["paired"] is True
    assert g["models"][first]["judges"]["heldout_strict"]["overall"] == pytest.approx(ya.mean())
    assert not np.array_equal(ia, ib)  # the trained weights changed the images, on the same noises
    ex = g["models"][first]["extras"]
    assert set(ex) == {"artifact_rate", "diversity", "reward:jpeg_compressibility"}
    assert 0 <= ex["artifact_rate"]["mean"] <= 1
    cb = R["suites"]["shapeworld-compbench"]["models"][first]
    assert cb["best_guidance"] == 3.0 and list(cb["grid"]) == ["3"] and g["models"][first]["best_guidance"] == 2.0
    assert cb["extras"]["diversity"]["n_prompts"] == 5  # 5 categories x 1 prompt x 2 images
    out = S.write_report(runner, tmp_path / "report", "flowalign eval ...")
    md = out["report"].read_text()
    assert "| **overall** |" in md and f"Δ {second} − {first}" in md and "held-out strict (headline)" in md
    assert "within-prompt diversity" in md and "artifact rate" in md
    res = json.loads(out["results"].read_text())
    assert res["suites"]["shapeworld-compbench"]["deltas"]["bon"]["heldout_strict"]["paired"] is True
    from PIL import Image

    for p in out["pngs"]:
        w, h = Image.open(p).size
        assert w > 100 and h > 100


def test_cli_eval_bad_inputs_are_one_line(tiny_sd3, tmp_path, capsys):
    from flowalign.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(OFFICIAL[0]) + "\n{not json\n")
    cases = [(["--benchmark", "nope"], "unknown benchmark 'nope'"),
             (["--benchmark", str(tmp_path / "missing.jsonl")], "benchmark file not found"),
             (["--benchmark", str(bad)], "bad.jsonl:2: not valid JSON"),
             (["--model", str(tmp_path)], "is neither a diffusers pipeline"),
             (["--model", str(tmp_path / "nowhere")], "model directory not found"),
             (["--model", tiny_sd3, "--reward", "no_such_reward"], "no_such_reward")]
    for args, msg in cases:
        assert main(["eval", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flowalign: error:") and msg in err[0], (args, err)


def test_official_geneval_file_scored_by_owlv2_through_the_runner(tiny_real, tmp_path):
    from flowalign.eval.geneval import judge
    from flowalign.rewards.geneval import GenEvalReward

    p = _jsonl(tmp_path / "evaluation_metadata.jsonl", OFFICIAL)
    su = S.parse_benchmark(str(p), real_geneval=True)
    runner = S.Runner([S.parse_model("shapeworld")], [su], _opts(tmp_path, geneval_detector=tiny_real["owl"],
                                                                 rewards=()))
    imgs = np.random.default_rng(1).integers(0, 255, (len(OFFICIAL), 32, 32, 3), dtype=np.uint8)
    cache = S.ImageCache(tmp_path / "c", "k", 2, 2.0)
    names = [f"{i}.png" for i in range(len(OFFICIAL))]
    per = runner.score(su, imgs, cache, names)
    rw = GenEvalReward(path=tiny_real["owl"], vocabulary=S.geneval_vocabulary(OFFICIAL))
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2) / 255
    want = [judge(m, d) for m, d in zip(OFFICIAL, rw.detect(x, OFFICIAL))]
    # one fixed vocabulary: an image's detections do not depend on the records it is batched with
    assert rw.detect(x[3:4], OFFICIAL[3:4]) == rw.detect(x, OFFICIAL)[3:4]
    assert [(p["verdicts"]["real"], p["partial"]) for p in per] == [(bool(c), pytest.approx(q)) for c, q in want]
    assert len(cache.scores()) == len(OFFICIAL)  # cached: a second call reads them back
    assert [p["partial"] for p in runner.score(su, imgs, S.ImageCache(tmp_path / "c", "k", 2, 2.0), names)] == \
           [p["partial"] for p in per]


def test_reports_name_the_shipped_model_and_relative_paths_not_this_machines(tmp_path, monkeypatch):
    from flowalign.shapeworld import MODEL_DIR

    run = tmp_path / "runs" / "r1" / "final"
    run.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    m = S.ModelSpec(name="r1", base=str(MODEL_DIR), trained=str(run))
    assert m.describe() == "shapeworld + runs/r1/final"
    assert S.ModelSpec(name="x", base="/elsewhere/model").describe() == "/elsewhere/model"  # outside: as given
