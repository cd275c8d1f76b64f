"""Logits only where labels are: `MultimodalLM.forward(..., supervised_only=True)` equals the full-logits path.

The training room runs the LM head only at the positions t whose next label t + 1 is supervised,
through transformers' boolean `logits_to_keep` (a (batch, seq) mask; the logits come back flattened
to (kept, vocab) in row-major order). Here, on tiny random Llama, Qwen2 and GPT-2 language models
(GPT-2 ties its head to the embedding and has learned positions, so it takes another code path than
the two Llama-likes), saved as Hugging Face folders and wrapped by `MultimodalLM` with the
`tiny-random` vision tower exactly as a run config's `language_model: hf:FOLDER` builds them:

- the supervised-only loss (summed cross-entropy / supervised tokens), its per-row sums and counts,
  and the gradients of every trainable tensor (LoRA or TeamLoRA adapters with the projector, or the
  whole language model including its head) equal the ordinary path (the LM's own mean
  cross-entropy over all positions, labels -100 where unsupervised) to float tolerance, in a batch
  with images, a text-only row, a row without any supervised token and a label at position 0
  (which no path may count);
- a batch with no supervised token at all gives a loss sum of exactly 0 and zero gradients (the
  ordinary mean is NaN there);
- at the LM level, each family's `logits_to_keep=mask` logits are the full logits at the mask
  (the transformers behaviour the model relies on), and a mask one position off is far outside the
  tolerance (so these comparisons can fail);
- a language model whose `forward` has no `logits_to_keep`, or slices it as transformers < 5.21 did
  (where a boolean mask is an IndexError), takes the model's fallback (every position's logits,
  then the kept ones) and gives the same result.

Float64 models throughout; both paths upcast logits to float32 for the cross-entropy (the model
with `.float()`, transformers' loss likewise), so agreement is to float32 rounding of the loss.
"""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config
from transformers.modeling_outputs import CausalLMOutput

from helpers import randomize_adapters
from mm_teamlora.adapters import AdapterConfig, adapter_layers
from mm_teamlora.constants import GROUP_IMAGE, GROUP_TEXT_ONLY, GROUP_TEXT_WITH_IMAGE, IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from mm_teamlora.model import MultimodalConfig, MultimodalLM, VisionTowerConfig
from mm_teamlora.model.multimodal import SupervisedLoss, _takes_boolean_logits_to_keep
from mm_teamlora.tiny_tokenizer import tiny_tokenizer
from model_helpers import make_batch

FAMILIES = ("llama", "qwen2", "gpt2")
TEXTS = ["Describe <image> briefly please, what is shown?",          # image row
         "A text only question without pictures, answer it?",         # text-only row
         "<image> and <image> differ how? Count the items.",          # two images
         "The quick brown fox jumps over the lazy dog."]              # no supervised token at all
IMAGES = [[1], [], [2, 3], []]
LOSS_TOL = dict(rtol=1e-6, atol=1e-9)
GRAD_TOL = dict(rtol=1e-5, atol=1e-9)


def lm_config(family: str, vocab: int):
    """A few layers, small hidden size, no dropout; enough positions for spliced image tokens."""
    common = dict(vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=256)
    if family == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=False, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=True, **common)
    if family == "gpt2":  # tied head, learned positions, Conv1D projections
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256, attn_pdrop=0.0,
                          resid_pdrop=0.0, embd_pdrop=0.0)
    raise ValueError(family)


@pytest.fixture(scope="module")
def lm_folders(tmp_path_factory):
    """family -> a Hugging Face folder (random weights, seed 0, the offline tiny tokenizer)."""
    tokenizer = tiny_tokenizer()
    folders = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(lm_config(family, len(tokenizer))).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = str(folder)
    return folders


def build(folder: str, trainable: str) -> MultimodalLM:
    """The wrapper as a run config builds it (`language_model: hf:FOLDER`, tiny tower), in float64 and
    train mode (dropout is zero everywhere), with `trainable` deciding what requires grad:
    `lora` / `teamlora` (random non-zero adapters, plus the projector, as training) or `lm` (the
    whole language model, head and embeddings included, plus the projector)."""
    config = MultimodalConfig(language_model="hf:" + folder, vision=VisionTowerConfig(kind="preset", path="tiny-random"))
    model = MultimodalLM.from_config(config)
    if trainable == "lm":
        model.language_model.requires_grad_(True)
    else:
        model.add_adapters(AdapterConfig(method=trainable, r=8, num_experts=4, dropout=0.0))
        randomize_adapters(model.language_model, seed=3, scale=0.3)
    return model.double().train()


def batch_with_labels(model):
    """ids, mask, labels, pixels, counts: prompts unsupervised (the first few tokens of each row), answers
    supervised, row 3 entirely unsupervised, row 1 supervised at position 0 too (never predicted)."""
    ids, mask, pixels, counts = make_batch(model, TEXTS, IMAGES)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX).masked_fill(ids == IMAGE_PLACEHOLDER_ID, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX
    labels[1, 0] = ids[1, 0]
    labels[3] = IGNORE_INDEX
    return ids, mask, labels, pixels.double(), counts


def trainable_grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def full_logit_reference(model, ids, mask, labels, pixels, counts):
    """The ordinary path: every position's logits; the LM's own mean loss; per-row sums from those logits."""
    out = model(ids, mask, labels, pixels, counts)
    spliced = model.build_inputs(ids, mask, labels, pixels, counts)["labels"]
    targets = spliced[:, 1:]
    token_loss = nn.functional.cross_entropy(out.logits[:, :-1].float().transpose(1, 2), targets,
                                             ignore_index=IGNORE_INDEX, reduction="none")
    return out.loss, token_loss.sum(1).detach(), (targets != IGNORE_INDEX).sum(1)


@pytest.mark.parametrize("trainable", ["lora", "teamlora", "lm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_supervised_only_loss_and_gradients_equal_the_full_logits_path(lm_folders, family, trainable):
    model = build(lm_folders[family], trainable)
    assert _takes_boolean_logits_to_keep(type(model.language_model))  # the boolean-mask path, not the fallback
    if trainable != "lm":
        assert adapter_layers(model.language_model)
    batch = batch_with_labels(model)

    sup = model(*batch, supervised_only=True)
    assert isinstance(sup, SupervisedLoss)
    tokens = int(sup.row_tokens.sum())
    sup_grads = trainable_grads(model, sup.loss_sum / tokens)
    full_loss, full_row_loss, full_row_tokens = full_logit_reference(model, *batch)
    full_grads = trainable_grads(model, full_loss)

    assert sup.row_tokens.tolist() == full_row_tokens.tolist()
    assert sup.row_tokens[3] == 0 and sup.row_loss[3] == 0 and (sup.row_tokens[[0, 1, 2]] > 0).all()
    assert tokens == int((batch[2][:, 1:] != IGNORE_INDEX).sum())  # label 0 of row 1 is not counted
    torch.testing.assert_close(sup.loss_sum.double() / tokens, full_loss.double(), **LOSS_TOL)
    torch.testing.assert_close(sup.row_loss.double(), full_row_loss.double(), **LOSS_TOL)
    assert set(sup_grads) == set(full_grads)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert expected == set(full_grads) and any(n.startswith("projector.") for n in expected)
    for name in full_grads:
        assert full_grads[name].abs().max() > 0 or name.startswith("projector."), name
        torch.testing.assert_close(sup_grads[name], full_grads[name], **GRAD_TOL, msg=lambda m: f"{name}: {m}")
    # supervised_logits: false in a run: the head everywhere, then the supervised positions
    every = model(*batch, supervised_only=True, all_logits=True)
    torch.testing.assert_close(every.row_loss.double(), full_row_loss.double(), **LOSS_TOL)
    assert every.row_tokens.tolist() == sup.row_tokens.tolist()

    spliced = model.build_inputs(*batch)
    real = spliced["attention_mask"].bool()
    groups = spliced["token_groups"][real]
    assert sup.group_tokens.tolist() == [int((groups == g).sum()) for g in
                                         (GROUP_IMAGE, GROUP_TEXT_WITH_IMAGE, GROUP_TEXT_ONLY)]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_without_supervised_tokens_gives_zero_loss_and_zero_gradients(lm_folders, family):
    model = build(lm_folders[family], "teamlora")
    ids, mask, labels, pixels, counts = batch_with_labels(model)
    labels = torch.full_like(labels, IGNORE_INDEX)
    sup = model(ids, mask, labels, pixels, counts, supervised_only=True)
    assert sup.loss_sum.item() == 0.0 and sup.row_tokens.sum() == 0 and (sup.row_loss == 0).all()
    grads = trainable_grads(model, sup.loss_sum)
    assert grads and all(g.abs().max() == 0 for g in grads.values())
    assert torch.isnan(model(ids, mask, labels, pixels, counts).loss)  # why the room sums instead


@pytest.mark.parametrize("family", FAMILIES)
def test_boolean_logits_to_keep_keeps_each_familys_logits_at_the_mask(lm_folders, family):
    """transformers' contract the model relies on, per family; and a mask one position off (the
    classic shift mistake) is far outside the tolerance of the tests above."""
    lm = AutoModelForCausalLM.from_pretrained(lm_folders[family], dtype=torch.float64).eval()
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(3, 10, lm.config.hidden_size if family != "gpt2" else lm.config.n_embd, generator=gen,
                         dtype=torch.float64)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[2, 7:] = 0
    keep = torch.rand(3, 10, generator=gen) < 0.4
    keep[1] = False  # a row with nothing kept
    keep[2, 7:] = False
    with torch.no_grad():
        full = lm(inputs_embeds=embeds, attention_mask=mask).logits
        kept = lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep).logits
    assert kept.shape == (int(keep.sum()), lm.config.vocab_size)
    torch.testing.assert_close(kept, full[keep], rtol=1e-12, atol=1e-12)

    targets = torch.randint(0, lm.config.vocab_size, (int(keep.sum()),), generator=gen)
    off_by_one = torch.roll(keep, 1, dims=1)
    off_by_one[:, 0] = False
    off_by_one &= mask.bool()
    assert int(off_by_one.sum()) == len(targets)  # same count, different positions
    right = nn.functional.cross_entropy(full[keep], targets)
    wrong = nn.functional.cross_entropy(full[off_by_one], targets)
    assert not torch.allclose(right, wrong, **LOSS_TOL)


class _NoLogitsToKeep(nn.Module):
    """A causal LM whose `forward` does not take `logits_to_keep` (as some remote-code models)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def forward(self, inputs_embeds=None, attention_mask=None, labels=None):
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)


class _IndexSlicing(_NoLogitsToKeep):
    """A causal LM that takes `logits_to_keep` but slices as transformers < 5.21 did
    (`hidden_states[:, logits_to_keep, :]`), where a boolean (batch, seq) mask is an IndexError."""

    def forward(self, inputs_embeds=None, attention_mask=None, labels=None, logits_to_keep=0):
        hidden = self.lm.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return CausalLMOutput(logits=self.lm.lm_head(hidden[:, keep, :]))


@pytest.mark.parametrize("wrapper", [_NoLogitsToKeep, _IndexSlicing])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_language_model_without_boolean_logits_to_keep_takes_the_fallback_with_the_same_result(
        lm_folders, family, wrapper):
    model = build(lm_folders[family], "lora")
    plain = MultimodalLM(wrapper(model.language_model), model.vision_tower, model.projector, model.config,
                         model.tokenizer).train()
    assert not _takes_boolean_logits_to_keep(wrapper)
    batch = batch_with_labels(model)
    if wrapper is _IndexSlicing:  # what the boolean path would meet in such a model
        spliced = model.build_inputs(*batch)
        with pytest.raises(IndexError):
            plain.language_model(inputs_embeds=spliced["inputs_embeds"], attention_mask=spliced["attention_mask"],
                                 logits_to_keep=spliced["labels"] != IGNORE_INDEX)
    kept = model(*batch, supervised_only=True)
    kept_grads = trainable_grads(model, kept.loss_sum)
    fallback = plain(*batch, supervised_only=True)
    fallback_grads = trainable_grads(plain, fallback.loss_sum)
    torch.testing.assert_close(fallback.loss_sum, kept.loss_sum, **LOSS_TOL)
    assert fallback.row_tokens.tolist() == kept.row_tokens.tolist()
    assert {n.replace("language_model.lm.", "language_model.") for n in fallback_grads} == set(kept_grads)
    for name, grad in fallback_grads.items():
        torch.testing.assert_close(grad, kept_grads[name.replace("language_model.lm.", "language_model.")], **GRAD_TOL)
