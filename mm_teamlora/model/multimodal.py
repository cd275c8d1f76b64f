"""The LLaVA-style model: frozen vision tower -> trainable projector -> any HF causal LM.

One wrapper for every backbone: the language model is used only through its public interface
(`get_input_embeddings`, `forward(inputs_embeds=...)`, `generate(inputs_embeds=...)`), so any
`AutoModelForCausalLM` works without per-architecture code or patches.

Splicing: a tokenised sample holds one IMAGE_PLACEHOLDER_ID per image; `build_inputs` replaces each
by that image's `image_token_count` projected feature tokens, re-pads the batch (right for training,
left for generation), sets labels to IGNORE_INDEX on image positions, and gives every position a
token group (image patch / text of an image-grounded sample / text of a text-only sample) which,
with the padding mask, reaches the adapters through `routing_context` on every forward.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from ..adapters import (AdapterConfig, adapter_layers, adapter_state_dict, apply_adapters, checkpoint_context_fn,
                        load_adapter, routing_context, save_adapter)
from ..constants import (GROUP_IMAGE, GROUP_TEXT_ONLY, GROUP_TEXT_WITH_IMAGE, IGNORE_INDEX, IMAGE_PLACEHOLDER_ID,
                         NUM_TOKEN_GROUPS)
from ..adapters.state import cpu_tensors
from ..files import atomic_write, atomic_write_text
from ..padding import pad, padding_mask
from .builder import build_parts
from .config import CONFIG_FILE, MODEL_PRESETS, PROJECTOR_FILE, MultimodalConfig
from .vision import VisionTower

LM_PREFIX, PROJECTOR_PREFIX = "language_model.", "projector."


@dataclasses.dataclass
class SupervisedLoss(ModelOutput):
    """`MultimodalLM.forward(..., supervised_only=True)`: cross-entropy summed over the supervised
    tokens (labels shifted by one, as every causal LM), and per row the summed (detached) loss and
    the number of supervised tokens; `group_tokens` counts the real tokens the language model ran
    per token group (image, text with image, text only); `tower_features` are the vision tower's
    outputs (before the projector) for the images it ran on in this forward, when `tower_features`
    was given to `forward` (the entries that were None, in order; None if it ran on none), so a
    feature cache can store them."""

    loss_sum: torch.Tensor | None = None
    row_loss: torch.Tensor | None = None
    row_tokens: torch.Tensor | None = None
    group_tokens: torch.Tensor | None = None
    tower_features: torch.Tensor | None = None


@functools.cache
def _takes_boolean_logits_to_keep(model_class: type) -> bool:
    """Whether `model_class.forward` accepts a boolean (batch, seq) `logits_to_keep`: it takes the
    argument and the module that defines it slices with transformers' `slice_logits_to_keep`
    (transformers >= 5.21, which added boolean masks; older models index
    `hidden_states[:, logits_to_keep, :]`, which fails on a 2-D mask). Other models get every
    position's logits, then the kept ones: the same result, without the saving."""
    if "logits_to_keep" not in inspect.signature(model_class.forward).parameters:
        return False
    owner = next(k for k in model_class.__mro__ if "forward" in vars(k))
    return hasattr(sys.modules.get(owner.__module__), "slice_logits_to_keep")


class MultimodalLM(nn.Module):
    def __init__(self, language_model: nn.Module, vision_tower: VisionTower, projector: nn.Module,
                 config: MultimodalConfig, tokenizer=None):
        super().__init__()
        self.language_model = language_model.requires_grad_(False)
        self.vision_tower = vision_tower.requires_grad_(False)
        self.projector = projector.requires_grad_(True)
        self.config = config  # how to rebuild this model
        self.tokenizer = tokenizer
        # A batch without images normally skips the tower. Where parameters are sharded and
        # gathered by collectives (ZeRO-3), every rank must run the same modules on every forward,
        # so a batch without images runs tower and projector on a blank image whose features are
        # multiplied by zero. The training room turns this on; nothing else changes.
        self.vision_on_every_batch = False

    @classmethod
    def from_config(cls, config: MultimodalConfig) -> "MultimodalLM":
        """Build the model `config` describes: frozen LM and tower, projector trainable."""
        parts = build_parts(config)
        return cls(parts.language_model, parts.vision_tower, parts.projector, parts.config, parts.tokenizer)

    def train(self, mode: bool = True) -> "MultimodalLM":
        """The frozen vision tower stays in eval mode (no dropout or drop-path) whatever the mode."""
        super().train(mode)
        self.vision_tower.eval()
        return self

    @property
    def image_token_count(self) -> int:
        return self.vision_tower.num_tokens

    def data_inputs(self) -> dict:
        """What the data pipeline needs from this model, as `build_dataset` takes it:
        `build_dataset(mixture, **model.data_inputs())`."""
        return {"tokenizer": self.tokenizer, "image_processor": self.vision_tower.preprocess,
                "image_token_count": self.image_token_count}

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds, by their names in this model: the projector's and the
        adapters' (never the frozen LM or tower). A training engine that shards parameters gathers
        exactly these and hands them to `save_pretrained(state_dict=...)`."""
        state = {PROJECTOR_PREFIX + k: v for k, v in self.projector.state_dict(keep_vars=True).items()}
        if adapter_layers(self.language_model):
            state.update({LM_PREFIX + k: v for k, v in adapter_state_dict(self.language_model).items()})
        return state

    def save_pretrained(self, directory: str, state_dict: dict[str, torch.Tensor] | None = None) -> str:
        """Write config, projector and adapters into `directory` (each file written whole, then
        renamed into place). `state_dict` (keys as `checkpoint_state_dict`) replaces the live
        tensors, e.g. full tensors gathered from ZeRO-3 shards; which process writes is the
        caller's choice."""
        state = self.checkpoint_state_dict() if state_dict is None else state_dict
        expected = set(self.checkpoint_state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"state_dict does not match the model's checkpoint tensors: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        state = cpu_tensors(state)  # refuses empty (ungathered) tensors before anything is written
        os.makedirs(directory, exist_ok=True)
        projector = {k[len(PROJECTOR_PREFIX):]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)}
        atomic_write(os.path.join(directory, PROJECTOR_FILE), lambda p: save_file(projector, p))
        if adapter_layers(self.language_model):
            adapter = {k[len(LM_PREFIX):]: v for k, v in state.items() if k.startswith(LM_PREFIX)}
            save_adapter(self.language_model, directory, state_dict=adapter)
        atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(self.config.to_dict(), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str) -> "MultimodalLM":
        """Rebuild a model from a folder written by `save_pretrained`."""
        config = MultimodalConfig.load(directory)
        model = cls.from_config(dataclasses.replace(config, projector_init=None))
        model.projector.load_state_dict(load_file(os.path.join(directory, PROJECTOR_FILE)), strict=True)
        if os.path.isfile(os.path.join(directory, "adapter_config.json")):
            load_adapter(model.language_model, directory)
        model.config = config
        return model

    # -- adapters ----------------------------------------------------------------------------
    def add_adapters(self, config: AdapterConfig) -> "MultimodalLM":
        """Adapters go on the language model only; the projector stays trainable, the tower frozen."""
        if config.group_routing and config.num_token_groups < NUM_TOKEN_GROUPS:
            raise ValueError(f"group_routing needs num_token_groups >= {NUM_TOKEN_GROUPS} (image, text with "
                             f"image, text only); got {config.num_token_groups}")
        apply_adapters(self.language_model, config)
        self.projector.requires_grad_(True)
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Non-reentrant checkpointing of the LM whose replays re-enter the routing context."""
        kwargs = {"use_reentrant": False, "context_fn": checkpoint_context_fn}
        if hasattr(self.language_model, "activation_checkpointing_enable"):
            self.language_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # -- images -> embeddings ----------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, image_token_count, lm_hidden), in the LM's embedding dtype."""
        return self.project(self.vision_tower(pixel_values))

    def project(self, tower_features: torch.Tensor) -> torch.Tensor:
        """The vision tower's output (N, image_token_count, tower_hidden) -> the projector's, in the
        LM's embedding dtype."""
        projector_dtype = next(self.projector.parameters()).dtype
        embed_dtype = self.language_model.get_input_embeddings().weight.dtype
        return self.projector(tower_features.to(projector_dtype)).to(embed_dtype)

    def _known_tower_features(self, pixel_values: torch.Tensor, known: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(all N images' tower features, those the tower computed now) from `known` (N entries,
        None where not known) and `pixel_values` (all N images). The tower runs once, on the unknown
        images only; where every image is known and `vision_on_every_batch` is on, it runs on the
        blank image instead (its output unused), so each rank still makes the tower's collectives."""
        if len(known) != pixel_values.shape[0]:
            raise ValueError(f"tower_features has {len(known)} entries for {pixel_values.shape[0]} images")
        missing = [i for i, f in enumerate(known) if f is None]
        computed = self.vision_tower(pixel_values[missing]) if missing else None
        if computed is None and self.vision_on_every_batch:
            self.vision_tower(self.vision_tower.blank_pixels().to(pixel_values.device))
        rows = list(known)
        for j, i in enumerate(missing):
            rows[i] = computed[j]
        return torch.stack(rows), computed

    def build_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                     image_counts: torch.Tensor | None = None, padding_side: str = "right",
                     image_features: torch.Tensor | None = None, tower_features: list | None = None) -> dict:
        """Splice image features into the token embeddings. Returns inputs_embeds, attention_mask,
        labels (None if none given) and token_groups, all over the expanded, re-padded sequence.
        `image_features` (from `encode_images`) replaces `pixel_values` when the same images are
        used again (e.g. one question asked with its options in several orders).

        `tower_features` (with `pixel_values`, which still holds every image): one entry per image,
        the frozen tower's output (image_token_count, tower_hidden) where already known (a feature
        cache), else None; the tower runs on the others only, and the projector on all of them.
        The returned dict then also holds `tower_features`: what the tower computed (or None)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        real = attention_mask.bool()
        placeholders = (input_ids == IMAGE_PLACEHOLDER_ID) & real
        in_text = placeholders.sum(1)
        if image_counts is None:
            image_counts = in_text
        for b in (in_text != image_counts.to(in_text.device)).nonzero().flatten().tolist():
            raise ValueError(f"sample {b}: {int(in_text[b])} <image> placeholders but {int(image_counts[b])} images")
        total = int(image_counts.sum())
        source = pixel_values if image_features is None else image_features
        given = 0 if source is None else source.shape[0]
        if given != total:
            raise ValueError(f"the batch's placeholders need {total} images but {given} were given")
        computed = None
        if tower_features is not None and image_features is None and total:
            all_tower, computed = self._known_tower_features(pixel_values, tower_features)
            features = self.project(all_tower)
        else:
            features = image_features if image_features is not None else (self.encode_images(pixel_values) if total else None)
        if features is None and self.vision_on_every_batch:
            blank = self.encode_images(self.vision_tower.blank_pixels().to(input_ids.device))
        embeds = self.language_model.get_input_embeddings()(input_ids.masked_fill(placeholders, 0))
        if features is None and self.vision_on_every_batch:
            embeds = embeds + 0.0 * blank.sum()
        elif features is None and torch.is_grad_enabled() and any(p.requires_grad for p in self.projector.parameters()):
            # keep the projector in the autograd graph (zero gradient), so every data-parallel
            # rank reduces the same parameters whether or not its batch holds an image
            embeds = embeds + 0.0 * sum(p.sum() for p in self.projector.parameters()).to(embeds.dtype)

        rows, next_image = [], 0
        for b in range(input_ids.shape[0]):
            keep = real[b].nonzero().flatten()
            ids, emb = input_ids[b, keep], embeds[b, keep]
            lab = labels[b, keep] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            text_group = GROUP_TEXT_WITH_IMAGE if int(image_counts[b]) > 0 else GROUP_TEXT_ONLY
            parts_e, parts_l, parts_g, start = [], [], [], 0
            for p in (ids == IMAGE_PLACEHOLDER_ID).nonzero().flatten().tolist() + [len(ids)]:
                parts_e.append(emb[start:p])
                parts_l.append(lab[start:p])
                parts_g.append(torch.full((p - start,), text_group, device=ids.device))
                if p < len(ids):
                    image = features[next_image]
                    next_image += 1
                    parts_e.append(image)
                    parts_l.append(torch.full((image.shape[0],), IGNORE_INDEX, device=ids.device))
                    parts_g.append(torch.full((image.shape[0],), GROUP_IMAGE, device=ids.device))
                start = p + 1
            rows.append((torch.cat(parts_e), torch.cat(parts_l), torch.cat(parts_g)))
        out = _pad_rows(rows, padding_side, labels is not None)
        if tower_features is not None:
            out["tower_features"] = computed
        return out

    # -- forward and generation --------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, image_counts=None,
                image_features=None, supervised_only: bool = False, tower_features=None, all_logits: bool = False,
                **kwargs):
        """The language model's output over the spliced sequence (its `loss` is the mean over
        supervised tokens when `labels` are given). `supervised_only=True` (needs labels) returns
        a `SupervisedLoss` instead, with logits computed only where the next label is supervised
        (`all_logits=True`: at every position, then those kept; the same loss, the head's full cost)
        (and, with `tower_features` (see `build_inputs`), the tower's newly computed features)."""
        inputs = self.build_inputs(input_ids, attention_mask, labels, pixel_values, image_counts,
                                   image_features=image_features, tower_features=tower_features)
        computed = inputs.pop("tower_features", None)
        if supervised_only:
            if labels is None:
                raise ValueError("supervised_only=True needs labels")
            return self._supervised_loss(inputs, tower_features=computed, all_logits=all_logits, **kwargs)
        with routing_context(inputs["token_groups"], inputs["attention_mask"].bool()):
            return self.language_model(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
                                       labels=inputs["labels"], **kwargs)

    def _supervised_loss(self, inputs: dict, tower_features: torch.Tensor | None = None, all_logits: bool = False,
                         **kwargs) -> "SupervisedLoss":
        """Cross-entropy summed over supervised tokens, with the LM head run only at the positions
        t whose label t + 1 is supervised (transformers' boolean `logits_to_keep`), so each model
        keeps its own logit post-processing. Most positions of a multimodal batch (prompts, image
        tokens) carry no label, and the head is a large share of a small model's FLOPs."""
        labels, mask = inputs["labels"], inputs["attention_mask"]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        targets = labels[:, 1:][keep[:, :-1]]
        with routing_context(inputs["token_groups"], mask.bool()):
            if not all_logits and _takes_boolean_logits_to_keep(type(self.language_model)):
                logits = self.language_model(inputs_embeds=inputs["inputs_embeds"], attention_mask=mask,
                                             logits_to_keep=keep, **kwargs).logits
            else:  # a model without (boolean) logits_to_keep: every position's logits, then the kept ones
                logits = self.language_model(inputs_embeds=inputs["inputs_embeds"], attention_mask=mask,
                                             **kwargs).logits[keep]
        token_loss = nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        rows = keep.nonzero()[:, 0]
        row_loss = torch.zeros(labels.shape[0], device=labels.device).index_add_(0, rows, token_loss.detach())
        real_groups = inputs["token_groups"][mask.bool()]
        return SupervisedLoss(loss_sum=token_loss.sum(), row_loss=row_loss, row_tokens=keep.sum(1),
                              group_tokens=torch.bincount(real_groups, minlength=NUM_TOKEN_GROUPS),
                              tower_features=tower_features)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_counts=None, image_features=None,
                 **kwargs) -> torch.Tensor:
        """Batched generation with left padding and KV cache; returns only the new token ids.
        Every forward of the language model gets its routing inputs explicitly (adapters'
        `generation_routing`, for the length of this call): prompt tokens their groups and padding
        mask, rows that `generate` expands (beams, `num_return_sequences`) their source row's, and
        every new token its row's text group (text with image where the row holds an image, else
        text only). Runs under `torch.inference_mode` (cheaper small ops, which a decode step is
        made of) and returns an ordinary tensor, so the ids can feed a training forward."""
        from ..adapters import generation_routing

        with torch.inference_mode():
            inputs = self.build_inputs(input_ids, attention_mask, None, pixel_values, image_counts,
                                       padding_side="left", image_features=image_features)
            if self.tokenizer is not None:
                kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
                kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
            groups, mask = inputs["token_groups"], inputs["attention_mask"]
            text_group = torch.where((groups == GROUP_IMAGE).any(1), GROUP_TEXT_WITH_IMAGE, GROUP_TEXT_ONLY)
            with generation_routing(self.language_model, groups, mask.bool(), new_token_groups=text_group):
                new_ids = self.language_model.generate(inputs_embeds=inputs["inputs_embeds"], attention_mask=mask,
                                                       **kwargs)
        return new_ids.clone()


def _pad_rows(rows, padding_side: str, with_labels: bool) -> dict:
    """Spliced (embeddings, labels, token groups) rows as one padded batch (`padding.pad`)."""
    embeds, labels, groups = zip(*rows)
    mask = padding_mask([e.shape[0] for e in embeds], side=padding_side, device=embeds[0].device)
    return {"inputs_embeds": pad(embeds, 0, padding_side), "attention_mask": mask,
            "labels": pad(labels, IGNORE_INDEX, padding_side) if with_labels else None,
            "token_groups": pad(groups, GROUP_TEXT_ONLY, padding_side)}


def load_model(spec: str) -> MultimodalLM:
    """A model folder written by `save_pretrained`, or the name of a model preset."""
    if os.path.isfile(os.path.join(spec, CONFIG_FILE)):
        return MultimodalLM.from_pretrained(spec)
    if spec in MODEL_PRESETS:
        return MultimodalLM.from_config(MultimodalConfig.preset(spec))
    raise FileNotFoundError(f"{spec!r} is neither a model folder (no {CONFIG_FILE} there) nor a preset "
                            f"({', '.join(MODEL_PRESETS)})")
