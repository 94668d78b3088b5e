"""Embedders: the packaged MiniLM, a diffusers folder's CLIP text encoder, a sentence-transformers folder."""

import json

import numpy as np
import pytest
import torch

from pogdiff.config import ConfigError, IndexConfig, parse_config
from pogdiff.embedders import ClipEmbedder, SentenceTransformerEmbedder, embed_captions, make_embedder
from pogdiff.index import caption_id
from pogdiff.text import load_text_encoder
from tasks.config import RetrainConfig

CAPTIONS = ["a red circle", "a big red circle on a blue ground", "a green cross", "a tiny blue square"]


def _letters_vocab():
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory):
    """A diffusers-style folder with a tiny random CLIPTextModel and a CLIPTokenizer over a letter vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("tiny-sd")
    vocab, merges = _letters_vocab()
    raw = root / "raw"
    raw.mkdir()
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"))
    tok.save_pretrained(root / "tokenizer")
    eos = vocab["<|endoftext|>"]
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                            eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(root / "text_encoder")
    return root


def test_clip_embedder_is_the_pooled_normalised_text_encoder_output(tiny_sd_folder):
    from transformers import CLIPTextModel, CLIPTokenizer

    emb = make_embedder(IndexConfig(embedder="clip", embedder_path=str(tiny_sd_folder)))
    assert isinstance(emb, ClipEmbedder) and emb.dim == 32 and emb.max_tokens == 77
    out = emb.forward(emb.tokenize(CAPTIONS))
    assert out.shape == (4, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
    # reference: the model's own pooled output, one caption at a time (no padding)
    model = CLIPTextModel.from_pretrained(tiny_sd_folder / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(tiny_sd_folder / "tokenizer")
    with torch.no_grad():
        ref = torch.cat([model(**tok([c], return_tensors="pt")).pooler_output for c in CAPTIONS])
    torch.testing.assert_close(out, torch.nn.functional.normalize(ref, dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[2])


def test_embedder_key_names_the_weights(tiny_sd_folder, tmp_path):
    import shutil

    from transformers import CLIPTextModel

    a = ClipEmbedder(tiny_sd_folder, 77)
    assert ClipEmbedder(tiny_sd_folder, 77).key == a.key  # stable across loads
    assert ClipEmbedder(tiny_sd_folder, 8).key != a.key  # the token limit changes the vectors
    other = tmp_path / "other"
    shutil.copytree(tiny_sd_folder, other)
    model = CLIPTextModel.from_pretrained(other / "text_encoder")
    with torch.no_grad():
        model.final_layer_norm.bias.add_(0.1)
    model.save_pretrained(other / "text_encoder")
    assert ClipEmbedder(other, 77).key != a.key  # other weights: stored vectors are not reused


@pytest.fixture(scope="module")
def tiny_st_folder(tmp_path_factory):
    """A sentence-transformers folder: a tiny random BERT with a word-level vocabulary and CLS pooling."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("tiny-st")
    words = sorted({w for c in CAPTIONS for w in c.split()})
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    bert_dir = root / "bert"
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(bert_dir)
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(bert_dir)
    word = models.Transformer(str(bert_dir), max_seq_length=32)
    pool = models.Pooling(word.get_embedding_dimension(), pooling_mode="cls")
    SentenceTransformer(modules=[word, pool], device="cpu").save(str(root / "st"))
    return root / "st"


def test_sentence_transformers_embedder_uses_the_folders_own_pooling(tiny_st_folder):
    from sentence_transformers import SentenceTransformer

    emb = make_embedder(IndexConfig(embedder="sentence-transformers", embedder_path=str(tiny_st_folder)))
    assert isinstance(emb, SentenceTransformerEmbedder) and emb.dim == 24
    out = emb.forward(emb.tokenize(CAPTIONS))
    ref = SentenceTransformer(str(tiny_st_folder), device="cpu").encode(CAPTIONS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(out, ref.cpu(), rtol=1e-5, atol=1e-5)


def test_minilm_embedder_matches_the_text_encoders_pooled_embedding():
    emb = make_embedder(IndexConfig())
    out = emb.forward(emb.tokenize(CAPTIONS))  # padded to the batch's longest caption
    ref = load_text_encoder("builtin:minilm", 16).embed(CAPTIONS)  # padded to 16 tokens
    assert out.shape == (4, 384)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


class _Counting:
    """A real embedder that records every caption it encodes."""

    def __init__(self, inner):
        self.inner, self.key, self.dim, self.seen = inner, inner.key, inner.dim, []

    def tokenize(self, captions):
        self.seen += captions
        return self.inner.tokenize(captions)

    def forward(self, tokens):
        return self.inner.forward(tokens)


def test_embed_captions_is_keyed_by_caption_hash_and_order_independent():
    emb = _Counting(make_embedder(IndexConfig()))
    caps = {caption_id(c): c for c in CAPTIONS}
    first = embed_captions(emb, caps, {}, batch_size=3)
    assert (first.embedded, first.reused) == (4, 0) and sorted(emb.seen) == sorted(CAPTIONS)
    # batches are sorted by length, yet each vector lands on its own caption
    single = emb.inner.forward(emb.inner.tokenize([CAPTIONS[1]]))[0].numpy()
    np.testing.assert_allclose(first.vectors[caption_id(CAPTIONS[1])], single, rtol=1e-4, atol=1e-5)
    emb.seen.clear()
    again = embed_captions(emb, caps, first.vectors, batch_size=3)
    assert (again.embedded, again.reused, emb.seen) == (0, 4, [])
    caps[caption_id("a new caption")] = "a new caption"
    third = embed_captions(emb, caps, again.vectors, batch_size=3)
    assert (third.embedded, emb.seen) == (1, ["a new caption"])


def test_embedder_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="needs embedder_path"):
        parse_config({"embedder": "clip"}, IndexConfig)
    with pytest.raises(ConfigError, match="only used by the clip and sentence-transformers"):
        parse_config({"embedder_path": str(tmp_path)}, IndexConfig)
    with pytest.raises(ConfigError, match="index.embedder"):
        parse_config({"index": {"embedder": "word2vec"}}, RetrainConfig)
    with pytest.raises(FileNotFoundError, match="no 'text_encoder' folder"):
        make_embedder(IndexConfig(embedder="clip", embedder_path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no modules.json"):
        make_embedder(IndexConfig(embedder="sentence-transformers", embedder_path=str(tmp_path)))
