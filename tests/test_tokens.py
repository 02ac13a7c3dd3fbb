"""Shared token helpers: the pad id, the collator, and one prompt + target tokenisation for training and scoring."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from harness.algorithms.batches import prompt_batch, target_batch
from harness.algorithms.target_rows import build_rows
from harness.data import load_requests
from harness.models import smollm2_dir, tiny_model
from harness.tiny import _TINY_CORPUS
from harness.probes import counterfact, easyedit, score_pairs
from harness.tokens import encode_pairs, pad_batch, pad_id, target_text
from harness.types import EditRequest

CPU = torch.device("cpu")

# Boundaries that tokenizers treat differently: punctuation, digits, a given leading space, a prompt
# ending in a space, non-ASCII, multi-token targets, and "is Paris" (merged into one token by the
# Llama-2-like tokenizer below, which has no pre-tokenizer).
REQUESTS = [
    EditRequest("0", "The mother tongue of {} is", "Danielle Darrieux", "French"),
    EditRequest("1", "The capital of {} is", "France", "Paris"),
    EditRequest("2", "The capital of {} is", "France", " Paris"),
    EditRequest("3", "{} was born in", "Danielle Darrieux", "1917"),
    EditRequest("4", "The headquarters of {} are in", "Apple", "Cupertino, California"),
    EditRequest("5", "{} is located in", "Paris", "Île-de-France"),
    EditRequest("6", "The word for {} is", "Tokyo", "東京"),
    EditRequest("7", "{} plays the", "Toko Yasuda", "guitar solo"),
    EditRequest("8", "The score of {} is 3", "the match", "-1 (after extra time)"),
    EditRequest("9", "{} said:", "Paris", '"yes"'),
    EditRequest("10", "The capital of {} is ", "Italy", "Rome"),
]
PAIRS = [(r.rewrite_prompt, r.target_new) for r in REQUESTS]


def llama2_like_tokenizer():
    """A tokenizer laid out like Llama-2's fast one: Metaspace (``▁`` for spaces, one prepended, no
    split: BPE merges alone decide), BPE, BOS prepended; trained in-process on the tiny corpus and
    the test sentences, plus one token across a word boundary (``▁is▁Paris``, as some vocabularies
    have), so the boundary fallback is exercised."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")  # split into words to train
    bpe.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    sentences = _TINY_CORPUS.split(". ") + [p + " " + t.strip() for p, t in PAIRS]
    bpe.train_from_iterator(sentences * 3, trainer=trainer)
    spec = json.loads(bpe.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    assert "▁is" in vocab and "▁Paris" in vocab
    vocab["▁is▁Paris"] = len(vocab)
    merges.append(["▁is", "▁Paris"] if isinstance(merges[0], list) else "▁is ▁Paris")
    spec["pre_tokenizer"]["split"] = False
    bpe = Tokenizer.from_str(json.dumps(spec))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


@pytest.fixture(scope="module", params=["gpt2", "llama2"])
def tok(request):
    return tiny_model("gpt2")[1] if request.param == "gpt2" else llama2_like_tokenizer()


def test_pairs_split_where_the_prompt_ends(tok):
    """The prompt is read as it is alone; the target is the rest of the joint encoding, or (when the
    tokenizer merges across the boundary) its own encoding, flagged."""
    encoded = encode_pairs(tok, PAIRS)
    for (prompt, target), e in zip(PAIRS, encoded):
        assert e.prompt_ids == tuple(tok(prompt)["input_ids"])
        full = tuple(tok(prompt + target_text(target))["input_ids"])
        if e.boundary_merge:
            assert full[:len(e.prompt_ids)] != e.prompt_ids
            assert e.target_ids == tuple(tok(target_text(target), add_special_tokens=False)["input_ids"])
        else:
            assert e.ids == full
        assert tok.decode(list(e.ids), skip_special_tokens=True) == prompt + target_text(target)
    assert encoded[1].target_ids == encoded[2].target_ids  # " Paris" is "Paris" as a continuation
    assert [e.boundary_merge for e in encoded[:3]] == ([False, True, True] if tok.bos_token == "<s>" else [False] * 3)


def test_training_and_scoring_read_the_same_target_tokens(tok):
    """ROME/MEMIT's v* rows, the fine-tuning batches and the scorer see the same tokens at every boundary."""
    model = tiny_model("llama")[0]
    encoded = encode_pairs(tok, PAIRS)
    scored = score_pairs(model, tok, PAIRS, batch_size=4)
    rows = build_rows(tok, REQUESTS, ["{}"], CPU)
    ft = target_batch(encoded, pad_id(tok), CPU)
    last = prompt_batch(encoded, pad_id(tok), CPU)
    for j, (e, s) in enumerate(zip(encoded, scored)):
        n_p, n_t = len(e.prompt_ids), len(e.target_ids)
        assert s.target_ids == e.target_ids and s.boundary_merge == e.boundary_merge
        # v*: the request's first row is its prompt + target[:-1]; its NLL reads predict each target token
        row = rows.first_row[j]
        reads = ((rows.read_rows == row) & (rows.labels >= 0)).nonzero().squeeze(1)
        assert rows.ids[row, :n_p + n_t - 1].tolist() == list(e.prompt_ids + e.target_ids[:-1])
        assert rows.labels[reads].tolist() == list(e.target_ids)
        assert rows.read_pos[reads].tolist() == list(range(n_p - 1, n_p + n_t - 1))
        # FT-M / LoRA: the label mask holds exactly the target tokens, after exactly the prompt
        real = ft.attention_mask[j].bool()
        assert ft.input_ids[j][ft.label_mask[j]].tolist() == list(e.target_ids)
        assert ft.input_ids[j][real & ~ft.label_mask[j]].tolist() == list(e.prompt_ids)
        # FT-L: the prompt alone, its last token, and the target tokens beside it
        assert last.input_ids[j, :n_p].tolist() == list(e.prompt_ids) and int(last.last[j]) == n_p - 1
        assert last.target_ids[j][last.target_mask[j]].tolist() == list(e.target_ids)


@pytest.mark.slow
def test_smollm2_tokenizer_training_and_scoring_agree_on_the_shipped_samples():
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(smollm2_dir()), local_files_only=True)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    requests = list(load_requests("counterfact", limit=50)) + list(load_requests("zsre", limit=50))
    wanted = set(counterfact.INFOS) | set(easyedit.INFOS)
    pairs = list(dict.fromkeys(p for r in requests for p in counterfact.pairs(r, wanted) + easyedit.pairs(r, wanted)))
    encoded = encode_pairs(tok, pairs)
    for (prompt, target), e in zip(pairs, encoded):
        assert not e.boundary_merge, (prompt, target)
        assert e.ids == tuple(tok(prompt + " " + target)["input_ids"])
        assert tok.decode(list(e.target_ids)) == " " + target
    rows = build_rows(tok, requests, ["{}"], CPU)
    by_pair = dict(zip(pairs, encoded))
    for j, r in enumerate(requests):
        reads = ((rows.read_rows == rows.first_row[j]) & (rows.labels >= 0)).nonzero().squeeze(1)
        assert tuple(rows.labels[reads].tolist()) == by_pair[(r.rewrite_prompt, r.target_new)].target_ids


# ----------------------------------------------------------------------------------------------
# pad id and collator


def test_pad_id_falls_back_to_eos_then_zero():
    assert pad_id(SimpleNamespace(pad_token_id=7, eos_token_id=2)) == 7
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0  # a pad id of 0 is a pad id
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_pad_batch_right_left_and_width():
    ids, mask = pad_batch([[5, 6, 7], [8], []], -1)
    assert ids.tolist() == [[5, 6, 7], [8, -1, -1], [-1, -1, -1]] and ids.dtype == torch.long
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = pad_batch([(5, 6), (8,)], 0, width=4, side="left")
    assert ids.tolist() == [[0, 0, 5, 6], [0, 0, 0, 8]] and mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="width 1"):
        pad_batch([[1, 2]], 0, width=1)
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")
