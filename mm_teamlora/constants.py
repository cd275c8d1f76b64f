"""Values the data pipeline and the multimodal model agree on."""

# Text marks where an image goes; tokenised samples hold one IMAGE_PLACEHOLDER_ID per image (an id
# outside every vocabulary, as LLaVA does), which the model replaces by that image's feature tokens.
IMAGE_PLACEHOLDER = "<image>"
IMAGE_PLACEHOLDER_ID = -200
IGNORE_INDEX = -100  # label of positions that carry no loss

# token groups handed to the adapters' routing_context
GROUP_IMAGE = 0  # image patch tokens
GROUP_TEXT_WITH_IMAGE = 1  # text tokens of a sample that has at least one image
GROUP_TEXT_ONLY = 2  # text tokens of a text-only sample
NUM_TOKEN_GROUPS = 3
GROUP_NAMES = {GROUP_IMAGE: "image", GROUP_TEXT_WITH_IMAGE: "text_with_image", GROUP_TEXT_ONLY: "text_only"}

# multiple-choice questions in MMBench's layout: the demo data writes them, the evaluation asks them
OPTION_LETTERS = "ABCDEFGHI"  # MMBench's option columns, in order
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."  # LLaVA-1.5's MMBench prompt
