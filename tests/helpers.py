"""Everything the tests share, built here without downloads: data, tiny models built from a
config, SDM-equipped repositories and trainers. Every call returns a new object.

Sections: data; encoders (tiny BERTs over word vocabularies); language models (a BPE tokenizer,
tiny Llamas, preference data, training arguments, trainers); repositories for the pipelines.
"""

import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

ROOT = Path(__file__).resolve().parents[1]
HARVARD = ROOT / "data" / "harvard_sentences.txt"


# -- data -------------------------------------------------------------------------------------
def gaussian_mixture(n, num_classes=2, dim=8, separation=3.0, label_noise=0.0, seed=0):
    """``(x [n, dim], y [n])``: well-separated isotropic Gaussian clusters; ``label_noise`` flips labels
    uniformly."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * separation
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    if label_noise > 0:
        flip = torch.rand(n, generator=g) < label_noise
        shift = torch.randint(1, num_classes, (n,), generator=g)
        y = torch.where(flip, (y + shift) % num_classes, y)
    return x, y


#: a few texts of different lengths (the feature-cache and model-loading tests)
TEXTS = ["the birch canoe slid on the smooth planks", "glue the sheet", "a", "rice is often served in round bowls"]
WORDS = [f"w{i}" for i in range(200)]


def random_texts(n, seed=1, lengths=(2, 9)):
    """``n`` texts of random :data:`WORDS`, of random lengths in ``lengths`` (so batches need padding)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1], (n,), generator=g).tolist()
    return [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (k,), generator=g).tolist()) for k in sizes]


def harvard_sentences(n: int = 48) -> list[str]:
    """The first ``n`` non-empty Harvard sentences (shipped in data/)."""
    return [line for line in HARVARD.read_text().splitlines() if line.strip()][:n]


class Counter:
    """Counts forward passes of a model's body (``model.model``); a context manager."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.model.register_forward_pre_hook(self.hook)

    def hook(self, *args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -- encoders ---------------------------------------------------------------------------------
def tiny_bert(
    words=(), hidden: int = 16, layers: int = 1, heads: int = 2, max_positions: int = 32, max_length: int = 16
) -> tuple[BertModel, BertTokenizerFast]:
    """``(model, tokenizer)``: a BERT built from a config (seeded: the same weights on every call) with a
    word-level tokenizer over the special tokens plus ``words`` (other words are [UNK])."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tokenizer = BertTokenizerFast(vocab=vocab, model_max_length=max_length)
    config = BertConfig(
        vocab_size=len(vocab) if words else 50,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(0)
    return BertModel(config).eval(), tokenizer


def tiny_encoder(max_length: int = 10):
    """``(model, tokenizer)``: an 8-wide one-layer BERT over :data:`WORDS`."""
    return tiny_bert(WORDS, hidden=8, max_positions=16, max_length=max_length)


# -- language models --------------------------------------------------------------------------
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the Harvard sentences plus the control strings."""
    lines = [line.strip() for line in HARVARD.read_text().splitlines() if line.strip()]
    lines += ["<verified>Yes</verified>", "<verified>No</verified>"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_causal_lm(tokenizer, seed: int = 0, **config_overrides) -> LlamaForCausalLM:
    """A randomly initialised 16-wide Llama for ``tokenizer``; ``config_overrides`` replace
    LlamaConfig fields (e.g. ``num_hidden_layers=3``)."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config_overrides})).eval()


def preference(sentences):
    """Paired preference rows: "Repeat: s" -> s, the negative with its words reversed."""
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": f"Repeat: {s}", "chosen": s, "rejected": " ".join(reversed(s.split()))} for s in sentences]
    )


def make_args(tmp_path, **changes):
    """Small, CPU-only, quiet ``SDMTrainingArguments`` writing under ``tmp_path / "out"``."""
    from sdm_hf.lm import SDMTrainingArguments

    values = dict(
        output_dir=str(Path(tmp_path) / "out"),
        num_train_epochs=2,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        head_epochs=3,
        head_exemplar_dim=16,
        head_learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        max_new_tokens=6,
        seed=0,
        disable_tqdm=True,
    )
    values.update(changes)
    return SDMTrainingArguments(**values)


def make_trainer(tmp_path, eval_data=True, model=None, train=None, seed=0, **changes):
    """An ``SDMTrainer`` on 32 Harvard sentences (``train`` replaces them), calibrated on the next 16
    (``eval_data=False``: none), with a tiny Llama (``model``, or one seeded by ``seed``)."""
    from sdm_hf.lm import SDMTrainer

    sentences = harvard_sentences(48)
    tok = tiny_tokenizer()
    return SDMTrainer(
        model=model if model is not None else tiny_causal_lm(tok, seed=seed),
        args=make_args(tmp_path, **changes),
        train_dataset=preference(sentences[:32] if train is None else train),
        eval_dataset=preference(sentences[32:]) if eval_data else None,
        processing_class=tok,
    )


# -- repositories for the pipelines -----------------------------------------------------------
def head_on(features, labels, seed=0, **config):
    """A head with a random projection, its support on the first half, calibrated on the rest."""
    from sdm_hf import SDMConfig, SDMHead

    head = SDMHead(
        SDMConfig(input_dim=features.shape[1], exemplar_dim=8, alpha=0.9, **config),
        generator=torch.Generator().manual_seed(seed),
    )
    half = features.shape[0] // 2
    head.set_normalization(*SDMHead.normalization_statistics(features))
    head.build_support(features[:half], labels[:half], texts=[f"doc {i}" for i in range(half)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head.calibrate(features[half:], labels[half:])
    return head


def build_encoder_repo(root: Path, id2label=None, seed=0):
    """``(repo path, head, texts)``: a 1-layer BERT (max 10 tokens) and a head on its mean features."""
    from sdm_hf.features.extract import extract_features
    from sdm_hf.repository import save_sdm_model

    root.mkdir(parents=True, exist_ok=True)
    model, tokenizer = tiny_encoder()
    texts = random_texts(80)
    feats = extract_features(model, tokenizer, texts, pooling="mean", progress=False)
    labels = torch.arange(80) % 2
    head = head_on(feats, labels, seed=seed, feature_pooling="mean", id2label=id2label or {0: "neg", 1: "pos"})
    save_sdm_model(model, head, root / "repo", tokenizer=tokenizer)
    return root / "repo", head, texts


def build_lm_repo(root: Path):
    """``(repo path, prompts, completions)``: a tiny Llama and a verification head; completions
    alternate negatives (reversed text, ``No``) and positives (``Yes``)."""
    from sdm_hf.lm.control import ControlTokens
    from sdm_hf.lm.verification_features import verification_features
    from sdm_hf.repository import save_sdm_model

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer)
    sentences = harvard_sentences(60)
    prompts = [f"Repeat: {s}" for s in sentences]
    control = ControlTokens()
    completions = [control.add(s if i % 2 else s[::-1], bool(i % 2)) for i, s in enumerate(sentences)]
    labels = torch.tensor([i % 2 for i in range(60)])
    feats = verification_features(model, tokenizer, prompts, completions)
    head = head_on(feats, labels, feature_pooling="verification", id2label={0: "No", 1: "Yes"})
    save_sdm_model(model, head, root / "repo", tokenizer=tokenizer)
    return root / "repo", prompts, completions
