"""What a Hugging Face model directory holds besides weights (torch-free).

Shared by ``load``'s fingerprint (run by ``plan``, which must not import torch) and
by the torch-side helpers that copy these files along with produced weights.
"""

# Files that travel with a model's weights: config, generation config, tokenizer.
SIDE_FILE_GLOBS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
# Weight formats that unpickle (run code) on load: never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
