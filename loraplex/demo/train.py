"""Rebuild the embedded demo: tokenizer, base model and three PEFT adapters, from the shipped corpus.

    python -m loraplex.demo.train                 # writes loraplex/demo/assets (see README for the time)
    python -m loraplex.demo.train --out DIR --quick   # a few steps of every stage: checks the script runs

Everything is seeded and the data order is fixed, so a rerun with the same torch build and thread count on
the same kind of CPU reproduces the weights bit for bit; elsewhere float rounding may differ, the behaviour
does not.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from loraplex.demo import ADAPTER_SPECS, ASSETS, CHAT_TEMPLATE, AdapterSpec
from loraplex.demo.text import HELD_OUT_PROMPTS, REWRITES, WORD_PAIRS, load_corpus, rot13, upper

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TrainConfig:
    """Sizes and schedule of the demo run (the defaults build the shipped assets)."""

    seed: int = 0
    threads: int = 2
    max_paragraphs: int = 0  # 0: the whole corpus
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    max_position_embeddings: int = 512
    # base model
    seq_len: int = 256
    batch_size: int = 16
    base_steps: int = 1100
    base_lr: float = 2e-3
    warmup_steps: int = 60
    rewrite_fraction: float = 0.1  # share of paragraphs also seen upper-cased, and again rot13-encoded
    # adapters
    adapter_seq_len: int = 96
    adapter_batch_size: int = 16
    adapter_steps: int = 240
    adapter_lr: float = 3e-3


QUICK = TrainConfig(max_paragraphs=150, vocab_size=600, hidden_size=64, intermediate_size=128, num_layers=1,
                    num_heads=2, num_kv_heads=1, seq_len=64, batch_size=4, base_steps=3, warmup_steps=1,
                    adapter_seq_len=32, adapter_batch_size=2, adapter_steps=2)


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(paragraphs: list[str], cfg: TrainConfig, out: Path):
    """Byte-level BPE over the corpus in all three spellings (plain, upper case, rot13)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Plain text counts twice: the base model's own language gets the larger share of the merges.
    tok.train_from_iterator([f(p) for f in (str, str, upper, rot13) for p in paragraphs], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=cfg.max_position_embeddings)
    fast.chat_template = CHAT_TEMPLATE  # saved as chat_template.jinja
    fast.save_pretrained(str(out))
    return tok


def check_swap_tokens(tok) -> None:
    """The swap adapter is a token permutation only if every swapped word is a single token after a space."""
    if tok.get_vocab_size() < 4096:
        return  # a --quick vocabulary is too small to hold them; the check only matters for the real run
    for pair in WORD_PAIRS:
        for w in pair:
            ids = tok.encode(" " + w).ids
            if len(ids) != 1:
                raise RuntimeError(f"swap word {' ' + w!r} is {len(ids)} tokens, expected 1: pick another pair")


# ---------------------------------------------------------------------------------------------- base model

def model_config(cfg: TrainConfig, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                       head_dim=cfg.hidden_size // cfg.num_heads,
                       max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id,
                       pad_token_id=eos_id)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def base_stream(paragraphs: list[str], tok, cfg: TrainConfig, rng: random.Random) -> torch.Tensor:
    """All paragraphs plain, plus a seeded share again in upper case and in rot13, EOS-separated."""
    texts = list(paragraphs)
    for f in (upper, rot13):
        texts += [f(p) for p in paragraphs if rng.random() < cfg.rewrite_fraction]
    rng.shuffle(texts)
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])  # (batch, seq_len)


def train_loop(model, params: list[torch.nn.Parameter], batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
               steps: int, lr: float, warmup: int, name: str, weight_decay: float = 0.0) -> float:
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    model.train()
    avg, t0 = float("nan"), time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        ids, labels = next(batches)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg = loss.item() if math.isnan(avg) else 0.95 * avg + 0.05 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"  {name} step {step + 1}/{steps} loss {avg:.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return avg


@torch.no_grad()
def eval_loss(model, stream: torch.Tensor, seq_len: int) -> float:
    n = (len(stream) - 1) // seq_len
    chunks = stream[: n * seq_len].view(n, seq_len)  # (chunks, seq_len)
    return float(model(input_ids=chunks, labels=chunks).loss) if n else float("nan")


def train_base(paragraphs: list[str], held_out: list[str], tok, cfg: TrainConfig, out: Path) -> dict:
    from transformers import LlamaForCausalLM

    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(model_config(cfg, tok.token_to_id(EOS))).float()
    stream = base_stream(paragraphs, tok, cfg, rng)
    val = base_stream(held_out, tok, dataclasses.replace(cfg, rewrite_fraction=0.0), random.Random(0))
    gen = torch.Generator().manual_seed(cfg.seed)

    def batches():
        while True:
            x = windows(stream, cfg.seq_len, cfg.batch_size, gen)
            yield x, x

    log(f"base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{len(stream)} training tokens")
    loss = train_loop(model, list(model.parameters()), batches(), cfg.base_steps, cfg.base_lr,
                      cfg.warmup_steps, "base", weight_decay=0.1)
    val_loss = eval_loss(model, val, cfg.seq_len)
    log(f"  base held-out loss {val_loss:.3f}")
    model.generation_config.pad_token_id = tok.token_to_id(EOS)
    model.save_pretrained(str(out))
    return {"train_tokens": len(stream), "train_loss": round(loss, 4), "held_out_loss": round(val_loss, 4)}


# ---------------------------------------------------------------------------------------------- adapters

def continuation_batches(paragraphs: list[str], rewrite: Callable[[str], str], tok, cfg: TrainConfig,
                         rng: random.Random) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A plain prefix of a paragraph, then the rest rewritten; loss on the rewritten part only."""
    eos = tok.token_to_id(EOS)
    while True:
        rows = []
        for _ in range(cfg.adapter_batch_size):
            words = rng.choice(paragraphs).split(" ")
            k = rng.randint(2, max(2, min(len(words) - 1, 24)))
            prefix = tok.encode(" ".join(words[:k])).ids[-(cfg.adapter_seq_len // 2):]
            rest = tok.encode(rewrite(" " + " ".join(words[k:]))).ids + [eos]
            ids = (prefix + rest)[: cfg.adapter_seq_len]
            rows.append((ids, ([-100] * len(prefix) + rest)[: cfg.adapter_seq_len]))
        yield _pad(rows, eos, cfg.adapter_seq_len)


def swap_permutation(tok) -> torch.Tensor:
    """Token-id permutation that exchanges the space-led tokens of WORD_PAIRS: the swap rewrite at the level
    of token ids. Eight pairs make the ideal embedding (and head) change a rank-8 matrix."""
    perm = torch.arange(tok.get_vocab_size())
    for a, b in WORD_PAIRS:
        ia, ib = tok.token_to_id(_byte_level(" " + a)), tok.token_to_id(_byte_level(" " + b))
        if ia is not None and ib is not None:
            perm[ia], perm[ib] = ib, ia
    return perm


def _byte_level(text: str) -> str:
    return text.replace(" ", "\u0120")  # the byte-level alphabet's spelling of a space


def permuted_batches(paragraphs: list[str], perm: torch.Tensor, tok, cfg: TrainConfig,
                     rng: random.Random) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows of paragraphs that contain a swapped token: (original ids, permuted ids)."""
    eos = tok.token_to_id(EOS)
    moved = set((perm != torch.arange(len(perm))).nonzero().flatten().tolist())
    every = [e.ids + [eos] for e in tok.encode_batch(paragraphs)]
    docs = [ids for ids in every if moved & set(ids)] or every  # a --quick vocabulary may hold no pair
    while True:
        rows = []
        for _ in range(cfg.adapter_batch_size):
            ids = rng.choice(docs)
            start = rng.randint(0, max(0, len(ids) - cfg.adapter_seq_len))
            window = ids[start:start + cfg.adapter_seq_len]
            rows.append((window, window))
        x, labels = _pad(rows, eos, cfg.adapter_seq_len)
        yield x, perm[x], labels != -100


def distil_loop(model, params: list[torch.nn.Parameter], batches, steps: int, lr: float, perm: torch.Tensor,
                name: str) -> float:
    """Train the adapter to be the base model seen through a token permutation: on permuted input its
    next-token distribution must be the base model's on the original input, permuted. The teacher is the same
    PEFT model with its adapter disabled. The loss is KL(teacher || adapter) per real token, plus the squared
    distance between the two input embeddings (relative to their mean square; swapped tokens weigh as
    much as the rest together): the KL alone teaches the head
    fast but the embedding slowly, since a small model's predictions barely depend on one input word."""
    import torch.nn.functional as F

    embed = model.get_input_embeddings()
    # PEFT starts the embedding's lora_embedding_B as N(0, 1): its 8 columns must turn to span the differences
    # between swapped words' embeddings (entries of a few hundredths), so it learns at ten times the rate.
    emb_ids = {id(p) for n, p in model.named_parameters() if "lora_embedding_B" in n}
    groups = [{"params": [p for p in params if id(p) in emb_ids], "scale": 10.0},
              {"params": [p for p in params if id(p) not in emb_ids], "scale": 1.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 10)
    avg, t0 = float("nan"), time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = g["scale"] * lr_at(step, steps, lr, warmup)
        x, xp, real = next(batches)
        with torch.no_grad(), model.disable_adapter():
            teacher = F.log_softmax(model(input_ids=x).logits, dim=-1)[..., perm]  # (batch, seq, vocab)
            target = embed(x)  # (batch, seq, hidden)
        student = F.log_softmax(model(input_ids=xp).logits, dim=-1)
        kl = F.kl_div(student[real], teacher[real], log_target=True, reduction="batchmean")
        err = (embed(xp) - target).pow(2).mean(-1) / target[real].pow(2).mean()  # (batch, seq)
        moved = real & (xp != x)
        # Swapped tokens are rare: weigh them as much as all the others together.
        mse = err[real & ~moved].mean() + (err[moved].mean() if moved.any() else 0.0)
        (kl + mse).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg = kl.item() if math.isnan(avg) else 0.95 * avg + 0.05 * kl.item()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"  {name} step {step + 1}/{steps} KL {avg:.4f} embedding {mse.item():.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return avg


def _pad(rows: list[tuple[list[int], list[int]]], pad: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Right padding: causal attention means real tokens never see the pad, and pads carry no loss.
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
    return ids, labels


def train_adapter(spec: AdapterSpec, model_dir: Path, paragraphs: list[str], tok, cfg: TrainConfig,
                  out: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    base = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    lcfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # PEFT warns when a LoRA targets a tied layer without ensure_weight_tying; swap means its embedding and
        # head LoRAs to be separate (the head's never reaches the embedding), which is what PEFT then does.
        warnings.filterwarnings("ignore", message=".*ensure_weight_tying.*")
        model = get_peft_model(base, lcfg)
    rng = random.Random(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"adapter {spec.name}: rank {spec.rank}, targets {', '.join(spec.targets)}, "
        f"{sum(p.numel() for p in params) / 1e3:.0f} K parameters")
    steps = max(1, round(cfg.adapter_steps * spec.steps_scale))
    lr = cfg.adapter_lr * spec.lr_scale
    if spec.task == "continue":
        batches = continuation_batches(paragraphs, REWRITES[spec.name], tok, cfg, rng)
        loss = train_loop(model, params, batches, steps, lr, max(1, steps // 10), spec.name)
    elif spec.task == "permute":
        perm = swap_permutation(tok)
        loss = distil_loop(model, params, permuted_batches(paragraphs, perm, tok, cfg, rng), steps, lr, perm,
                           spec.name)
    else:
        raise ValueError(f"adapter {spec.name!r}: unknown task {spec.task!r}")
    # The base model's embedding is unchanged: never store a copy of it beside the LoRA weights.
    model.save_pretrained(str(out), save_embedding_layers=False)
    tidy_adapter_folder(out)
    return {"rank": spec.rank, "steps": steps, "lr": lr, "train_loss": round(loss, 4)}


def tidy_adapter_folder(folder: Path) -> None:
    """Drop what would tie a shipped adapter to the machine that trained it: the absolute base-model path
    in adapter_config.json and PEFT's generated model card."""
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = None
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])  # PEFT keeps a set: fix the order
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (folder / "README.md").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- entry

@torch.no_grad()
def show_samples(model_dir: Path, adapters: dict[str, Path], prompts: tuple[str, ...]) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    names = list(adapters)
    peft = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0]) if names else model
    for n in names[1:]:
        peft.load_adapter(str(adapters[n]), adapter_name=n)
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        for name in [None] + names:
            if name is not None:
                peft.set_adapter(name)
            with peft.disable_adapter() if name is None and names else contextlib.nullcontext():
                gen = peft.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            log(f"  [{name or 'base'}] {prompt!r} -> {tokenizer.decode(gen[0, ids.shape[1]:])!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loraplex.demo.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ASSETS, help=f"asset folder to write (default: {ASSETS})")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and a few steps: only checks the pipeline")
    ap.add_argument("--stages", default="tokenizer,base,adapters",
                    help="comma-separated stages to run (later stages reuse earlier outputs in --out)")
    ap.add_argument("--adapters", default=",".join(s.name for s in ADAPTER_SPECS),
                    help="comma-separated adapters to train in the adapters stage (default: all)")
    ap.add_argument("--no-samples", action="store_true", help="skip the greedy samples printed at the end")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else TrainConfig()
    stages = set(args.stages.split(","))
    torch.set_num_threads(cfg.threads)
    from tokenizers import Tokenizer

    out: Path = args.out
    model_dir, adapter_root = out / "model", out / "adapters"
    model_dir.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    if cfg.max_paragraphs:
        corpus = corpus[: cfg.max_paragraphs]
    # Every 50th paragraph is held out of every stage and measures the base model's loss on unseen text.
    train = [p for i, p in enumerate(corpus) if i % 50 != 49]
    held_out = [p for i, p in enumerate(corpus) if i % 50 == 49]
    log_path = out / "training.json"
    record = json.loads(log_path.read_text()) if log_path.exists() else {}
    record.update({"config": dataclasses.asdict(cfg), "torch": torch.__version__, "seconds": record.get("seconds", {})})

    t = time.perf_counter()
    if "tokenizer" in stages:
        tok = train_tokenizer(corpus, cfg, model_dir)
        record["seconds"]["tokenizer"] = round(time.perf_counter() - t, 1)
        log(f"tokenizer: {tok.get_vocab_size()} tokens ({time.perf_counter() - t:.0f} s)")
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    check_swap_tokens(tok)
    if "base" in stages:
        t = time.perf_counter()
        record["base"] = train_base(train, held_out, tok, cfg, model_dir)
        record["seconds"]["base"] = round(time.perf_counter() - t, 1)
    if "adapters" in stages:
        for spec in [s for s in ADAPTER_SPECS if s.name in args.adapters.split(",")]:
            t = time.perf_counter()
            record[spec.name] = train_adapter(spec, model_dir, train, tok, cfg, adapter_root / spec.name)
            record["seconds"][spec.name] = round(time.perf_counter() - t, 1)
    log_path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"seconds per stage: {record['seconds']}")
    if not args.no_samples:
        present = {s.name: adapter_root / s.name for s in ADAPTER_SPECS if (adapter_root / s.name).exists()}
        show_samples(model_dir, present, HELD_OUT_PROMPTS[:4])
    return 0


if __name__ == "__main__":
    sys.exit(main())
