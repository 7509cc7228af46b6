"""Fine-tuning on real data at a stated memory: accuracy, activation MB, peak MB and step time.

Nothing is downloaded; the data ships in a package:

* ``digits`` — "setup B" of the low-rank (HOSVD) paper, on scikit-learn's 1,797 real handwritten
  digits upsampled to 3×32×32: torchvision's ResNet-18 is pretrained on digits 0–4, then a fresh
  5-class head is fine-tuned on 5–9, all layers (``all``) or only ``layer4`` and the head
  (``last``, the paper's last-k layers; the earlier layers frozen).
* ``text`` — a byte-level GPT-2-shaped model (HF config, random init) trained on the standard
  library's own Python sources; validation loss on other files of it.
* ``overfit`` — the TMLR paper's claim that compression regularises: ResNet-18 trained from
  scratch on 100 digits for long enough to overfit; the train/test accuracy gap with and without
  compression.

Ways: uncompressed; ``actcompile`` at 1/4, 1/8, 1/16 of the model's activation bytes (default
codecs, recompute on: the joint plan); each research method at its authors' setting, applied as
their code does, whatever the memory: what every trainable Conv2d, BatchNorm2d and ReLU saves
(the TMLR paper's Conv+BN+ReLU configuration) for DCT, thresholding and wavelet, what every
trainable Conv2d saves (its input) for HOSVD and band-limiting;
and ``torch.utils.checkpoint`` (``checkpoint_sequential``, 4 segments; HF's own gradient
checkpointing for GPT-2). The research settings, in our codecs' terms: DCT and thresholding at
λ = 100 (drop rate r = 1 − 1/λ: keep 1% of the coefficients, the largest, 8×8 DCT blocks as in
their code), wavelet db3 with 3 levels (keep 1%), HOSVD at explained variance 0.8 and 0.9
(ε = √(1 − v)), band-limiting at 50% (the FFT spectrum halved).

Every way of one seed starts from the same weights and sees the same batches. Memory is measured
on one training batch after two warm-up steps: activation MB = heap growth across the forward
(what it leaves alive: saves plus outputs), peak MB = resident high-water mark over forward +
backward; step-time ratio = the way's mean training step over the uncompressed one's (same seed).

    python benchmarks/finetune.py > benchmarks/results/finetune.md    # all tasks, 3 seeds (~70 min)
    python benchmarks/finetune.py --from-rows benchmarks/results/finetune.json  # tables and plot again
    python benchmarks/finetune.py --tasks digits --seeds 0 --epochs 1 # a quick look
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from speed import Checkpointed, measure_memory  # noqa: E402  (one memory probe for every table)

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ACTCOMPILE_BUDGETS = {"actcompile 1/4": 0.25, "actcompile 1/8": 0.125, "actcompile 1/16": 0.0625}
CONV_BN_RELU = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)
RESEARCH = {   # name: (codec, options, the modules whose saves it packs), at the authors' settings
    "DCT λ=100": ("dct", dict(block=8, select="largest", keep=0.01), CONV_BN_RELU),
    "threshold λ=100": ("threshold", dict(keep=0.01), CONV_BN_RELU),
    "wavelet db3 L3": ("wavelet", dict(wave="db3", levels=3, keep=0.01), CONV_BN_RELU),
    "HOSVD v=0.8": ("hosvd", dict(epsilon=math.sqrt(1 - 0.8)), (nn.Conv2d,)),
    "HOSVD v=0.9": ("hosvd", dict(epsilon=math.sqrt(1 - 0.9)), (nn.Conv2d,)),
    "band-limit 50%": ("fft_lowpass", dict(compress_rate=0.5), (nn.Conv2d,)),
}
IMAGE_WAYS = ("uncompressed", *ACTCOMPILE_BUDGETS, *RESEARCH, "checkpoint")
LAST_K_WAYS = ("uncompressed", "actcompile 1/4", "actcompile 1/8", "HOSVD v=0.8", "HOSVD v=0.9")
TEXT_WAYS = ("uncompressed", *ACTCOMPILE_BUDGETS, "checkpoint")
OVERFIT_WAYS = ("uncompressed", "actcompile 1/8", "actcompile 1/16", "threshold λ=100", "wavelet db3 L3")
METRICS = {"valid_loss": "validation loss", "test_acc": "test accuracy"}


# -- data ----------------------------------------------------------------------------------
def digit_images():
    """All 1,797 digits as 3×32×32 images in [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return images, torch.tensor(data.target)


def split(x, y, seed: int, train_share: float = 0.8, train_count: int | None = None):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = train_count if train_count is not None else int(train_share * len(order))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def batches_of(x, y, batch: int, seed: int, epochs: int):
    """``epochs`` shuffled passes of equal-sized batches (the last partial batch dropped)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        out += [(x[i], y[i]) for i in order.split(batch) if len(i) == batch]
    return out


def stdlib_bytes(limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation bytes of the standard library's Python sources (sorted files;
    every tenth file is validation)."""
    root = pathlib.Path(os.__file__).parent
    train, valid = bytearray(), bytearray()
    for i, path in enumerate(sorted(root.glob("*.py"))):
        (valid if i % 10 == 0 else train).extend(path.read_bytes())
        if len(train) >= limit and len(valid) >= limit // 10:
            break
    as_tensor = lambda b: torch.frombuffer(bytes(b), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train[:limit]), as_tensor(valid[:limit // 10])


# -- the research methods, as their code applies them --------------------------------------
class _Packed:
    __slots__ = ("codec", "payload")

    def __init__(self, codec, payload):
        self.codec, self.payload = codec, payload


def compress_saves_in_(model: nn.Module, codec, module_types=(nn.Conv2d,), tally: dict | None = None) -> nn.Module:
    """Pack what every trainable module of ``module_types`` saves with ``codec``, as the research
    code's compressed layers do (by default its compressed convolution: the conv's input; the
    weight is a Parameter and stays). Activations only: floating tensors of 3 or more dims that
    are not parameters or buffers, and that the codec supports (the wavelet needs maps of at
    least 2^levels a side: a 3-level db3 transform of a 1×1 map has 139 coefficients). ``tally`` (if given) adds up ``raw_bytes`` and
    ``packed_bytes`` of every pack: the papers' own memory metric. Mutates ``model`` (the hooks
    stay installed) and returns it."""
    from actcompile.codecs.base import TensorSpec, packed_bytes

    held = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(t):
        if t.is_floating_point() and t.dim() >= 3 and t.data_ptr() not in held and codec.supports(TensorSpec.of(t)):
            payload = codec.pack(t)
            if tally is not None:
                tally["raw_bytes"] = tally.get("raw_bytes", 0) + t.numel() * t.element_size()
                tally["packed_bytes"] = tally.get("packed_bytes", 0) + packed_bytes(payload)
            return _Packed(codec, payload)
        return t

    def unpack(saved):
        return saved.codec.unpack(saved.payload) if isinstance(saved, _Packed) else saved

    contexts = {}

    def enter(module, args):
        contexts[module] = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        contexts[module].__enter__()

    def leave(module, args, out):
        contexts.pop(module).__exit__(None, None, None)

    for m in model.modules():
        trainable = any(p.requires_grad for p in m.parameters(recurse=False)) or not list(m.parameters(recurse=False))
        if isinstance(m, module_types) and trainable:
            m.register_forward_pre_hook(enter)
            m.register_forward_hook(leave)
    return model


# -- one training run ----------------------------------------------------------------------
def prepare(way: str, model: nn.Module, example, *, checkpoint_segments: int = 4, tally: dict | None = None) -> nn.Module:
    """The module to train ``model`` through, for ``way`` (``tally``: see ``compress_saves_in_``)."""
    from actcompile import actcompile
    from actcompile.codecs import get_codec

    if way == "uncompressed":
        return model
    if way in ACTCOMPILE_BUDGETS:
        return actcompile(model, budget=ACTCOMPILE_BUDGETS[way], example_inputs=example)
    if way in RESEARCH:
        name, options, kinds = RESEARCH[way]
        return compress_saves_in_(model, get_codec(name, **options), kinds, tally)
    if way == "checkpoint":
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return model
        return Checkpointed(model, checkpoint_segments)
    raise ValueError(f"unknown way {way!r}")


def sgd(params):
    return torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=5e-4)


def adamw(params):
    return torch.optim.AdamW(params, lr=2e-3)


def train(trained, params, batches, loss_of, optimizer_of=sgd) -> tuple[list[float], float]:
    """Losses and the median seconds per step."""
    optimizer = optimizer_of(params)
    losses, seconds = [], []
    for step, batch in enumerate(batches):
        torch.manual_seed(step)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(trained, batch)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, statistics.median(seconds[2:] or seconds)


def memory(trained, params, batch, loss_of) -> dict:
    return measure_memory(lambda b: loss_of(trained, b), params, batch, lambda loss: loss)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    was = model.training
    model.eval()
    correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(256), y.split(256)))
    model.train(was)
    return correct / len(y)


def classify(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def conv_input_bytes(model: nn.Module, loss_of, batch) -> tuple[int, int]:
    """The research code's memory metric for vanilla training: bytes of what the trainable
    convolutions save (their inputs), all of them and the last one alone (one forward)."""
    sizes = []
    hooks = [m.register_forward_pre_hook(lambda m, args: sizes.append(args[0].numel() * args[0].element_size()))
             for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    try:
        loss_of(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return sum(sizes), (sizes[-1] if sizes else 0)


def run_way(way, model, train_batches, loss_of, optimizer_of, example, evaluate) -> dict:
    from actcompile.errors import BudgetError

    params = [p for p in model.parameters() if p.requires_grad]
    start = time.perf_counter()
    tally = {}   # a research way's packed and raw bytes: the papers' metric
    try:
        trained = prepare(way, model, example, tally=tally)
    except BudgetError as err:   # a row of its own: the table says which budgets no plan reaches
        return dict(way=way, error=str(err).split(":")[0] + f" (smallest {err.smallest_bytes / 1e6:.3f} MB)")
    prepare_s = time.perf_counter() - start
    for batch in train_batches[:2]:   # warm-up (codec kernels compile): gradients only, no update
        loss_of(trained, batch).backward()
    mem = memory(trained, params, train_batches[0], loss_of)
    metric = {}
    if way in RESEARCH:
        tally.clear()
        loss_of(trained, train_batches[0])   # one forward: what one batch packs
        metric = dict(papers_mb=tally.get("packed_bytes", 0) / 1e6)
    elif way == "uncompressed":
        every, last = conv_input_bytes(model, loss_of, train_batches[0])
        metric = dict(papers_mb=every / 1e6, papers_last_conv_mb=last / 1e6)
    losses, step_s = train(trained, params, train_batches, loss_of, optimizer_of)
    row = dict(way=way, step_s=step_s, prepare_s=prepare_s, final_loss=statistics.fmean(losses[-5:]),
               activation_mb=mem["activation_bytes"] / 1e6, peak_mb=mem["peak_bytes"] / 1e6, **metric, **evaluate(trained))
    print(f"  {way}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), file=sys.stderr, flush=True)
    return row


# -- the tasks -----------------------------------------------------------------------------
def resnet(classes: int):
    import torchvision

    return torchvision.models.resnet18(num_classes=classes)


def digits_task(seed: int, epochs: int, ways_all, ways_last) -> list[dict]:
    images, labels = digit_images()
    low, high = labels < 5, labels >= 5
    (pre_x, pre_y), _ = split(images[low], labels[low], seed, train_share=1.0)
    (tr_x, tr_y), (te_x, te_y) = split(images[high], labels[high] - 5, seed)
    torch.manual_seed(seed)
    pretrained = resnet(5)
    train(pretrained, list(pretrained.parameters()), batches_of(pre_x, pre_y, 32, seed, 4), classify)
    pretrained.fc.reset_parameters()   # a fresh head for the new classes
    pre_accuracy = accuracy(pretrained, te_x, te_y)
    rows = []
    for layers, ways in (("all", ways_all), ("last", ways_last)):
        for way in ways:
            model = copy.deepcopy(pretrained)
            if layers == "last":
                for name, p in model.named_parameters():
                    p.requires_grad_(name.startswith(("layer4.", "fc.")))
            batches = batches_of(tr_x, tr_y, 32, seed + 1, epochs)
            row = run_way(way, model, batches, classify, sgd, batches[0][0],
                          lambda m: dict(test_acc=accuracy(m, te_x, te_y)))
            rows.append(dict(row, task=f"digits 5-9, {layers} layers", seed=seed, start_acc=pre_accuracy, epochs=epochs))
    return rows


def gpt2(seq: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_positions=seq, n_embd=128, n_layer=4, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return GPT2LMHeadModel(config)


def text_task(seed: int, steps: int, ways) -> list[dict]:
    seq, batch = 128, 8
    train_bytes, valid_bytes = stdlib_bytes(2_000_000)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train_bytes) - seq, (steps, batch), generator=generator)
    batches = [torch.stack([train_bytes[s:s + seq] for s in row]) for row in starts]
    valid = valid_bytes[: (len(valid_bytes) // seq) * seq].view(-1, seq)[:128]
    lm_loss = lambda m, ids: m(input_ids=ids, labels=ids).loss  # noqa: E731

    @torch.no_grad()
    def validation(m):
        m.eval()
        loss = statistics.fmean(lm_loss(m, ids).item() for ids in valid.split(16))
        m.train()
        return dict(valid_loss=loss)

    torch.manual_seed(seed)
    initial = gpt2(seq)
    rows = []
    for way in ways:
        model = copy.deepcopy(initial)
        row = run_way(way, model, batches, lm_loss, adamw, dict(input_ids=batches[0], labels=batches[0]), validation)
        rows.append(dict(row, task="text (byte GPT-2, stdlib)", seed=seed))
    return rows


def overfit_task(seed: int, epochs: int, ways) -> list[dict]:
    images, labels = digit_images()
    (tr_x, tr_y), (te_x, te_y) = split(images, labels, seed, train_count=100)
    torch.manual_seed(seed)
    initial = resnet(10)
    rows = []
    for way in ways:
        model = copy.deepcopy(initial)
        batches = batches_of(tr_x, tr_y, 25, seed + 1, epochs)
        row = run_way(way, model, batches, classify, sgd, batches[0][0],
                      lambda m: dict(train_acc=accuracy(m, tr_x, tr_y), test_acc=accuracy(m, te_x, te_y)))
        rows.append(dict(row, task="overfit (100 digits)", seed=seed))
    return rows


# -- report --------------------------------------------------------------------------------
def spread(values, fmt="{:.3f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(rows, metric: str, label: str) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task in tasks:
        mine = [r for r in rows if r["task"] == task]
        ways = list(dict.fromkeys(r["way"] for r in mine))
        base = {r["seed"]: r for r in mine if r["way"] == "uncompressed"}
        extra = "train acc | gap | " if any("train_acc" in r for r in mine) else ""
        papers = any(r.get("papers_mb") for r in mine)
        print(f"\n### {task}\n\n| way | {label} | {extra}activation MB | peak MB | step-time ratio | setup s |"
              + (" papers' metric MB |" if papers else ""))
        print("|---|---|" + ("---|---|" if extra else "") + "---|---|---|---|" + ("---|" if papers else ""))
        for way in ways:
            rs = [r for r in mine if r["way"] == way]
            if any("error" in r for r in rs):
                print(f"| {way} | no plan in {sum('error' in r for r in rs)} of {len(rs)} seeds: "
                      f"{next(r['error'] for r in rs if 'error' in r)} |" + " |" * ((5 if extra else 3) + papers), flush=True)
                continue
            ratio = [r["step_s"] / base[r["seed"]]["step_s"] for r in rs if r["seed"] in base]
            cells = [spread([r[metric] for r in rs])]
            if extra:
                cells += [spread([r["train_acc"] for r in rs]), spread([r["train_acc"] - r["test_acc"] for r in rs])]
            cells += [spread([r["activation_mb"] for r in rs], "{:.2f}"), spread([r["peak_mb"] for r in rs], "{:.1f}"),
                      spread(ratio, "{:.2f}") if ratio else "-", f"{statistics.fmean(r['prepare_s'] for r in rs):.1f}"]
            if papers:
                cells.append(spread([r["papers_mb"] for r in rs], "{:.2f}") if "papers_mb" in rs[0] else "")
            print(f"| {way} | " + " | ".join(cells) + " |", flush=True)


def plot(rows, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task and "error" not in r]
        metric = next(m for m in METRICS if m in mine[0])
        for i, way in enumerate(dict.fromkeys(r["way"] for r in mine)):
            rs = [r for r in mine if r["way"] == way]
            x = statistics.fmean(r["activation_mb"] for r in rs)
            ys = [r[metric] for r in rs]
            y = statistics.fmean(ys)
            err = statistics.stdev(ys) if len(ys) > 1 else 0.0
            marker = "o" if way.startswith("actcompile") else ("s" if way in ("uncompressed", "checkpoint") else "^")
            ax.errorbar(x, y, yerr=err, fmt=marker, capsize=3, label=way, color=plt.cm.tab20(i % 20))
        ax.set_xlabel("activation MB kept by the forward (measured)")
        ax.set_ylabel(METRICS[metric])
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def measured_heap_process(script: str, argv) -> None:
    """Re-run ``script`` with glibc's heap counters made exact (one arena; every tensor above
    64 KiB its own mapping, see actcompile/measure.py), unless this process already has them."""
    wanted = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    if any(os.environ.get(k) != v for k, v in wanted.items()):
        os.environ.update(wanted)
        os.execv(sys.executable, [sys.executable, script, *(argv or sys.argv[1:])])


def hosvd_readme_claim(rows) -> None:
    """The HOSVD code's README: "fine-tuning all layers using our method (HOSVD) consumes less
    memory than fine-tuning only a single layer with Vanilla Training", in its own metric
    (compressed conv inputs against the last conv's raw input)."""
    base = [r for r in rows if r["way"] == "uncompressed" and r["task"].endswith("all layers") and "papers_mb" in r]
    if not base:
        return
    single = statistics.fmean(r["papers_last_conv_mb"] for r in base)
    print(f"\nThe HOSVD README's claim, in its own metric (MB of conv inputs kept; one batch): vanilla, "
          f"the last conv alone {single:.3f}; vanilla, every conv {statistics.fmean(r['papers_mb'] for r in base):.3f}")
    for way in ("HOSVD v=0.8", "HOSVD v=0.9"):
        mine = [r["papers_mb"] for r in rows if r["way"] == way and r["task"].endswith("all layers") and "papers_mb" in r]
        if mine:
            verdict = "holds" if statistics.fmean(mine) < single else "does not hold"
            print(f"- {way}, every conv: {spread(mine)} MB: the claim {verdict} here")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=("digits", "text", "overfit"))
    parser.add_argument("--seeds", nargs="+", type=int, default=(0, 1, 2))
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs on digits 5-9")
    parser.add_argument("--text-steps", type=int, default=300)
    parser.add_argument("--overfit-epochs", type=int, default=25)
    parser.add_argument("--ways", nargs="+", help="only these ways (default: every way of each task)")
    parser.add_argument("--plot", default=str(RESULTS / "finetune.png"))
    parser.add_argument("--rows", default=str(RESULTS / "finetune.json"),
                        help="where every run's row is written as JSON (tables and plot can be remade from it)")
    parser.add_argument("--from-rows", help="train nothing: print the tables and draw the plot from this JSON")
    ns = parser.parse_args(argv)
    if ns.from_rows:
        rows = json.loads(pathlib.Path(ns.from_rows).read_text())
        report(rows, ns)
        return
    only = lambda ways: tuple(w for w in ways if ns.ways is None or w in ns.ways)  # noqa: E731
    measured_heap_process(__file__, argv)
    torch.set_num_threads(2)
    print(f"Date: {datetime.date.today()}  \nCommand: `python benchmarks/finetune.py {' '.join(argv or sys.argv[1:])}`  \n"
          f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU  \n"
          f"Seeds: {', '.join(map(str, ns.seeds))} (mean ± standard deviation over seeds)\n")
    rows = []
    for seed in ns.seeds:
        print(f"seed {seed}", file=sys.stderr, flush=True)
        if "digits" in ns.tasks:
            rows += digits_task(seed, ns.epochs, only(IMAGE_WAYS), only(LAST_K_WAYS))
        if "text" in ns.tasks:
            rows += text_task(seed, ns.text_steps, only(TEXT_WAYS))
        if "overfit" in ns.tasks:
            rows += overfit_task(seed, ns.overfit_epochs, only(OVERFIT_WAYS))
    if ns.rows:
        pathlib.Path(ns.rows).write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    report(rows, ns)


def report(rows: list[dict], ns) -> None:
    digit_rows = [r for r in rows if r["task"].startswith("digits")]
    if digit_rows:
        epochs = digit_rows[0].get("epochs", ns.epochs)
        print(f"\nDigits 5–9 after pretraining on 0–4, {epochs} epochs; accuracy before fine-tuning "
              f"(fresh head): {spread([r['start_acc'] for r in digit_rows])}")
        table(digit_rows, "test_acc", "test accuracy")
        hosvd_readme_claim(digit_rows)
    table([r for r in rows if r["task"].startswith("text")], "valid_loss", "validation loss")
    table([r for r in rows if r["task"].startswith("overfit")], "test_acc", "test accuracy")
    if ns.plot and rows:
        plot(rows, pathlib.Path(ns.plot))
        print(f"\nPlot: `{pathlib.Path(ns.plot).name}`")


if __name__ == "__main__":
    main()
