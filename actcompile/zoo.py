"""Small, weight-free reference models used by the tests, the benchmarks and the demo.

Every entry builds with random weights and makes its own example inputs; nothing is
downloaded. ``build(name)`` returns ``(model, example_inputs)``.

>>> model, x = build("inplace_cnn")
>>> tuple(model(x).shape)
(4, 10)
"""

from __future__ import annotations

import torch
from torch import nn


class UNet(nn.Module):
    """A two-level U-Net (conv-BN-ReLU blocks, max-pool down, transposed-conv up, skip concat)."""

    def __init__(self, channels: int = 3, width: int = 16, classes: int = 2):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.down1, self.down2 = block(channels, width), block(width, 2 * width)
        self.bottom = block(2 * width, 4 * width)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = block(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = block(2 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        d1 = self.down1(x)
        d2 = self.down2(self.pool(d1))
        b = self.bottom(self.pool(d2))
        u2 = self.dec2(torch.cat([self.up2(b), d2], dim=1))
        u1 = self.dec1(torch.cat([self.up1(u2), d1], dim=1))
        return self.head(u1)


class LSTMTagger(nn.Module):
    """Embedding → 2-layer LSTM → linear: a sequence model whose LSTM is one opaque kernel."""

    def __init__(self, vocab: int = 500, dim: int = 64, classes: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, 2 * dim, num_layers=2, batch_first=True)
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, tokens):
        hidden, _ = self.lstm(self.embed(tokens))
        return self.head(torch.tanh(hidden))


class InplaceCNN(nn.Module):
    """A small CNN built with ``nn.ReLU(inplace=True)`` and dropout."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        x = self.features(x).mean(dim=(2, 3))
        return self.head(self.drop(x))


class MNISTNet(nn.Module):
    """The activation-compression research code's README network (PyTorch's MNIST example):
    two convs, max-pool, dropout, two linears. Its int64 max-pool indices are 1/5 of what it saves."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = torch.flatten(self.dropout1(nn.functional.max_pool2d(x, 2)), 1)
        x = self.dropout2(torch.relu(self.fc1(x)))
        return nn.functional.log_softmax(self.fc2(x), dim=1)


class BranchyNet(nn.Module):
    """Its forward branches on ``x.mean() > 0``: a model no tracer may specialize."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU())
        self.bright = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.dark = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.Tanh())
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        h = self.stem(x)
        h = self.bright(h) if x.mean() > 0 else self.dark(h) * 2
        return self.head(h.mean(dim=(2, 3)))


def _image(batch, size, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tokens(batch, length, vocab, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config), _tokens(4, 64, 1000)


def _gpt2_small():
    """GPT-2-small shapes (12 layers, 768 wide) with a short vocabulary and sequence."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=2048, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config), _tokens(2, 128, 2048)


def _llama():
    """A small Llama (grouped-query attention, RMSNorm, RoPE, SwiGLU) trained without a KV cache.

    Without a cache, Hugging Face's mask code cannot test a traced ``position_ids`` for packed
    sequences, so under Dynamo (actcompile's capture, or any ``torch.compile``) it builds a dense
    4-D mask and SDPA repeats the key/value heads: the captured forward keeps ~6% more than
    the eager one. The analyzer predicts the captured forward's bytes.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         use_cache=False, bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(config), _tokens(4, 64, 1000)


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4,
                        intermediate_size=256, vocab_size=1000, max_position_embeddings=64)
    return BertForMaskedLM(config), _tokens(4, 64, 1000)


def _torchvision(name, batch, size, **kwargs):
    import torchvision

    def make():
        return getattr(torchvision.models, name)(**kwargs), _image(batch, size)

    return make


def _vit_small():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=64, patch_size=8, num_layers=6, num_heads=6, hidden_dim=384,
                              mlp_dim=1536, num_classes=10)
    return model, _image(16, 64)


REGISTRY = {
    "resnet18": _torchvision("resnet18", 8, 64, num_classes=10),
    "resnet50": _torchvision("resnet50", 2, 64, num_classes=10),
    "mobilenet_v2": _torchvision("mobilenet_v2", 4, 64, num_classes=10),
    "vit_b_16": _torchvision("vit_b_16", 4, 64, image_size=64, num_classes=10),
    "unet": lambda: (UNet(), _image(2, 64)),
    "gpt2": _gpt2,
    "bert": _bert,
    "llama": _llama,
    "lstm": lambda: (LSTMTagger(), _tokens(4, 32, 500)),
    "inplace_cnn": lambda: (InplaceCNN(), _image(4, 32)),
    "branchy": lambda: (BranchyNet(), _image(4, 32).abs()),
    "mnist_net": lambda: (MNISTNet(), torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))),
    "gpt2_small": _gpt2_small,
    # benchmark shapes (benchmarks/memory.py)
    "resnet18_b32": _torchvision("resnet18", 32, 64, num_classes=10),
    "mobilenet_v2_b16": _torchvision("mobilenet_v2", 16, 96, num_classes=10),
    "convnext_tiny_b16": _torchvision("convnext_tiny", 16, 64, num_classes=10),
    "vit_small": _vit_small,
}
TRACE_SUITE = ("resnet18", "resnet50", "mobilenet_v2", "vit_b_16", "unet", "gpt2", "bert", "llama", "lstm",
               "inplace_cnn", "branchy", "mnist_net")


def build(name: str, seed: int = 0):
    """``(model in train mode, example_inputs)`` for a registry name, weights seeded by ``seed``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(sorted(REGISTRY))}")
    torch.manual_seed(seed)
    model, inputs = REGISTRY[name]()
    return model.train(), inputs
