"""Expert masks (adapters) and the causal masking test of the visual / textual split (eval.ablation)."""

import json
import math

import pytest
import torch

from fixtures.eval.helpers import question, routed_tiny_model, write_tsv
from helpers import one_layer, randomize_adapters
from mm_teamlora import cli
from mm_teamlora.adapters import AdapterConfig, adapter_layers, record_routing
from mm_teamlora.adapters.masking import masked_experts
from mm_teamlora.constants import GROUP_IMAGE, GROUP_TEXT_ONLY, GROUP_TEXT_WITH_IMAGE
from mm_teamlora.eval.ablation import ablate, ablation_markdown, choose_experts
from mm_teamlora.eval.routing import inspect_routing, load_samples

K = 4
METHODS = [("teamlora", {}), ("teamlora", {"competition_norm": "reference"}), ("teamlora", {"implementation": "loop"}),
           ("teamlora", {"competition": False}), ("moelora", {}), ("moelora", {"implementation": "loop"}),
           ("hydralora", {})]


def routed_layer(method, extra, seed=0):
    model = one_layer(8, 6, method=method, r=8, num_experts=K, dropout=0.0, **extra)
    randomize_adapters(model, seed)
    layer = model[0]
    if layer.__class__.__name__ == "TeamLoRALinear" and layer.competition is not None:
        with torch.no_grad():  # 1 + M_jj > 0: keeping expert j alone gives it weight +k (routed.py)
            layer.competition.fill_diagonal_(0.0)
    return model, layer


@pytest.mark.parametrize("method,extra", METHODS)
def test_masking_no_expert_is_the_identity_and_all_but_one_forces_that_expert(method, extra):
    model, layer = routed_layer(method, extra)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(x)
        with masked_experts(model, {"0": []}):
            assert layer.expert_mask is not None and not layer.expert_mask.any()
            assert torch.equal(model(x), plain)
        assert layer.expert_mask is None
        for j in range(K):
            with masked_experts(model, {"0": [e for e in range(K) if e != j]}):
                masked = model(x)
            forced = torch.zeros(K)
            forced[j] = K if method == "teamlora" else 1.0  # TeamLoRA's weights sum to k, softmax ones to 1
            expected = layer.base_layer(x) + x @ layer.delta_weight(forced).T
            torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(masked, plain)


def test_a_mask_renormalises_the_rest_and_the_recorder_sees_it():
    model, layer = routed_layer("moelora", {})
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(4))
    keep = torch.tensor([0.0, 1.0, 0.0, 1.0])
    with torch.no_grad():
        phi = layer.router_probs(x @ layer.router.T, None)
        with masked_experts(model, {"0": torch.tensor([True, False, True, False])}), record_routing(model) as record:
            masked = layer.router_probs(x @ layer.router.T, None)
            model(x)
    torch.testing.assert_close(masked, phi * keep / (phi * keep).sum(-1, keepdim=True))
    recorded = record.layers["0"].router_prob_sum[0]
    assert recorded[0] == 0 and recorded[2] == 0 and float(recorded.sum()) == pytest.approx(7.0)
    assert layer.expert_mask is None


def test_mask_errors_and_plain_lora_is_refused_clearly():
    model, layer = routed_layer("teamlora", {})
    with pytest.raises(ValueError, match="at least one must remain"):
        layer.set_expert_mask(list(range(K)))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        layer.set_expert_mask([4])
    with pytest.raises(ValueError, match="not routed adapter layers"):
        with masked_experts(model, {"nope": [0]}):
            pass
    assert layer.expert_mask is None
    lora = one_layer(8, 6, method="lora", r=4)
    with pytest.raises(ValueError, match="routed adapter method.*lora adapters"):
        with masked_experts(lora, {}):
            pass


def layer_entry(image, text_with_image=None, text_only=None):
    groups = {"image": {"mean_router_prob": image}}
    if text_with_image:
        groups["text_with_image"] = {"mean_router_prob": text_with_image}
    if text_only:
        groups["text_only"] = {"mean_router_prob": text_only}
    return {"num_experts": len(image), "groups": groups}


def test_experts_are_chosen_from_image_minus_text_tokens_per_layer():
    layers = {"a": layer_entry([.1, .6, .2, .1], [.7, .1, .1, .1], [.4, .1, .2, .3]),
              "b": layer_entry([.5, .1, .1, .3], [.1, .1, .1, .7], [.1, .2, .6, .1])}
    one = choose_experts(layers, 1, seed=5)
    assert one["contrast"] == "image_vs_text_only"  # text-only text, not the image-grounded samples' text
    assert one["preference"]["a"] == pytest.approx([-.3, .5, 0, -.2])
    assert one["masks"]["image_preferred"] == {"a": [1], "b": [0]}
    assert one["masks"]["text_preferred"] == {"a": [0], "b": [2]}
    two = choose_experts(layers, 2, seed=5)
    assert two["masks"]["image_preferred"] == {"a": [1, 2], "b": [0, 3]}
    assert two["masks"]["text_preferred"] == {"a": [0, 3], "b": [1, 2]}
    gen = torch.Generator().manual_seed(5)
    expected = [sorted(torch.randperm(4, generator=gen)[:2].tolist()) for _ in layers]
    assert list(two["masks"]["random"].values()) == expected
    assert all(len(v) == 2 for v in two["masks"]["random"].values())
    assert choose_experts(layers, 2, seed=5)["masks"]["random"] == two["masks"]["random"]
    # several draws: draw i is the one-draw choice at seed 5 + i; the first is masks["random"]
    three = choose_experts(layers, 2, seed=5, draws=3)
    assert [d["seed"] for d in three["draws"]] == [5, 6, 7]
    for d in three["draws"]:
        assert d["experts"] == choose_experts(layers, 2, seed=d["seed"])["masks"]["random"]
    assert three["masks"]["random"] == two["masks"]["random"] == three["draws"][0]["experts"]
    assert three["masks"]["image_preferred"] == two["masks"]["image_preferred"]
    with pytest.raises(ValueError, match="at least 1"):
        choose_experts(layers, 1, draws=0)
    # no text-only sample (an MMBench file of pictures): the image-grounded samples' text is the contrast
    grounded = {"a": layer_entry([.1, .6, .2, .1], [.7, .1, .1, .1])}
    only = choose_experts(grounded, 1)
    assert only["contrast"] == "image_vs_text_with_image" and only["masks"]["text_preferred"] == {"a": [0]}
    with pytest.raises(ValueError, match="1 to 3"):
        choose_experts(layers, 4)
    with pytest.raises(ValueError, match="image tokens"):
        choose_experts({"a": {"num_experts": 4, "groups": {"text_only": {"mean_router_prob": [.25] * 4}}}}, 1)


def mixed_tsv(tmp_path, pictures=4, texts=3):
    rows = [question(i, answer="ABCD"[i % 4]) for i in range(pictures)]
    rows += [question(100 + i, image="", answer="BCDA"[i % 4]) for i in range(texts)]
    return write_tsv(tmp_path / "mixed.tsv", rows)


def group_routed_model(method, experts_of_group):
    """A routed tiny model whose routers send each token group to one expert: R = 0 and a group
    bias of +1e4 on that expert. TeamLoRA's M is zero, so no expert gets weight through another's
    probability."""
    model = routed_tiny_model(method)
    for layer in adapter_layers(model.language_model).values():
        with torch.no_grad():
            layer.router.zero_()
        if getattr(layer, "competition", None) is not None:
            with torch.no_grad():
                layer.competition.zero_()
        layer.group_bias = torch.nn.Parameter(torch.zeros(3, K))
        with torch.no_grad():
            for group, expert in experts_of_group.items():
                layer.group_bias[group, expert] = 1e4
    return model


@pytest.mark.parametrize("method", ["teamlora", "moelora"])
def test_the_deltas_are_measured_on_the_right_token_groups(tmp_path, method):
    """Image patches route to expert 0, text of image questions to expert 2, text-only text to
    expert 1. Masking the image-preferred expert (0) moves the loss of image questions only, and
    the text-preferred one (1) the loss of text-only questions only: each delta reads its own group."""
    tsv = mixed_tsv(tmp_path)
    model = group_routed_model(method, {GROUP_IMAGE: 0, GROUP_TEXT_WITH_IMAGE: 2, GROUP_TEXT_ONLY: 1})
    result = inspect_routing(model, tsv, str(tmp_path / "r"), plots=False, ablate=True)
    a = result["ablation"]
    assert a["questions"] == {"image": 4, "text_only": 3} and a["answer_tokens"] == {"image": 4, "text_only": 3}
    assert a["contrast"] == "image_vs_text_only"
    names = list(result["layers"])
    assert a["masks"]["image_preferred"]["experts"] == {n: [0] for n in names}
    assert a["masks"]["text_preferred"]["experts"] == {n: [1] for n in names}
    assert all(len(e) == 1 for e in a["masks"]["random"]["experts"].values())  # the control: same count
    image_pref, text_pref = a["masks"]["image_preferred"]["delta"], a["masks"]["text_preferred"]["delta"]
    assert all(math.isfinite(v) for v in (*a["baseline"].values(), *image_pref.values(), *text_pref.values()))
    assert abs(image_pref["image"]) > 1e-3 and abs(image_pref["text_only"]) < 1e-5
    assert abs(text_pref["text_only"]) > 1e-3 and abs(text_pref["image"]) < 1e-5
    difference = a["masks"]["image_preferred"]["image_minus_text"]
    assert difference == pytest.approx(image_pref["image"] - image_pref["text_only"])
    # the baseline is the likelihood scorer's answer loss: -log p(right letter) over the whole vocabulary
    from mm_teamlora.compare import answer_loss
    from mm_teamlora.eval import EvalConfig, evaluate

    log = evaluate(model, tsv, str(tmp_path / "e"), EvalConfig(), progress=False).log
    mean, n = answer_loss(log, tsv)
    pooled = (a["baseline"]["image"] * 4 + a["baseline"]["text_only"] * 3) / 7
    assert n == 7 and pooled == pytest.approx(mean, abs=1e-5)
    assert "## Expert masking" in (tmp_path / "r" / "routing.md").read_text()
    assert json.loads((tmp_path / "r" / "routing.json").read_text())["ablation"]["masks"] == a["masks"]


def test_hydralora_masks_and_conversation_files_use_every_supervised_token(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20), (0, 128, 255)).save(tmp_path / "blue.png")
    turn = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    records = [{"id": "v", "image": "blue.png", "conversations": turn("<image>\nColour?", "Blue, a deep blue.")},
               {"id": "t", "conversations": turn("Hello?", "Hi there, friend.")}]
    (tmp_path / "mix.json").write_text(json.dumps(records))
    model = routed_tiny_model("hydralora")
    samples, _, answers = load_samples(model, str(tmp_path / "mix.json"), with_answers=True)
    supervised = {("image" if s.num_images else "text_only"): sum(t != -100 for t in s.labels) for s in answers}
    result = inspect_routing(model, str(tmp_path / "mix.json"), str(tmp_path / "r"), plots=False, ablate=True,
                             ablate_experts=3)
    a = result["ablation"]
    assert a["answer_tokens"] == supervised and min(supervised.values()) > 1
    assert all(len(e) == 3 for m in a["masks"].values() for e in m["experts"].values())


def test_plain_lora_model_errors_clearly():
    from mm_teamlora.model import load_model

    model = load_model("tiny-random")
    model.add_adapters(AdapterConfig(method="lora", r=4))
    layers = {"x": {"num_experts": 4, "groups": {"image": {"mean_router_prob": [.25] * 4},
                                                 "text_only": {"mean_router_prob": [.25] * 4}}}}
    with pytest.raises(ValueError, match="routed adapter method.*lora adapters"):
        ablate(model, [], layers)


def test_inspect_routing_ablate_end_to_end(tmp_path, capsys):
    from mm_teamlora.model import MultimodalConfig, MultimodalLM

    tsv = mixed_tsv(tmp_path, pictures=3, texts=2)
    model = MultimodalLM.from_config(MultimodalConfig.preset("tiny-random"))
    model.add_adapters(AdapterConfig(method="teamlora", r=8, num_experts=4, group_routing=True))
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "routing"
    assert cli.main(["inspect-routing", "--model", str(tmp_path / "model"), "--data", tsv, "--out", str(out),
                     "--ablate", "--ablate-experts", "2", "--ablate-seed", "3", "--ablate-draws", "2", "--no-plots",
                     "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "image_preferred" in printed and "text_preferred" in printed and "random (mean ± std of 2 draws)" in printed
    routing = json.loads((out / "routing.json").read_text())
    ablation = routing["ablation"]
    assert routing["layers"] and routing["separation"]  # the routing report is still all there
    assert ablation["experts_per_layer"] == 2 and ablation["seed"] == 3 and ablation["questions"] == {
        "image": 3, "text_only": 2}
    assert ablation["random_draws"] == 2 and [d["seed"] for d in ablation["masks"]["random"]["draws"]] == [3, 4]
    assert all(len(e) == 2 for m in ablation["masks"].values() for e in m["experts"].values())
    md = (out / "routing.md").read_text()
    assert "| image_preferred |" in md and "| random, seed 4 |" in md and "random control: 2 draw(s), seeds 3-4" in md
    assert cli.main(["inspect-routing", "--model", str(tmp_path / "model"), "--data", tsv, "--out",
                     str(tmp_path / "none"), "--ablate", "--ablate-draws", "0", "--device", "cpu"]) == 2
    assert "--ablate-draws must be at least 1" in capsys.readouterr().err
    # without --ablate: no ablation; a plain-LoRA model with --ablate: exit 2 and a clear message
    assert cli.main(["inspect-routing", "--model", str(tmp_path / "model"), "--data", tsv, "--out",
                     str(tmp_path / "plain"), "--no-plots", "--device", "cpu"]) == 0
    assert "ablation" not in json.loads((tmp_path / "plain" / "routing.json").read_text())
    capsys.readouterr()
    assert cli.main(["inspect-routing", "--model", "tiny-random", "--data", tsv, "--out", str(tmp_path / "lora"),
                     "--ablate", "--device", "cpu"]) == 2
    assert "routed adapter" in capsys.readouterr().err


def test_compare_summary_and_report_show_the_deltas_mean_over_seeds():
    from mm_teamlora.compare.report import masking_lines
    from mm_teamlora.compare.summary import _masking_summary, masking_means

    def run(seed, img, txt):
        masks = {name: {"delta": {"image": img + i, "text_only": txt - i}, "image_minus_text": img - txt + 2 * i}
                 for i, name in enumerate(("image_preferred", "text_preferred", "random"))}
        ablation = {"baseline": {"image": 2.0, "text_only": 3.0}, "questions": {"image": 4, "text_only": 2},
                    "experts_per_layer": 1, "contrast": "image_vs_text_only", "masks": masks}
        return {"seed": seed, "routing": {"masking": _masking_summary(ablation)}}

    means = masking_means([run(0, 0.5, 0.1), run(1, 0.7, 0.1), {"seed": 2, "routing": None}])
    assert means["runs"] == 2 and means["baseline"]["image"]["mean"] == pytest.approx(2.0)
    assert means["masks"]["image_preferred"]["image"]["mean"] == pytest.approx(0.6)
    assert means["masks"]["image_preferred"]["image"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert means["masks"]["random"]["text_only"]["mean"] == pytest.approx(-1.9)
    text = "\n".join(masking_lines({"teamlora": {"masking": means}, "lora": {"masking": None}}))
    assert "causal masking" in text and "| teamlora | 2 |" in text and "+0.600 ± 0.141" in text
    assert "teamlora, Δ img - Δ text against the random control" in text
    assert masking_means([{"routing": None}]) is None


def test_the_masking_table_claims_a_split_only_when_the_gaps_order_so():
    def result(image_pref, text_pref, rand):
        masks = {name: {"loss": {"image": 1.0, "text_only": 1.0}, "delta": {"image": 0.0, "text_only": 0.0},
                        "image_minus_text": gap}
                 for name, gap in (("image_preferred", image_pref), ("text_preferred", text_pref), ("random", rand))}
        return {"experts_per_layer": 1, "layers": 2, "contrast": "image_vs_text_only", "seed": 0,
                "questions": {"image": 3, "text_only": 2}, "baseline": {"image": 1.0, "text_only": 1.0}, "masks": masks}

    assert "Consistent with a causal split: " in ablation_markdown(result(0.3, -0.2, 0.01))
    shown = ablation_markdown(result(0.027, -0.087, 0.023))
    assert "+0.0270 masking the image-preferred" in shown and "no spread" in shown
    assert "No causal split shown" in ablation_markdown(result(0.01, -0.2, 0.05))  # random hurts images more


def test_the_random_control_is_several_draws_each_with_its_own_seed(tmp_path):
    """Draw i masks the experts seed + i draws and is measured as a one-draw test at that seed
    would be; the control's figures are the draws' mean and sample std; the preferred masks do not
    depend on the draws."""
    tsv = mixed_tsv(tmp_path)
    model = routed_tiny_model("teamlora")
    layers = inspect_routing(model, tsv, str(tmp_path / "r"), plots=False)["layers"]
    _, _, answers = load_samples(model, tsv, with_answers=True)
    three = ablate(model, answers, layers, 1, seed=7, random_draws=3)
    random = three["masks"]["random"]
    assert three["random_draws"] == 3 and [d["seed"] for d in random["draws"]] == [7, 8, 9]
    for d in random["draws"]:
        assert d["experts"] == choose_experts(layers, 1, d["seed"])["masks"]["random"]
    assert len({json.dumps(d["experts"]) for d in random["draws"]}) == 3  # three different masks
    assert random["experts"] == random["draws"][0]["experts"]
    # each draw is what a one-draw test at its seed measures
    alone = ablate(model, answers, layers, 1, seed=8, random_draws=1)
    assert alone["masks"]["random"]["delta"] == pytest.approx(random["draws"][1]["delta"], abs=1e-6)
    for name in ("image_preferred", "text_preferred"):
        assert alone["masks"][name]["experts"] == three["masks"][name]["experts"]
        assert alone["masks"][name]["delta"] == pytest.approx(three["masks"][name]["delta"], abs=1e-6)
    # mean and sample std over the draws, for both deltas and their difference
    figures = {"image": [d["delta"]["image"] for d in random["draws"]],
               "text_only": [d["delta"]["text_only"] for d in random["draws"]],
               "image_minus_text": [d["image_minus_text"] for d in random["draws"]]}
    for key, values in figures.items():
        mean = sum(values) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
        assert std > 0, key  # the draws differ, so the control has a spread
        assert random["std"][key] == pytest.approx(std)
        assert (random["image_minus_text"] if key == "image_minus_text" else random["delta"][key]) == pytest.approx(mean)
    for d in random["draws"]:
        assert d["image_minus_text"] == pytest.approx(d["delta"]["image"] - d["delta"]["text_only"])
        assert d["loss"]["image"] == pytest.approx(three["baseline"]["image"] + d["delta"]["image"])
    assert random["loss"]["text_only"] == pytest.approx(three["baseline"]["text_only"] + random["delta"]["text_only"])
    md = ablation_markdown(three)
    assert "| random (mean ± std of 3 draws) |" in md and all(f"| random, seed {s} |" in md for s in (7, 8, 9))
    assert f"{random['image_minus_text']:+.4f} ± {random['std']['image_minus_text']:.4f}" in md
    # one draw: no spread (std None) and the reading says so
    assert alone["random_draws"] == 1 and alone["masks"]["random"]["std"] == {
        "image": None, "text_only": None, "image_minus_text": None}
    one = ablation_markdown(alone)
    assert "One random draw gives the control no spread" in one and "| random |" in one and "seed 8)" in one
    assert "mean ± 2 std" not in one


def masking_result(image_pref: float, text_pref: float, draws: list[float]) -> dict:
    """A masking result whose preferred masks and random draws have these Δ image - Δ text-only."""
    def figures(gap):
        return {"loss": {"image": 1.0 + gap, "text_only": 1.0}, "delta": {"image": gap, "text_only": 0.0},
                "image_minus_text": gap}

    mean = sum(draws) / len(draws)
    std = math.sqrt(sum((g - mean) ** 2 for g in draws) / (len(draws) - 1)) if len(draws) > 1 else None
    random = {**figures(mean), "std": {"image": std, "text_only": 0.0 if std is not None else None,
                                       "image_minus_text": std},
              "draws": [{"seed": 10 + i, **figures(g)} for i, g in enumerate(draws)]}
    return {"experts_per_layer": 1, "layers": 2, "contrast": "image_vs_text_only", "seed": 10,
            "random_draws": len(draws), "questions": {"image": 3, "text_only": 2},
            "baseline": {"image": 1.0, "text_only": 1.0},
            "masks": {"image_preferred": figures(image_pref), "text_preferred": figures(text_pref), "random": random}}


def test_the_reading_compares_the_preferred_masks_with_the_random_draws_spread():
    """Rule: beyond the draws' mean ± 2 sample std, on the side a split predicts (image-preferred
    above, text-preferred below). Draws [0, .01, .02]: mean +0.01, std 0.01, band [-0.01, +0.03]."""
    draws = [0.0, 0.01, 0.02]
    both = ablation_markdown(masking_result(0.3, -0.2, draws))
    assert "Consistent with a causal split: both preferred masks lie beyond the random control" in both
    assert "+0.0100 ± 0.0100 (mean ± sample std) over 3 random draws (seeds 10-12)" in both
    assert "the band mean ± 2 std = [-0.0100, +0.0300]" in both
    assert "+0.3000 masking the image-preferred experts (above the band)" in both
    assert "-0.2000 masking the text-preferred ones (below the band)" in both
    assert "no spread" not in both and "roughly" in both  # three draws estimate the spread roughly
    # just inside the band (+0.029 < +0.03) does not count; just outside (+0.031) does
    inside = ablation_markdown(masking_result(0.029, -0.2, draws))
    assert "Partly consistent with a causal split: only the text-preferred masks" in inside
    assert "(inside the band)" in inside
    assert "Partly consistent with a causal split: only the image-preferred" in ablation_markdown(
        masking_result(0.031, -0.009, draws))
    assert "Consistent with a causal split: both" in ablation_markdown(masking_result(0.031, -0.011, draws))
    # beyond the band on the wrong side is no evidence for the split
    wrong = ablation_markdown(masking_result(-0.2, 0.3, draws))
    assert "No causal split shown: neither preferred mask" in wrong and "(below the band)" in wrong
    # the gaps that one draw puts in split order fall inside a wide spread of three draws
    assert "Consistent with a causal split: " in ablation_markdown(masking_result(0.027, -0.087, [0.023]))
    wide = ablation_markdown(masking_result(0.027, -0.087, [0.023, 0.1, -0.08]))
    assert "No causal split shown" in wide and wide.count("(inside the band)") == 2
    # draws that all give one figure: no spread, only the order, and a caveat
    same = ablation_markdown(masking_result(0.3, -0.2, [0.01, 0.01, 0.01]))
    assert "Consistent with a causal split: " in same and "The draws gave no spread" in same
    assert "the band" not in same
    # a group of questions missing: no reading at all
    missing = masking_result(0.3, -0.2, draws)
    missing["masks"]["image_preferred"]["image_minus_text"] = None
    assert "No reading: a group of questions is missing." in ablation_markdown(missing)
